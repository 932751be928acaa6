"""Multi-stage recipes (kdforge.recipe.stages, kdforge.engine.stages): how a stage's tables combine with the
recipe's, references to earlier stages, profiles and --set by stage name, and runs: every stage in its own
sub-directory, --resume skipping finished stages and continuing the unfinished one exactly, --stage, and the
errors of a stage whose input is missing."""

import json
import os
from pathlib import Path

import pytest
from cli_helpers import kdforge
import torch

from kdforge.engine import checkpoint as ckpt
from kdforge.errors import RecipeError
from kdforge.recipe import load_recipe
from kdforge.recipe.stages import stage_recipes

REPO = Path(__file__).resolve().parents[2]
STAGES = REPO / "tests" / "recipes" / "tiny_stages.toml"
CRASH = Path(__file__).resolve().parent / "crash"


def train(*args, env_extra=None, check=True, recipe=STAGES):
    env = {**os.environ, **(env_extra or {})}
    res = kdforge("train", recipe, "--no-progress", *args, env=env, hooks=CRASH, new_session=True, timeout=900)
    if check:
        assert res.returncode == 0, res.stderr[-3000:]
    return res


# ----------------------------------------------------------------------------------------------- composition
def test_stages_inherit_the_recipe_and_replace_teacher_losses_and_evaluators(tmp_path):
    recipe = load_recipe(STAGES)
    distill, finetune = stage_recipes(recipe, tmp_path)
    assert (distill.name, finetune.name) == ("distill", "finetune")
    assert distill.run_dir == tmp_path / "distill" and distill.recipe.run.output_dir == str(tmp_path / "distill")
    assert distill.recipe.run.name == "tiny_stages.distill"
    # the recipe's tables are every stage's defaults, merged key by key ...
    for s in (distill, finetune):
        assert s.recipe.data["num_train"] == 48 and s.recipe.student["model_kwargs"]["embed_dim"] == 24
        assert s.recipe.eval.data["num_val"] == 32 and s.recipe.optim.lr == 1e-3
    assert distill.recipe.train.epochs == 2 and finetune.recipe.train.epochs == 3
    assert finetune.recipe.train.batch_size == 8  # merged, not replaced
    # ... teacher, masker, losses and evaluators are each stage's own
    assert set(distill.recipe.losses) == {"token", "patch"} and set(finetune.recipe.losses) == {"ce"}
    assert distill.recipe.teacher["plugin"] == "timm" and finetune.recipe.teacher == {}
    assert distill.recipe.masker and not finetune.recipe.masker
    assert set(distill.recipe.eval.evaluators) == {"knn"} and set(finetune.recipe.eval.evaluators) == {"top1"}
    # references: the directory of the earlier stage
    assert finetune.recipe.student["init_from"] == str(tmp_path / "distill")
    assert finetune.reads == ("distill",) and distill.reads == ()
    assert not distill.recipe.stages and not finetune.recipe.stages


def test_profiles_and_set_reach_a_stage_by_name():
    recipe = load_recipe(STAGES, overrides=["stages.finetune.train.epochs=7", "stages.distill.losses.token.weight=0.5"])
    distill, finetune = stage_recipes(recipe)
    assert finetune.recipe.train.epochs == 7 and distill.recipe.train.epochs == 2
    assert distill.recipe.losses["token"]["weight"] == 0.5
    assert [s["name"] for s in recipe.stages] == ["distill", "finetune"]  # the order stays
    with pytest.raises(RecipeError, match="no stage 'finetun'.*did you mean 'finetune'"):
        load_recipe(STAGES, overrides=["stages.finetun.train.epochs=7"])


def _stages_recipe(tmp_path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(STAGES.read_text() + text)
    return path


@pytest.mark.parametrize("extra, match", [
    ('[[stages]]\nname = "finetune"\n', "two stages are named 'finetune'"),
    ('[[stages]]\nname = "more"\n[stages.trian]\nepochs = 1\n', "unknown table 'trian' in stage 'more'.*'train'"),
    ('[[stages]]\nname = "more"\n[stages.train]\nepohcs = 1\n',
     r"stage 'more': unknown key 'epohcs' in \[stages.more.train\]: did you mean 'epochs'"),
    ('[[stages]]\nname = "a/b"\n', "plain directory name"),
])
def test_bad_stages_are_one_clear_recipe_error(tmp_path, extra, match):
    with pytest.raises(RecipeError, match=match):
        load_recipe(_stages_recipe(tmp_path, extra))


def test_a_stage_with_losses_of_its_own_does_not_inherit_the_recipes(tmp_path):
    recipe = load_recipe(_stages_recipe(tmp_path, '[losses.ce]\nplugin = "supervised.ce"\nlabel_smoothing = 0.2\n'))
    distill, finetune = stage_recipes(recipe)
    assert set(distill.recipe.losses) == {"token", "patch"}  # its own, replacing the recipe's
    assert finetune.recipe.losses == {"ce": {"plugin": "supervised.ce", "label_smoothing": 0.1}}


def test_a_reference_to_a_later_or_unknown_stage_is_refused(tmp_path):
    text = STAGES.read_text().replace('init_from = "stage:distill"', 'init_from = "stage:later"')
    path = tmp_path / "r.toml"
    path.write_text(text + '[[stages]]\nname = "later"\n[stages.losses.ce]\nplugin = "supervised.ce"\n')
    with pytest.raises(RecipeError, match=r"stages.finetune.student.init_from = \"stage:later\" refers to stage "
                                          r"'later', which does not run before this stage \(earlier stages: distill"):
        load_recipe(path)


def test_single_stage_recipes_have_no_stages():
    recipe = load_recipe(REPO / "tests" / "recipes" / "tiny.toml")
    assert recipe.stages == []


# ----------------------------------------------------------------------------------------------- runs
@pytest.fixture(scope="module")
def staged_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("stages") / "run"
    res = train("--output-dir", out)
    return out, res


def test_every_stage_runs_in_its_own_directory_and_the_summary_gathers_them(staged_run):
    out, res = staged_run
    for name in ("distill", "finetune"):
        assert (out / name / "last.pt").is_file() and (out / name / "summary.json").is_file()
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ["distill", "finetune"] and summary["unfinished"] == []
    assert summary["stages"]["distill"]["steps"] == 12 and summary["stages"]["finetune"]["steps"] == 18
    assert "student_knn_top1_after" in summary["stages"]["distill"]
    assert "student_classifier_top1_after" in summary["stages"]["finetune"]
    assert "stage distill: " in res.stderr and "stage finetune: " in res.stderr  # per-stage metrics printed
    assert "[[stages]]" in (out / "recipe.toml").read_text()
    # the fine-tuning stage started from the distilled student: its recipe points there
    assert load_recipe(out / "finetune" / "recipe.toml").student["init_from"] == str(out / "distill")


def test_resume_skips_finished_stages(staged_run):
    out, _ = staged_run
    before = {p: p.stat().st_mtime_ns for p in out.glob("*/last.pt")}
    res = train("--output-dir", out, "--resume")
    assert "stage distill finished earlier" in res.stderr and "stage finetune finished earlier" in res.stderr
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/last.pt")} == before


def test_a_fresh_run_into_a_finished_run_is_refused(staged_run):
    out, _ = staged_run
    res = train("--output-dir", out, check=False)
    assert res.returncode == 2 and "already ran" in res.stderr and "--resume" in res.stderr


def test_sigterm_in_the_second_stage_then_resume_gives_the_same_weights(staged_run, tmp_path):
    out, _ = staged_run
    res = train("--output-dir", tmp_path, env_extra={"KDFORGE_TEST_SIGTERM_AT_STEP": "5",
                                                      "KDFORGE_TEST_SIGTERM_IN_RUN": "finetune"})
    assert "SIGTERM at step 5" in res.stderr and "--resume" in res.stderr
    assert (tmp_path / "distill" / "summary.json").is_file() and not (tmp_path / "finetune" / "summary.json").exists()
    assert ckpt.load_run(tmp_path / "finetune" / "last.pt")["step"] == 5
    assert json.loads((tmp_path / "summary.json").read_text())["unfinished"] == ["finetune"]
    distilled = (tmp_path / "distill" / "last.pt").stat().st_mtime_ns
    res = train("--output-dir", tmp_path, "--resume")
    assert "stage finetune (2/2): continuing" in res.stderr
    assert (tmp_path / "distill" / "last.pt").stat().st_mtime_ns == distilled  # not redone
    a, b = ckpt.load_run(tmp_path / "finetune" / "last.pt")["model"], ckpt.load_run(out / "finetune" / "last.pt")["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_one_stage_alone_needs_the_stages_it_reads(tmp_path):
    res = train("--output-dir", tmp_path, "--stage", "finetune", check=False)
    assert res.returncode == 2
    assert "stage 'finetune' reads the output of stage 'distill'" in res.stderr and "--stage distill" in res.stderr
    assert not list(tmp_path.iterdir())  # nothing written
    res = train("--output-dir", tmp_path, "--stage", "distil", check=False)
    assert res.returncode == 2 and "did you mean 'distill'" in res.stderr
    train("--output-dir", tmp_path, "--stage", "distill")
    assert (tmp_path / "distill" / "summary.json").is_file() and not (tmp_path / "finetune").exists()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert list(summary["stages"]) == ["distill"] and summary["unfinished"] == ["finetune"]


def test_stage_flag_on_a_single_stage_recipe_is_an_error(tmp_path):
    res = train("--output-dir", tmp_path, "--stage", "x", recipe=REPO / "tests" / "recipes" / "tiny.toml",
                check=False)
    assert res.returncode == 2 and "has no [[stages]]" in res.stderr
