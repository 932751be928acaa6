"""A finished or interrupted run, read back from its directory (recipe.toml, last.pt / step_*.pt)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from kdforge.engine import checkpoint as ckpt
from kdforge.errors import KdforgeError
from kdforge.plugins import get_registry
from kdforge.recipe import Recipe, load_recipe


def load_run_student(
    run_dir: str | Path, checkpoint: str | Path | None = None, overrides: list[str] = ()
) -> tuple[nn.Module, Recipe]:
    """(student with the checkpoint's weights, in eval mode, on the CPU; the run's recipe with ``overrides``,
    ``--set`` style) from a run directory (recipe.toml and last.pt, or ``checkpoint``)."""
    run_dir = Path(run_dir)
    recipe_file = run_dir / "recipe.toml"
    if not recipe_file.is_file():
        raise KdforgeError(f"'{run_dir}' holds no recipe.toml: pass a run directory written by kdforge train")
    path = Path(checkpoint) if checkpoint else run_dir / "last.pt"
    if not path.is_file():
        raise KdforgeError(f"no checkpoint at '{path}': pass --checkpoint PATH (a step_*.pt or last.pt of the run)")
    recipe = load_recipe(recipe_file, overrides=list(overrides))
    student = get_registry().create("students", recipe.student, "student")
    state = ckpt.load(path)["model"]
    prefix = "student."
    student.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
    return student.eval(), recipe
