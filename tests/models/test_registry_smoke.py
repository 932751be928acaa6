"""Every built-in teacher, student and masker gets a tiny run on the CPU (timm's tests/test_models.py habit).

A new built-in component must add its tiny table here: the first test fails until it does.
"""

import pytest
import torch

from kdforge.plugins import get_registry
from model_helpers import TINY_MODEL, TINY_VIT, write_adaptation_run, write_open_clip_dir

#: The encoder student's tiny table: the tiny ViT probed with a linear head on 16 px images.
ENCODER = {"teacher": {"plugin": "timm", "model": TINY_MODEL, "model_kwargs": TINY_VIT}, "num_classes": 3}


def _tables(kind, tmp_path, hub_dir):
    run = tmp_path / "adapt"
    if kind == "teachers" and not run.exists():
        write_adaptation_run(run, {"plugin": "encoder", **ENCODER})
    tables = {
        "teachers": {
            "timm": {"model": TINY_MODEL, "model_kwargs": TINY_VIT},
            "torch_hub": {"repo": str(hub_dir), "model": "dinov2_tiny", "source": "local", "pretrained": False},
            "embedded": {
                "model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
                "data": {"plugin": "procedural", "image_size": 16, "num_train": 128, "num_val": 32},
                "image_size": 16, "epochs": 1, "batch_size": 64, "cache_dir": str(tmp_path), "progress": False,
            },
            "adapted": {"run": str(run)},
            "open_clip": {"model": write_open_clip_dir(tmp_path / "open_clip"), "pretrained": ""},
        },
        "students": {"timm": {"model": TINY_MODEL, "model_kwargs": TINY_VIT, "drop_path_rate": 0.1},
                     "encoder": ENCODER},
        "maskers": {"random": {}, "block": {}},
    }
    return tables[kind]


def _builtin(kind):
    return sorted(c.name for c in get_registry().components(kind) if c.origin.startswith("builtin"))


@pytest.mark.parametrize("kind", ["teachers", "students", "maskers"])
def test_every_builtin_component_has_a_smoke_case(kind, tmp_path, hub_dir):
    assert _builtin(kind) == sorted(_tables(kind, tmp_path, hub_dir)), f"add a tiny {kind} table to this file"


@pytest.mark.parametrize("name", ["timm", "torch_hub", "embedded", "adapted", "open_clip"])
def test_teacher_smoke(name, tmp_path, hub_dir):
    import warnings

    if name == "open_clip":
        pytest.importorskip("open_clip", reason="open_clip_torch is not installed (pip install 'kdforge[clip]')")
    table = {"plugin": name, **_tables("teachers", tmp_path, hub_dir)[name]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random timm weights on purpose
        teacher = get_registry().create("teachers", table, "teacher")
    x = torch.rand(2, 3, 16, 16)
    out = teacher(x)
    n = out.grid[0] * out.grid[1]
    assert out.grid == teacher.grid((16, 16))
    assert out.cls.shape == (2, teacher.embed_dim) and out.patches.shape == (2, n, teacher.embed_dim)
    assert out.cls.dtype == torch.float32 and torch.isfinite(out.patches).all()
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize("name", ["timm", "encoder"])
def test_student_smoke(name, tmp_path, hub_dir):
    import warnings

    table = {"plugin": name, **_tables("students", tmp_path, hub_dir)[name]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random timm weights on purpose
        student = get_registry().create("students", table, "student").train()
    masker = get_registry().create("maskers", {"plugin": "block", "mask_probability": 1.0}, "masker")
    x = torch.rand(2, 3, 16, 16)
    grid = student.grid((16, 16))
    # a student takes a masked view only where it has a mask token (the encoder student adapts a task: none)
    mask = masker(2, grid, torch.Generator().manual_seed(0)) if hasattr(student, "mask_token") else None
    out = student(x, mask=mask)
    logits = out.logits.logsumexp(-1).mean() if out.logits is not None else 0
    (out.cls.square().mean() + out.patches.square().mean() + logits).backward()
    grads = [p.grad for p in student.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert student.features(x).shape == (2, student.embed_dim)


@pytest.mark.parametrize("name", ["random", "block"])
def test_masker_smoke(name, tmp_path, hub_dir):
    masker = get_registry().create("maskers", {"plugin": name, **_tables("maskers", tmp_path, hub_dir)[name]}, "masker")
    mask = masker(5, (4, 6), torch.Generator().manual_seed(0))
    assert mask.shape == (5, 24) and mask.dtype == torch.bool


@pytest.mark.parametrize("kind", ["teachers", "students", "maskers"])
def test_every_config_field_has_a_docstring_line(kind):
    import dataclasses

    from kdforge.recipe.schema import field_docs

    for comp in get_registry().components(kind):
        docs = field_docs(comp.cls.Config)
        missing = [f.name for f in dataclasses.fields(comp.cls.Config) if not docs.get(f.name)]
        assert not missing, f"{kind} '{comp.name}': fields without a docstring line: {missing}"
