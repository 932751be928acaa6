"""train.compile_teacher: the frozen teacher's forward under torch.compile gives the eager teacher's targets."""

from pathlib import Path

import pytest
import torch
import torch._dynamo

from kdforge.engine.trainer import build_objective, compiled_teacher_encode
from kdforge.errors import RecipeError
from kdforge.recipe import load_recipe

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"


def test_compiled_teacher_gives_the_eager_teachers_outputs():
    cpu = torch.device("cpu")
    eager = build_objective(load_recipe(TINY), cpu)
    compiled = build_objective(load_recipe(TINY, overrides=["train.compile_teacher=true"]), cpu)
    assert eager.teacher_encode is None and compiled.teacher_encode is not None
    images = torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    want, got = eager.teacher_forward(images), compiled.teacher_forward(images)
    # The compiled path ran (a graph was traced), not a silent fallback to the eager teacher.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > frames
    for name in ("cls", "patches"):
        a, b = getattr(got, name), getattr(want, name)
        assert a.shape == b.shape and a.dtype == torch.float32 and not a.is_inference(), name
        # Fused kernels reorder float32 sums: equal up to rounding, relative to the outputs' magnitude.
        err = (a - b).abs().max().item() / b.abs().max().item()
        assert err < 1e-5, f"{name}: compiled teacher differs from eager by {err:.2e} of the outputs' magnitude"
    assert got.grid == want.grid


def test_compile_teacher_refuses_a_teacher_without_encode():
    with pytest.raises(RecipeError, match="derive it from kdforge.teachers.Teacher or set train.compile_teacher"):
        compiled_teacher_encode(torch.nn.Linear(2, 2))
