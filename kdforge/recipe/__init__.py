"""TOML recipes -> a typed, validated :class:`Recipe`.

``load_recipe(path, overrides=["train.epochs=3"], profile="smoke")`` reads the file with tomllib, applies the
``[profiles.<name>]`` overlay, then ``--set`` overrides, expands ``${VAR}`` / ``${VAR:-default}`` in strings,
and checks every key: the fixed sections against their dataclasses, each component table against its plugin's
``Config``. Any problem is a :class:`kdforge.errors.RecipeError` that names the key, its table and the closest
valid name.
"""

from __future__ import annotations

import copy
import os
import re
import tomllib
from pathlib import Path
from typing import Any

from kdforge.errors import RecipeError
from kdforge.recipe.config import (
    EvalConfig,
    OptimConfig,
    Recipe,
    RunConfig,
    TrainConfig,
)
from kdforge.ranges import NonNegativeFloat
from kdforge.recipe.schema import build, did_you_mean, to_dict

__all__ = [
    "EvalConfig", "OptimConfig", "Recipe", "RunConfig", "TrainConfig", "LOSS_TABLE_KEYS", "STUDENT_TABLE_KEYS",
    "load_recipe", "parse_override", "plugin_table", "resolve", "to_dict", "dump_toml",
]

#: Keys of a [losses.<label>] table that the engine reads (the others are the loss plugin's Config).
LOSS_TABLE_KEYS = {"weight": NonNegativeFloat}
"""weight: the loss's factor in the total (default 1.0; 0 keeps it computed and logged but not trained on)."""
#: Keys of the [student] table that the engine reads (the others are the student plugin's Config).
STUDENT_TABLE_KEYS = {"init_from": str}
"""init_from: start from the student weights of a run directory (its last.pt) or of a run checkpoint file, e.g.
a distillation run to fine-tune, or of a folder ``kdforge export --format timm`` wrote (or its model.safetensors);
"" or "none" starts from the student's own initialisation (:func:`kdforge.engine.runs.init_student`)."""


def plugin_table(table: dict[str, Any], engine_keys: dict[str, Any]) -> dict[str, Any]:
    """A component table without the keys the engine reads (``engine_keys``): what the plugin is built from."""
    return {k: v for k, v in table.items() if k not in engine_keys}


_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def deep_merge(base: dict, overlay: dict) -> dict:
    """Overlay ``overlay`` on ``base`` table by table. A component table whose ``plugin`` changes is replaced
    whole: its other keys belong to another plugin's Config."""
    out = copy.deepcopy(base)
    for key, value in overlay.items():
        old = out.get(key)
        replaces_plugin = isinstance(value, dict) and isinstance(old, dict) and "plugin" in value \
            and value["plugin"] != old.get("plugin")
        if isinstance(value, dict) and isinstance(old, dict) and not replaces_plugin:
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b.c=value"`` -> (["a", "b", "c"], value); the value is read as TOML, else taken as a string."""
    if "=" not in text:
        raise RecipeError(f"--set expects KEY=VALUE (e.g. --set train.epochs=3), got {text!r}")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not all(parts):
        raise RecipeError(f"--set key {key!r} is not a dotted key like train.epochs")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()
    return parts, value


def _set(tree: dict, parts: list[str], value: Any) -> None:
    node = tree
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise RecipeError(f"--set {'.'.join(parts)}: '{'.'.join(parts[: i + 1])}' is a value, not a table")
        node = child
    node[parts[-1]] = value


def _expand(value: Any, where: str) -> Any:
    if isinstance(value, str):
        def sub(m: re.Match) -> str:
            var, default = m.group(1), m.group(2)
            if var in os.environ:
                return os.environ[var]
            if default is not None:
                return default
            raise RecipeError(f"{where} uses ${{{var}}} but the environment variable {var} is not set: "
                              f"export {var}=... or write ${{{var}:-default}} in the recipe")
        return _ENV.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list):
        return [_expand(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def read_toml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"recipe file not found: '{path}' (give the path of a .toml recipe, e.g. plugins/proteus.toml)")
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except tomllib.TOMLDecodeError as exc:
        raise RecipeError(f"{path} is not valid TOML: {exc}") from None


def load_recipe(path: str | Path | None = None, overrides: list[str] = (), profile: str | None = None,
                data: dict | None = None) -> Recipe:
    """Read, overlay, override, expand and validate a recipe (``data`` instead of a file for tests)."""
    raw = read_toml(path) if path is not None else copy.deepcopy(data or {})
    profiles = raw.get("profiles", {})
    # Stages are reached by name from profiles and --set (stages.<name>.train.epochs): a table of them meanwhile.
    stage_names = None
    if "stages" in raw:
        from kdforge.recipe.stages import as_named

        raw["stages"] = as_named(raw["stages"])
        stage_names = list(raw["stages"])
    if profile:
        if profile not in profiles:
            options = ", ".join(sorted(profiles)) or "none defined"
            hint = did_you_mean(profile, profiles) if profiles else ""
            raise RecipeError(f"unknown profile '{profile}' ({options}) {hint}".strip())
        overlay = profiles[profile]
        if isinstance(overlay, dict) and isinstance(overlay.get("stages"), list):
            from kdforge.recipe.stages import as_named

            overlay = dict(overlay, stages=as_named(overlay["stages"], f"profiles.{profile}.stages"))
            raw.pop("stages", None)  # a profile's list of stages replaces the recipe's
            stage_names = list(overlay["stages"])
        raw = deep_merge(raw, overlay)
    for text in overrides:
        parts, value = parse_override(text)
        if parts[0] == "stages" and stage_names is not None and len(parts) > 1 and parts[1] not in stage_names:
            raise RecipeError(f"--set {'.'.join(parts)}: the recipe has no stage '{parts[1]}' (stages: "
                              f"{', '.join(stage_names)}); {did_you_mean(parts[1], stage_names)}")
        _set(raw, parts, value)
    if stage_names is not None or "stages" in raw:
        from kdforge.recipe.stages import as_list, as_named

        named = raw.get("stages", {})
        if not isinstance(named, dict):
            raise RecipeError("stages must be [[stages]] tables, each with name = \"...\"")
        unknown = [n for n in named if n not in (stage_names or [])]
        if unknown:
            raise RecipeError(f"a profile or --set names stage '{unknown[0]}', which the recipe does not have "
                              f"(stages: {', '.join(stage_names or []) or 'none'}); "
                              f"{did_you_mean(unknown[0], stage_names or [])}")
        raw["stages"] = as_list(as_named(as_list(named)))
    raw = _expand(raw, "recipe")
    recipe = build(Recipe, raw, "recipe")
    resolve(recipe)
    return recipe


def resolve(recipe: Recipe, training: bool = True) -> None:
    """Check every component table against its plugin's Config (without building any model). ``training`` False:
    a retrieval stage's recipe, of which only [retrieve] is used."""
    from kdforge.plugins import get_registry

    registry = get_registry()
    if recipe.stages:  # each stage is checked as a complete recipe: the recipe's own tables are their defaults
        from kdforge.recipe.stages import stage_recipes

        stage_recipes(recipe)
        return
    if not training:
        from kdforge.retrieval.pipeline import retrieve_config

        retrieve_config(recipe.retrieve)
        return

    def check(kind: str, table: dict, where: str, engine_keys: dict | None = None) -> None:
        table = dict(table)
        name = table.pop("plugin", None)
        if not isinstance(name, str):
            what = "needs" if name is None else f"has plugin = {name!r}; it needs"
            raise RecipeError(f"[{where}] {what} `plugin = \"...\"` naming one of {', '.join(registry.names(kind))}")
        cls = registry.get(kind, name, where)
        build(cls.Config, table, where, extra=engine_keys)

    for section, kind in (("student", "students"), ("data", "data_sources")):
        table = getattr(recipe, section)
        if not table:
            raise RecipeError(f"the recipe needs a [{section}] table with `plugin = \"...\"`")
        check(kind, table, section, engine_keys=STUDENT_TABLE_KEYS if section == "student" else None)
    if recipe.teacher:
        check("teachers", recipe.teacher, "teacher")
    if recipe.masker:
        check("maskers", recipe.masker, "masker")
    if not recipe.losses:
        raise RecipeError("the recipe needs at least one [losses.<label>] table with `plugin = \"...\"`")
    for label, table in recipe.losses.items():
        if not isinstance(table, dict):
            raise RecipeError(f"losses.{label} must be a table like [losses.{label}] plugin = \"proteus.token\"")
        check("losses", table, f"losses.{label}", engine_keys=LOSS_TABLE_KEYS)
        if not recipe.teacher and registry.get("losses", table["plugin"], f"losses.{label}").reads_teacher:
            raise RecipeError(f"losses.{label} ({table['plugin']}) distils a teacher but the recipe has no [teacher] "
                              "table: add [teacher] plugin = \"...\" (only supervised losses such as supervised.ce "
                              "train without one)")
    if recipe.retrieve:
        from kdforge.retrieval.pipeline import retrieve_config

        retrieve_config(recipe.retrieve)
    if recipe.eval.evaluators:
        if not recipe.eval.data:
            raise RecipeError("[eval] has evaluators but no [eval.data] table naming a labelled data source")
        check("data_sources", recipe.eval.data, "eval.data")
        for label, table in recipe.eval.evaluators.items():
            check("evaluators", table, f"eval.evaluators.{label}")


def dump_toml(recipe: Recipe) -> str:
    """The resolved recipe as TOML text (profiles dropped: they are already applied)."""
    import tomli_w  # optional at import time; listed as a dependency for --dry-run

    tree = to_dict(recipe)
    tree.pop("profiles", None)

    def clean(node):
        if isinstance(node, dict):
            return {k: clean(v) for k, v in node.items() if v is not None}
        if isinstance(node, list):
            return [clean(v) for v in node]
        return node

    return tomli_w.dumps(clean(tree))
