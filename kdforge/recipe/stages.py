"""Multi-stage recipes: one recipe, several trainings in a row (task-specific distillation, papers/001 and 002: adapt
the foundation model to the task, distil it on a transfer set, fine-tune the student).

A recipe with ``[[stages]]`` describes what its stages share in its own tables (``[data]``, ``[student]``,
``[augment]``, ``[optim]``, ``[train]``, ``[eval]`` ...) and lists the stages in order; each stage has a ``name``
and the tables it sets over the recipe's::

    [student]                    # the small model of the distillation and fine-tuning stages
    plugin = "timm"
    model = "fastvit_s12"

    [[stages]]
    name = "adapt"               # runs in <run>/adapt
    [stages.student]             # another plugin: the table is replaced, not merged
    plugin = "encoder"
    ...
    [[stages]]
    name = "distill"
    [stages.teacher]
    plugin = "adapted"
    run = "stage:adapt"          # the directory of stage "adapt" of this run

How a stage's table combines with the recipe's: ``[teacher]``, ``[masker]``, ``[losses]`` and
``[eval.evaluators]`` are the stage's own when it sets them (an empty table removes them: ``teacher = {}``); any
other table is merged key by key, except that a component table naming another ``plugin`` replaces the recipe's.
A stage that sets ``[stages.retrieve]`` (an empty table takes the recipe's ``[retrieve]`` as it is) retrieves a
transfer set instead of training (:mod:`kdforge.retrieval.pipeline`); a later stage trains on it with
``data = {plugin = "retrieved", manifest = "stage:NAME"}``.
A string that is exactly ``"stage:NAME"`` becomes the run directory of the earlier stage NAME (a teacher's ``run``,
a student's ``init_from``), so a stage reads what an earlier one wrote. Profiles and ``--set`` reach a stage by its
name: ``[profiles.smoke.stages.adapt.train]``, ``--set stages.adapt.train.epochs=3``.

Each stage is a complete :class:`~kdforge.recipe.Recipe` (no ``stages``), checked like any recipe when the file is
loaded, and run by the one engine in its own sub-directory (:mod:`kdforge.engine.stages`).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from pathlib import Path
from typing import Any

from kdforge.errors import RecipeError
from kdforge.recipe.config import _RUN_NAME, Recipe
from kdforge.recipe.schema import build, closest, did_you_mean, to_dict

__all__ = ["REPLACED", "STAGE_SECTIONS", "Stage", "as_list", "as_named", "compose", "stage_recipes"]

#: The tables a stage may set.
STAGE_SECTIONS = ("data", "augment", "teacher", "student", "masker", "losses", "optim", "train", "eval", "retrieve")
#: The tables a stage replaces whole (its own teacher, masker and losses; ``{}`` for none).
REPLACED = ("teacher", "masker", "losses")
_REFERENCE = re.compile(r"stage:(.*)")


@dataclasses.dataclass
class Stage:
    """One stage of a multi-stage recipe, resolved."""

    name: str
    recipe: Recipe
    """The stage's complete recipe (the recipe's tables with the stage's over them, references resolved)."""
    run_dir: Path
    """Where the stage runs: <run directory>/<name>."""
    reads: tuple[str, ...]
    """The earlier stages whose run directories it refers to ("stage:NAME")."""
    kind: str = "train"
    """"train" (a run of the engine) or "retrieve" (a stage that sets a [retrieve] table: kdforge retrieve's
    pipeline, writing a transfer set's manifest that a later stage reads with the retrieved data source)."""


def as_named(stages: Any, where: str = "stages") -> dict[str, dict[str, Any]]:
    """``[[stages]]`` (a list of tables with ``name``) as {name: table without name}, in order; RecipeError for a
    stage without a valid, unique name or with a table it may not set."""
    if not isinstance(stages, list):
        raise RecipeError(f"{where} must be a list of tables ([[stages]] with name = \"...\"), got "
                          f"{type(stages).__name__}")
    named: dict[str, dict[str, Any]] = {}
    for i, table in enumerate(stages):
        if not isinstance(table, dict):
            raise RecipeError(f"{where}[{i}] must be a table ([[stages]] with name = \"...\"), got {table!r}")
        name = table.get("name")
        if not isinstance(name, str) or not _RUN_NAME.fullmatch(name) or set(name) == {"."}:
            raise RecipeError(f"{where}[{i}] needs name = \"...\", a plain directory name (letters, digits, '.', '_', "
                              f"'+', '-'): the stage runs in <run directory>/<name>; got {name!r}")
        if name in named:
            raise RecipeError(f"{where}: two stages are named '{name}': each stage needs its own name")
        body = {k: v for k, v in table.items() if k != "name"}
        for key in body:
            if key not in STAGE_SECTIONS:
                raise RecipeError(f"unknown table '{key}' in stage '{name}' ({where}[{i}]): a stage sets "
                                  f"{', '.join(STAGE_SECTIONS)}; {did_you_mean(key, STAGE_SECTIONS)}")
        named[name] = body
    return named


def as_list(named: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """The inverse of :func:`as_named`."""
    return [{"name": name, **body} for name, body in named.items()]


def compose(base: dict[str, Any], stage: dict[str, Any]) -> dict[str, Any]:
    """The recipe tree of a stage: ``stage``'s tables over ``base`` (see the module docstring)."""
    from kdforge.recipe import deep_merge

    overlay = copy.deepcopy(stage)
    tree = copy.deepcopy(base)
    for key in REPLACED:
        if key in overlay:
            tree[key] = overlay.pop(key)
    evaluators = overlay.get("eval", {}).pop("evaluators", None) if isinstance(overlay.get("eval"), dict) else None
    if evaluators is not None:
        tree.setdefault("eval", {})["evaluators"] = evaluators
    return deep_merge(tree, overlay)


def _resolve_references(node: Any, where: str, earlier: list[str], paths: dict[str, Path], found: set[str]) -> Any:
    if isinstance(node, str):
        m = _REFERENCE.fullmatch(node)
        if m is None:
            return node
        target = m.group(1)
        if target not in earlier:
            options = earlier or ["(none: this is the first stage)"]
            hint = closest(target, earlier)
            raise RecipeError(f"{where} = \"{node}\" refers to stage '{target}', which does not run before this "
                              f"stage (earlier stages: {', '.join(options)})" + (f"; did you mean '{hint}'?" if hint
                                                                                 else ""))
        found.add(target)
        return str(paths[target])
    if isinstance(node, dict):
        return {k: _resolve_references(v, f"{where}.{k}", earlier, paths, found) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve_references(v, f"{where}[{i}]", earlier, paths, found) for i, v in enumerate(node)]
    return node


def stage_recipes(recipe: Recipe, run_dir: str | Path | None = None) -> list[Stage]:
    """The stages of ``recipe``, each a checked :class:`Recipe`, in order. ``run_dir``: the run directory (its stages
    run in its sub-directories); None to check the recipe before a run directory is known (references then point
    into "<run>"). Raises :class:`RecipeError` naming the stage and the key."""
    from kdforge.recipe import resolve

    root = Path(run_dir) if run_dir is not None else Path("<run>")
    base = to_dict(recipe)
    base.pop("stages", None)
    base.pop("profiles", None)
    named = as_named(to_dict(recipe.stages))
    paths = {name: root / name for name in named}
    stages: list[Stage] = []
    for name, body in named.items():
        where = f"stages.{name}"
        found: set[str] = set()
        body = _resolve_references(body, where, [s.name for s in stages], paths, found)
        tree = compose(base, body)
        tree["run"] = dict(tree.get("run", {}), name=f"{recipe.run.name}.{name}", output_dir=str(paths[name]))
        kind = "retrieve" if "retrieve" in body else "train"
        try:
            stage_recipe = build(Recipe, tree, where)
            resolve(stage_recipe, training=kind == "train")
        except RecipeError as exc:
            raise RecipeError(f"stage '{name}': {exc}") from None
        stages.append(Stage(name=name, recipe=stage_recipe, run_dir=paths[name],
                            reads=tuple(s for s in named if s in found),
                            kind=kind))
    return stages
