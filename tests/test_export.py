"""kdforge export: the timm folder loads with timm alone and computes the student, ONNX / TorchScript / pt2 files
run and agree with it, the model card holds the run's numbers, FD's shared relative position bias goes to timm's
BEiT and back, and a run that cannot be exported exits 2 writing nothing."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib

import pytest
import torch
from cli_helpers import REPO, TINY, kdforge

HAS_ONNX = all(importlib.util.find_spec(m) for m in ("onnx", "onnxscript", "onnxruntime"))  # kdforge[export]
FORMATS = "timm,onnx,torchscript,pt2" if HAS_ONNX else "timm,torchscript,pt2"


def _report(stdout: str) -> dict:
    """The JSON report ``kdforge export`` prints before its last line."""
    return json.loads(stdout[: stdout.rindex("\nexported to")])


def _images(n: int, size: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def tiny_export(tiny_two_step_run, tmp_path_factory):
    """(run directory, export folder in all four formats, the printed report) of the tiny two-step run."""
    out = tmp_path_factory.mktemp("export") / "tiny"
    res = kdforge("export", tiny_two_step_run, "--format", FORMATS, "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    return tiny_two_step_run, out, _report(res.stdout)


@pytest.fixture(scope="module")
def tiny_student(tiny_export):
    from kdforge.engine.runs import load_run_student

    student, _ = load_run_student(tiny_export[0])
    return student


# A fresh interpreter that never imports kdforge: builds the folder both ways timm offers, normalises with the
# config's own mean and std, and writes the outputs.
_TIMM_ONLY = textwrap.dedent("""
    import json, sys
    import timm, torch
    from safetensors.torch import load_file, save_file
    folder, inputs, outputs = sys.argv[1:]
    images = load_file(inputs)["images"]
    cfg = json.load(open(f"{folder}/config.json"))
    local = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    by_file = timm.create_model(cfg["architecture"], pretrained=True,
                                pretrained_cfg_overlay=dict(file=f"{folder}/model.safetensors"),
                                **cfg["model_args"]).eval()
    data = timm.data.resolve_model_data_config(local)
    x = (images - torch.tensor(data["mean"]).view(1, 3, 1, 1)) / torch.tensor(data["std"]).view(1, 3, 1, 1)
    out = {}
    with torch.no_grad():
        for name, model in (("local", local), ("file", by_file)):
            out[f"{name}_output"] = model(x).contiguous()
            out[f"{name}_features"] = model.forward_features(x).contiguous()
    save_file(out, outputs)
    print(json.dumps({"kdforge_imported": "kdforge" in sys.modules, "input_size": list(data["input_size"])}))
""")


def test_timm_folder_loads_with_timm_alone_and_equals_the_student(tiny_export, tiny_student, tmp_path):
    from safetensors.torch import load_file, save_file

    _, folder, report = tiny_export
    assert {"model.safetensors", "config.json", "README.md"} <= set(report["files"])
    config = json.loads((folder / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" and config["num_classes"] == 0
    assert config["num_features"] == 24 and config["model_args"]["embed_dim"] == 24
    for key in ("input_size", "mean", "std", "interpolation", "crop_pct"):
        assert key in config["pretrained_cfg"], key
    assert config["pretrained_cfg"]["mean"] == [0.5, 0.5, 0.5]  # the student's own statistics
    assert "tag" not in config["pretrained_cfg"]  # timm's default weights' tag is not these weights'
    # only the student: no mask token, no projection heads of the losses
    names = set(load_file(folder / "model.safetensors"))
    assert names and not any("mask_token" in n or n.startswith(("heads", "losses")) for n in names)

    images = _images(4, 16)
    save_file({"images": images}, tmp_path / "in.safetensors")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, "-c", _TIMM_ONLY, str(folder), str(tmp_path / "in.safetensors"),
                          str(tmp_path / "out.safetensors")], capture_output=True, text=True, env=env, cwd=tmp_path,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    info = json.loads(res.stdout.strip().splitlines()[-1])
    assert info == {"kdforge_imported": False, "input_size": [3, 16, 16]}
    got = load_file(tmp_path / "out.safetensors")
    with torch.no_grad():
        want = tiny_student(images)
    for how in ("local", "file"):
        torch.testing.assert_close(got[f"{how}_output"], want.cls, rtol=0, atol=1e-5)
        torch.testing.assert_close(got[f"{how}_features"][:, 1:], want.patches, rtol=0, atol=1e-5)


def _normalised(student, images):
    return (images - student.mean) / student.std


@pytest.mark.skipif(not HAS_ONNX, reason="onnx, onnxscript and onnxruntime are not installed (pip install "
                    "'kdforge[export]')")
def test_onnx_runs_in_onnxruntime_with_a_free_batch(tiny_export, tiny_student):
    import onnxruntime as ort

    _, folder, report = tiny_export
    session = ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["output", "features"]
    images = _images(5, 16, seed=2)  # the export traced 2 images and checked 3 and 1
    output, features = session.run(None, {"input": _normalised(tiny_student, images).numpy()})
    with torch.no_grad():
        want = tiny_student(images)
    torch.testing.assert_close(torch.from_numpy(output), want.cls, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(features)[:, 1:], want.patches, rtol=0, atol=1e-4)
    check = report["checks"]["onnx"]
    assert 0 <= check["max_abs_error"] <= 1e-4 and check["relative_error"] <= 1e-4


def test_torchscript_and_pt2_programs_equal_the_student(tiny_export, tiny_student):
    _, folder, report = tiny_export
    images = _images(3, 16, seed=3)
    x = _normalised(tiny_student, images)
    with torch.no_grad():
        want = tiny_student(images)
        for output, features in (torch.jit.load(str(folder / "model.torchscript.pt"))(x),
                                 torch.export.load(str(folder / "model.pt2")).module()(x)):
            torch.testing.assert_close(output, want.cls, rtol=0, atol=1e-5)
            torch.testing.assert_close(features[:, 1:], want.patches, rtol=0, atol=1e-5)
    for fmt in ("timm", "torchscript", "pt2"):
        assert report["checks"][fmt]["relative_error"] <= 1e-5


def _card_table(card: str) -> dict[str, str]:
    return dict(re.findall(r"^\| ([^|]+?) \| ([^|]+?) \|$", card, flags=re.M))


def test_model_card_holds_the_runs_numbers(tiny_export, tmp_path):
    import timm

    from kdforge.export import export_run

    run, folder, report = tiny_export
    card = (folder / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: timm\n")
    table = _card_table(card)
    model = timm.create_model(f"local-dir:{folder}", pretrained=True)
    assert int(table["parameters"]) == sum(p.numel() for p in model.parameters()) == report["parameters"]
    assert table["FLOPs at 1x3x16x16"].startswith(f"{report['flops']} (") and report["flops"] > 0
    assert "pytorch" in table["CPU latency, batch 1 (median of 10 runs, 1 thread)"]
    assert "upload_folder" in card and "vit_tiny_patch16_224" in card
    recipe = re.search(r"```toml\n(.*?)```", card, flags=re.S).group(1)
    assert tomllib.loads(recipe) == tomllib.loads((run / "recipe.toml").read_text())
    summary = json.loads((run / "summary.json").read_text())
    assert f"step {summary['steps']} of {summary['total_steps']}" in card
    assert f"Final training loss: {json.dumps(summary['final_metrics']['loss'])}." in card

    # a run whose summary.json holds evaluations: the card gives each number as the file does
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("run.lock", "tb"))
    summary.update({"student_knn_top1_before": 0.0625, "student_knn_top1_after": 0.4375,
                    "teacher_knn_top1": 0.5625, "student_per_class_after": [0.5, 0.25]})
    (copy / "summary.json").write_text(json.dumps(summary))
    export_run(copy, tmp_path / "export", ["timm"])
    table = _card_table((tmp_path / "export" / "README.md").read_text())
    for key in ("student_knn_top1_before", "student_knn_top1_after", "teacher_knn_top1"):
        assert table[key] == json.dumps(summary[key])
    assert "student_per_class_after" not in table  # lists stay in summary.json


# ------------------------------------------------------------------------------------------------- FD
def _fd_student(**changes):
    """The FD student of plugins/fd.toml (kdforge attention, shared relative position bias, no pos_embed,
    LayerScale, q/k/v bias), at a tiny size, with random non-zero weights everywhere (the bias table and the key
    bias too, which a wrong conversion would then show)."""
    from kdforge.plugins import get_registry

    table = tomllib.loads((REPO / "plugins" / "fd.toml").read_text())["student"]
    table["model_kwargs"] = {**table["model_kwargs"], "img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
                             "num_heads": 2, **changes.pop("model_kwargs", {})}
    table.update(drop_path_rate=0.0, **changes)
    student = get_registry().create("students", table, "student").eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.2 * torch.randn(p.shape, generator=g))
    return student, table


def test_fd_shared_relative_position_bias_round_trips_through_timm_beit(tmp_path):
    import timm

    from kdforge.engine.runs import init_student
    from kdforge.export import export_student
    from kdforge.plugins import get_registry

    student, table = _fd_student()
    assert student.rel_pos_bias.table.abs().min() > 0
    out = tmp_path / "fd"
    report = export_student(student, out, ["timm", "onnx"] if HAS_ONNX else ["timm"], keep_mask_token=True)
    assert report.layout == "beit" and report.architecture == "beit_base_patch16_224"
    config = json.loads((out / "config.json").read_text())
    assert config["model_args"]["use_shared_rel_pos_bias"] is True and config["model_args"]["use_abs_pos_emb"] is False
    assert config["pretrained_cfg"]["mean"] == pytest.approx([0.485, 0.456, 0.406])

    images = _images(2, 32)
    with torch.no_grad():
        want = student(images)
        beit = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
        x = _normalised(student, images)
        torch.testing.assert_close(beit(x), want.cls, rtol=0, atol=1e-5)
        torch.testing.assert_close(beit.forward_features(x)[:, 1:], want.patches, rtol=0, atol=1e-5)
    assert not HAS_ONNX or report.checks["onnx"]["relative_error"] <= 1e-4

    # back into a new kdforge student (init_from), mask token included
    again = get_registry().create("students", table, "student").eval()
    assert init_student(again, out) == out / "model.safetensors"
    with torch.no_grad():
        got = again(images)
    torch.testing.assert_close(got.patches, want.patches, rtol=0, atol=1e-5)
    torch.testing.assert_close(again.mask_token, student.mask_token, rtol=0, atol=0)

    # and as a teacher: the folder is its checkpoint, model and model_kwargs from config.json
    teacher = get_registry().create("teachers", {"plugin": "timm", "model": config["architecture"],
                                                 "model_kwargs": config["model_args"] | {"num_classes": 0},
                                                 "checkpoint": str(out), "mean": table["mean"], "std": table["std"]},
                                    "teacher")
    torch.testing.assert_close(teacher(images).patches, want.patches, rtol=0, atol=1e-5)


def test_students_beit_cannot_hold_say_why_and_still_export_elsewhere(tmp_path):
    from kdforge.errors import ExportError
    from kdforge.export import export_student

    student, _ = _fd_student(model_kwargs={"reg_tokens": 1})
    with pytest.raises(ExportError, match=r"holds only in its BEiT.*prefix tokens.*--format onnx, pt2"):
        export_student(student, tmp_path / "reg", ["timm", "pt2"])
    assert not (tmp_path / "reg").exists()
    report = export_student(student, tmp_path / "reg", ["pt2"])  # traced from kdforge's own module
    assert report.layout == "kdforge" and report.checks["pt2"]["relative_error"] <= 1e-5
    assert "BEiT" in report.timm_note

    conv, _ = _fd_student(stem="conv", attention="timm", rel_pos_bias="none")
    with pytest.raises(ExportError, match="stem = \"conv\" is kdforge's own patch embedding"):
        export_student(conv, tmp_path / "conv", ["timm"])


def test_a_check_over_tolerance_fails_and_writes_nothing(tmp_path, monkeypatch):
    import kdforge.export as export
    from kdforge.errors import ExportError

    student, _ = _fd_student()
    monkeypatch.setitem(export.TOLERANCES, "pt2", -1.0)
    with pytest.raises(ExportError, match="pt2: the written model differs .* nothing was written"):
        export.export_student(student, tmp_path / "deep" / "out", ["timm", "pt2"])
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary, no parent it made


# ------------------------------------------------------------------------------------------------- failures
def _one_error_line(res) -> str:
    assert res.returncode == 2, (res.stdout[-2000:], res.stderr[-2000:])
    lines = [line for line in res.stderr.splitlines() if line.startswith("kdforge: error:")]
    assert len(lines) == 1 and not res.stdout, res.stderr
    return lines[0]


def test_run_without_checkpoint_exits_2_writing_nothing(tiny_two_step_run, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_two_step_run / "recipe.toml", run / "recipe.toml")
    res = kdforge("export", run, "--format", "timm", "--out", tmp_path / "out")
    assert "holds no checkpoint to export (no last.pt)" in _one_error_line(res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_checkpoint_of_another_recipe_exits_2_writing_nothing(tiny_two_step_run, tmp_path):
    from kdforge.engine import checkpoint as ckpt

    state = ckpt.load_run(tiny_two_step_run / "last.pt")
    state["recipe"]["teacher"]["model_kwargs"]["embed_dim"] = 48  # same student keys: it would load
    ckpt.atomic_save(state, tmp_path / "other.pt")
    res = kdforge("export", tiny_two_step_run, "--checkpoint", tmp_path / "other.pt", "--format", "timm,onnx",
                  "--out", tmp_path / "out")
    line = _one_error_line(res)
    assert "was trained with another recipe" in line and "teacher.model_kwargs.embed_dim: 48" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other.pt"]


def test_export_folder_as_teacher_checkpoint_and_student_init_in_training(tiny_export, tmp_path):
    _, folder, report = tiny_export
    kwargs = "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in report["model_args"].items()
                             if k != "num_classes") + "}"
    common = ["--no-progress", "--set", "train.max_steps=1", "--set", f"student.init_from='{folder}'"]
    res = kdforge("train", TINY, "--output-dir", tmp_path / "run", "--set", f"teacher.model_kwargs={kwargs}",
                  "--set", f"teacher.checkpoint='{folder / 'model.safetensors'}'", *common)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "random weights" not in res.stderr  # the teacher has the export's


def test_a_teacher_that_does_not_fit_the_export_is_told_what_to_set(tiny_export):
    from kdforge.errors import KdforgeError
    from kdforge.plugins import get_registry

    _, folder, _ = tiny_export
    teacher = tomllib.loads(TINY.read_text())["teacher"]  # embed_dim 32, the export's is 24
    with pytest.raises(KdforgeError, match=r"holds a timm vit_tiny_patch16_224 .* model_kwargs = \{ .*embed_dim = 24"):
        get_registry().create("teachers", {**teacher, "checkpoint": str(folder)}, "teacher")
    with pytest.raises(KdforgeError, match=r"the model is timm's resnet18, but .* set model = "
                                           r"\"vit_tiny_patch16_224\""):
        get_registry().create("teachers", {"plugin": "timm", "model": "resnet18", "checkpoint": str(folder)}, "teacher")
