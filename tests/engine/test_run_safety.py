"""What a run directory and a checkpoint may do to the user (issue 9): no code runs from a checkpoint, nothing is
written before a run is known to start, one run per directory, a resume checks its checkpoint and recipe before
touching anything, and a divergence never replaces a good checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch

from kdforge.engine import checkpoint as ckpt
from kdforge.engine.runs import RunLock
from kdforge.engine.trainer import Trainer
from kdforge.errors import CheckpointError, RunDirectoryError, TrainingDiverged
from kdforge.recipe import load_recipe

from cli_helpers import TINY, kdforge

SHORT = ["--no-progress", "--set", "train.max_steps=4", "--set", "train.checkpoint_every=2",
         "--set", "train.keep_checkpoints=2"]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with a hash of its bytes (a change anywhere shows)."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """A short tiny run with checkpoints at steps 2 and 4 (last.pt, step_00000002.pt, step_00000004.pt)."""
    run = tmp_path_factory.mktemp("safety") / "run"
    eval_data = "eval.data={plugin = 'procedural', num_train = 16, num_val = 8, image_size = 16}"
    res = kdforge("train", TINY, "--output-dir", run, *SHORT, "--set", eval_data,
                  "--set", "eval.evaluators={knn = {plugin = 'knn', k = 3}}")
    assert res.returncode == 0, res.stderr[-3000:]
    return run


@pytest.fixture
def run_copy(finished_run, tmp_path) -> Path:
    """A private copy of the finished run, to damage."""
    return Path(shutil.copytree(finished_run, tmp_path / "run"))


# ----------------------------------------------------------------------------------------------- 1. no code from pickles
class _Payload:
    """Unpickling this calls os.system: a checkpoint crafted to run a command when it is loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("command", ["eval", "resume", "diagnose"])
def test_a_crafted_checkpoint_runs_no_code_and_exits_2(run_copy, tmp_path, command):
    marker = tmp_path / "pwned"
    state = torch.load(run_copy / "last.pt", weights_only=True)
    state["results"] = {"x": _Payload(marker)}
    torch.save(state, run_copy / "last.pt")  # plain torch.save: an attacker does not go through check_plain
    before = snapshot(run_copy)
    args = {"eval": ["eval", run_copy, "--no-teacher"],
            "resume": ["train", TINY, "--output-dir", run_copy, "--resume", *SHORT],
            "diagnose": ["diagnose", "attention", run_copy, "--images", "4"]}[command]
    res = kdforge(*args)
    assert res.returncode == 2, res.stderr[-3000:]
    assert not marker.exists(), "loading the checkpoint ran the crafted command"
    assert "refused" in res.stderr and str(run_copy / "last.pt") in res.stderr
    assert "posix.system" in res.stderr or "os.system" in res.stderr  # it says what the file asked to run
    assert "weights_only" not in res.stderr and "trust" not in res.stderr  # no advice to load it unsafely
    assert "Traceback" not in res.stderr
    assert snapshot(run_copy) == before


def test_a_checkpoint_holds_only_tensors_and_plain_data(finished_run):
    state = torch.load(finished_run / "last.pt", weights_only=True)  # raises on anything else
    ckpt.check_plain(state)
    assert state["format"] == ckpt.FORMAT and state["step"] == 4
    assert isinstance(state["recipe"], dict) and state["recipe"]["train"]["max_steps"] == 4


def test_rng_states_survive_the_plain_format():
    import random

    import numpy as np

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    np.random.normal()  # leaves a cached Gaussian in numpy's state
    saved = ckpt.rng_state()
    ckpt.check_plain(saved)
    expected = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    torch.manual_seed(99), np.random.seed(99), random.seed(99)
    ckpt.set_rng_state(saved)
    got = (torch.rand(3), np.random.rand(3), np.random.normal(), random.random(), random.gauss(0, 1))
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2:] == expected[2:]


def test_atomic_save_refuses_what_load_could_not_read(tmp_path):
    with pytest.raises(TypeError, match="checkpoint.opt.fn is a builtins.function"):
        ckpt.atomic_save({"opt": {"fn": lambda: 0}}, tmp_path / "x.pt")
    assert not list(tmp_path.iterdir())


# ----------------------------------------------------------------------------------------------- 6. damaged checkpoints
def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    path.write_bytes({"empty": b"", "truncated": data[: len(data) // 2],
                      "random": os.urandom(len(data))}[how])


@pytest.mark.parametrize("how", ["empty", "truncated", "random"])
def test_a_damaged_last_checkpoint_names_the_file_and_the_ones_to_use(run_copy, how):
    _damage(run_copy / "last.pt", how)
    before = snapshot(run_copy)
    for args in (["train", TINY, "--output-dir", run_copy, "--resume", *SHORT],
                 ["eval", run_copy, "--no-teacher"],
                 ["diagnose", "attention", run_copy, "--images", "4"]):
        res = kdforge(*args)
        assert res.returncode == 2, (args, res.stderr[-3000:])
        lines = [line for line in res.stderr.splitlines() if line.startswith("kdforge: error:")]
        assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr[-3000:]
        assert str(run_copy / "last.pt") in lines[0]
        assert "step_00000004.pt" in lines[0] and "step_00000002.pt" in lines[0]
        assert "weights_only" not in res.stderr and "trust" not in res.stderr
    assert snapshot(run_copy) == before  # recipe.toml, metrics and checkpoints untouched


def test_resume_from_the_named_step_checkpoint_instead(run_copy):
    _damage(run_copy / "last.pt", "truncated")
    res = kdforge("train", TINY, "--output-dir", run_copy, "--resume", run_copy / "step_00000002.pt", *SHORT)
    assert res.returncode == 0, res.stderr[-3000:]
    assert ckpt.load_run(run_copy / "last.pt")["step"] == 4


# ----------------------------------------------------------------------------------------------- 6. resume checks the recipe
def test_resume_with_other_models_lists_the_differences_and_changes_nothing(run_copy):
    before = snapshot(run_copy)
    other = "student.model_kwargs={img_size = 16, patch_size = 4, embed_dim = 32, depth = 1, num_heads = 2}"
    res = kdforge("train", TINY, "--output-dir", run_copy, "--resume", *SHORT, "--set", other,
                  "--set", "optim.lr=0.002", "--allow-changes")
    assert res.returncode == 2, res.stderr[-3000:]
    assert "student.model_kwargs.embed_dim: 24 -> 32" in res.stderr and "cannot continue" in res.stderr
    assert "optim.lr: 0.001 -> 0.002" in res.stderr  # every difference is listed
    assert snapshot(run_copy) == before


def test_resume_with_another_schedule_needs_allow_changes(run_copy):
    changed = ["--set", "optim.lr=0.002", "--set", "train.max_steps=6", "--set", "train.log_every=2"]
    before = snapshot(run_copy)
    res = kdforge("train", TINY, "--output-dir", run_copy, "--resume", *SHORT, *changed)
    assert res.returncode == 2 and "optim.lr: 0.001 -> 0.002" in res.stderr and "--allow-changes" in res.stderr
    assert "max_steps" not in res.stderr and "log_every" not in res.stderr  # free to change: not listed
    assert snapshot(run_copy) == before
    res = kdforge("train", TINY, "--output-dir", run_copy, "--resume", *SHORT, *changed, "--allow-changes")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "optim.lr: 0.001 -> 0.002" in res.stderr  # reported as a warning
    state = ckpt.load_run(run_copy / "last.pt")
    assert state["step"] == 6 and state["recipe"]["optim"]["lr"] == 0.002


def test_a_checkpoint_of_another_world_size_is_refused(run_copy):
    state = torch.load(run_copy / "last.pt", weights_only=True)
    state["world_size"] = 2
    ckpt.atomic_save(state, run_copy / "last.pt")
    res = kdforge("train", TINY, "--output-dir", run_copy, "--resume", *SHORT, "--allow-changes")
    assert res.returncode == 2 and "processes (world size): 2 -> 1" in res.stderr


# ----------------------------------------------------------------------------------------------- 3, 5. nothing written
@pytest.mark.parametrize("override, message", [
    ("run.name='../../escape'", "must be a plain directory name"),
    ("run.name='/tmp/abs'", "must be a plain directory name"),
    ("train.epochs=0", "recipe.train.epochs = 0 is out of range: it must be >= 1"),
    ("optim.lr=nan", "recipe.optim.lr must be a finite number, got nan"),
    ("optim.lr=-0.1", "recipe.optim.lr = -0.1 is out of range: it must be in (0, 1]"),
    ("optim.betas=[0.9, 1.0]", "recipe.optim.betas[1] = 1.0 is out of range: it must be in [0, 1)"),
    ("train.batch_size=0", "recipe.train.batch_size = 0 is out of range: it must be >= 1"),
    ("train.num_workers=-1", "recipe.train.num_workers = -1 is out of range: it must be in [0, 256]"),
    ("run.threads=-2", "recipe.run.threads = -2 is out of range: it must be in [0, 1024]"),
    ("optim.warmup_epochs=-1", "recipe.optim.warmup_epochs = -1.0 is out of range: it must be >= 0"),
    ("train.max_bad_fraction=1.5", "recipe.train.max_bad_fraction = 1.5 is out of range: it must be in [0, 1]"),
    ("losses.token.weight=-1", "losses.token.weight = -1.0 is out of range: it must be >= 0"),
    ("losses.token.weight=inf", "losses.token.weight must be a finite number, got inf"),
    ("eval.batch_size=0", "recipe.eval.batch_size = 0 is out of range: it must be >= 1"),
    ("data.num_train=-5", "data.num_train = -5 is out of range"),
    ("student.drop_path_rate=nan", "student.drop_path_rate must be a finite number"),
    ("masker.mask_ratio=2.0", "mask_ratio must be in [0, 1]"),
    ("augment.image_size=100000", "recipe.augment.image_size = 100000 is out of range: it must be in [1, 8192]"),
    ("train.accum_steps=7", "train.accum_steps = 7 micro-batches per step, but an epoch has only 6 batches"),
])
def test_bad_values_exit_2_naming_key_and_range_before_anything_is_written(tmp_path, override, message):
    res = kdforge("train", TINY, "--no-progress", "--set", override, "--output-dir", tmp_path / "out")
    assert res.returncode == 2, res.stderr[-3000:]
    assert message in res.stderr and "Traceback" not in res.stderr
    assert not (tmp_path / "out").exists()


def test_the_default_run_directory_stays_under_runs(tmp_path):
    res = kdforge("train", TINY, "--no-progress", "--set", "run.name='..'", cwd=tmp_path)
    assert res.returncode == 2 and "plain directory name" in res.stderr
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["shape", "eval_data", "file", "under_a_file", "no_images"])
def test_a_run_that_cannot_start_writes_nothing(tmp_path, case):
    out = tmp_path / "out"
    args = ["--output-dir", out]
    if case == "shape":  # the student is built for 32 px images, the data is 16 px: found at the first forward
        args += ["--set", "student.model_kwargs={img_size = 32, patch_size = 8, embed_dim = 24, depth = 1, num_heads = 2}",
                 "--set", "train.resize_teacher_grid=true"]
        expect = "was built for 32x32 px images but got 16x16"
    elif case == "eval_data":
        args += ["--set", f"eval.data={{plugin = 'image_folder', root = '{tmp_path / 'nope'}'}}",
                 "--set", "eval.evaluators={knn = {plugin = 'knn'}}"]
        expect = str(tmp_path / "nope")
    elif case == "file":
        out.write_text("not a directory")
        expect = "is a file"
    elif case == "under_a_file":
        (tmp_path / "f").write_text("x")
        args = ["--output-dir", tmp_path / "f" / "run"]
        expect = "is a file, so the run directory"
    else:  # a folder of files that are not images: not one can be read
        (tmp_path / "imgs").mkdir()
        for i in range(8):
            (tmp_path / "imgs" / f"{i}.png").write_bytes(b"not an image")
        args += ["--set", f"data={{plugin = 'image_folder', root = '{tmp_path / 'imgs'}'}}"]
        expect = "none of the first 8 training images could be read"
    before = snapshot(tmp_path)
    res = kdforge("train", TINY, "--no-progress", *args)
    assert res.returncode == 2, res.stderr[-3000:]
    assert expect in res.stderr and "Traceback" not in res.stderr, res.stderr[-3000:]
    assert snapshot(tmp_path) == before and (case in ("file",) or not out.exists())


def test_a_second_run_into_a_locked_directory_exits_2_naming_the_holder(tmp_path):
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    try:
        res = kdforge("train", TINY, "--no-progress", "--output-dir", tmp_path / "run", "--set", "train.max_steps=1")
    finally:
        lock.release()
    assert res.returncode == 2
    assert f"pid {os.getpid()}" in res.stderr and "in use by another run" in res.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["run.lock"]
    res = kdforge("train", TINY, "--no-progress", "--output-dir", tmp_path / "run", "--set", "train.max_steps=1")
    assert res.returncode == 0, res.stderr[-3000:]  # released: the directory is usable again


def test_a_fresh_run_does_not_append_to_an_earlier_attempts_files(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    res = kdforge("train", TINY, "--no-progress", "--output-dir", run, "--set", "train.max_steps=1")
    assert res.returncode == 2 and "metrics.jsonl" in res.stderr and "earlier attempt" in res.stderr
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'


# ----------------------------------------------------------------------------------------------- 7. divergence
def _poison_after(trainer, monkeypatch, step: int, *, what: str) -> None:
    """From optimizer step ``step`` on, make the loss NaN (``what`` = "loss") or the parameters NaN ("params")."""
    if what == "loss":
        token = trainer.model.losses["token"]
        original = token.forward

        def poisoned(s, t, batch):
            loss, m = original(s, t, batch)
            return (loss * float("nan") if trainer.step >= step else loss), m

        monkeypatch.setattr(token, "forward", poisoned)
    else:
        original_step = trainer.optimizer.step

        def poisoned_step(*args, **kwargs):
            out = original_step(*args, **kwargs)
            if trainer.step + 1 >= step:
                with torch.no_grad():
                    next(trainer.student.parameters()).fill_(float("nan"))
            return out

        monkeypatch.setattr(trainer.optimizer, "step", poisoned_step)


def test_nan_before_any_checkpoint_names_none(tmp_path, monkeypatch):
    trainer = Trainer(load_recipe(TINY, overrides=["train.checkpoint_every=4", "eval.before=false"]), tmp_path / "r",
                      show_progress=False)
    _poison_after(trainer, monkeypatch, 2, what="loss")
    with pytest.raises(TrainingDiverged) as exc:
        trainer.fit()
    assert "at step 3" in str(exc.value) and "no checkpoint was written before it" in str(exc.value)
    assert "last.pt" not in str(exc.value) and not (tmp_path / "r" / "last.pt").exists()


def test_a_non_finite_state_is_never_written_over_a_good_checkpoint(tmp_path, monkeypatch):
    run = tmp_path / "r"
    trainer = Trainer(load_recipe(TINY, overrides=["train.checkpoint_every=2", "eval.before=false"]), run,
                      show_progress=False)
    _poison_after(trainer, monkeypatch, 4, what="params")  # step 4's update leaves NaN weights; its save must not
    with pytest.raises(TrainingDiverged) as exc:
        trainer.fit()
    msg = str(exc.value)
    assert "not finite at step 4" in msg and "model.student." in msg and "so it was not saved" in msg
    assert f"the last good checkpoint is {run / 'last.pt'} (step 2)" in msg
    state = ckpt.load_run(run / "last.pt")
    assert state["step"] == 2 and all(torch.isfinite(v).all() for v in state["model"].values())
    assert sorted(p.name for p in run.glob("step_*.pt")) == ["step_00000002.pt"]


# ----------------------------------------------------------------------------------------------- 2. code from configuration
def test_eval_of_a_received_run_does_not_run_its_hubconf(run_copy, tmp_path):
    """A run directory from someone else whose recipe names a torch.hub repository inside it: kdforge eval refuses
    to build that teacher unless told to trust the recipe; the student alone needs no trust."""
    import tomllib

    import tomli_w

    from models.model_helpers import HUBCONF

    marker = tmp_path / "hubconf_ran"
    hub = run_copy / "hub"
    hub.mkdir()
    (hub / "hubconf.py").write_text(f"open({str(marker)!r}, 'w').close()\n" + HUBCONF)
    recipe = tomllib.loads((run_copy / "recipe.toml").read_text())
    recipe["teacher"] = {"plugin": "torch_hub", "repo": str(hub), "model": "dinov2_tiny", "source": "local",
                         "pretrained": False, "autocast": "none"}
    (run_copy / "recipe.toml").write_text(tomli_w.dumps(recipe))
    res = kdforge("eval", run_copy)
    assert res.returncode == 2 and not marker.exists(), res.stderr[-3000:]
    assert f"[teacher] source = 'local' runs {hub / 'hubconf.py'}" in res.stderr
    assert "--trust-recipe" in res.stderr and "--no-teacher" in res.stderr
    res = kdforge("eval", run_copy, "--no-teacher")
    assert res.returncode == 0 and not marker.exists(), res.stderr[-3000:]
    res = kdforge("eval", run_copy, "--trust-recipe")
    assert res.returncode == 0 and marker.exists(), res.stderr[-3000:]
