"""Every key of the tiny recipe, fed random values of every type (out of range, NaN, inf, wrong types, hostile
strings): `kdforge train` either refuses the recipe with exit 2, one message, no traceback and nothing written, or
it runs to the end.

The keys are enumerated from the recipe's typed tree (the fixed sections' dataclasses and, for each component
table, its plugin's Config plus the keys the engine reads), so a field added later is fuzzed without touching this
file. KDFORGE_FUZZ_CASES=N raises the number of random cases per key (default 2, plus one of each key's own type).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import math
import os
import random
import signal
import typing
from pathlib import Path

import pytest
import tomli_w
import torch

from cli_helpers import TINY

# A short run: two steps, and a tiny labelled set so the [eval] keys are exercised as well.
BASE = [
    "train.max_steps=2",
    "eval.data={plugin = 'procedural', num_train = 16, num_val = 8, image_size = 16}",
    "eval.evaluators={knn = {plugin = 'knn', k = 3}}",
]

INTS = [-1, 0, 1, 2, 3, 7, 2**31, 2**63 - 1, -(2**63)]
FLOATS = [math.nan, math.inf, -math.inf, -1.0, 0.0, 1e-12, 0.25, 0.5, 1.0, 2.0, 1e30]
STRINGS = ["", "x", "../../escape", "${KD_FUZZ_SURELY_UNSET}", "pipe:echo pwned", "/nonexistent/kd/fuzz", "auto"]
OTHERS = [True, False, [], [1], [0.5, 2.0], ["a", "b"], {}, {"a": 1}]


def _fields(cls) -> dict[str, typing.Any]:
    hints = typing.get_type_hints(cls, include_extras=True)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if f.init}


def _keys() -> list[tuple[str, typing.Any]]:
    """(dotted key, type) for every key the fuzzed recipe can hold."""
    from kdforge.plugins import get_registry
    from kdforge.recipe import LOSS_TABLE_KEYS, STUDENT_TABLE_KEYS, load_recipe
    from kdforge.recipe.config import EvalConfig, Recipe

    recipe = load_recipe(TINY, overrides=BASE)
    registry = get_registry()
    keys = []
    for section in ("run", "augment", "optim", "train"):
        keys += [(f"{section}.{k}", tp) for k, tp in _fields(_fields(Recipe)[section]).items()]
    keys += [(f"eval.{k}", tp) for k, tp in _fields(EvalConfig).items() if k not in ("data", "evaluators")]
    tables = {"teacher": ("teachers", recipe.teacher), "student": ("students", recipe.student),
              "masker": ("maskers", recipe.masker), "data": ("data_sources", recipe.data),
              "eval.data": ("data_sources", recipe.eval.data)}
    tables.update({f"losses.{k}": ("losses", t) for k, t in recipe.losses.items()})
    tables.update({f"eval.evaluators.{k}": ("evaluators", t) for k, t in recipe.eval.evaluators.items()})
    for where, (kind, table) in tables.items():
        keys.append((f"{where}.plugin", str))
        keys += [(f"{where}.{k}", tp) for k, tp in _fields(registry.get(kind, table["plugin"]).Config).items()]
        if kind == "losses":
            keys += [(f"{where}.{k}", tp) for k, tp in LOSS_TABLE_KEYS.items()]
        if where == "student":
            keys += [(f"{where}.{k}", tp) for k, tp in STUDENT_TABLE_KEYS.items()]
    return keys


def _own_type_values(tp) -> list:
    """Values of the key's own type (the ones most likely to pass the type check and hit a range or a runtime
    failure)."""
    origin = typing.get_origin(tp)
    if origin is typing.Annotated:
        return _own_type_values(typing.get_args(tp)[0])
    if origin is typing.Literal:
        return list(typing.get_args(tp))
    if origin in (typing.Union, __import__("types").UnionType):
        return [v for a in typing.get_args(tp) if a is not type(None) for v in _own_type_values(a)]
    if origin in (tuple, list):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis] or [float]
        pools = [_own_type_values(a) or [0] for a in args]
        n = len(args) if origin is tuple and typing.get_args(tp)[-1] is not Ellipsis else 2
        return [[random.choice(pools[min(i, len(pools) - 1)]) for i in range(n)] for _ in range(4)]
    return {int: INTS, float: FLOATS, str: STRINGS, bool: [True, False], dict: [{}, {"a": 1}]}.get(
        origin or tp, [])


def _cases(n_random: int, seed: int = 20261201) -> list[tuple[str, typing.Any]]:
    rng = random.Random(seed)
    random.seed(seed)  # _own_type_values draws list items with the module's generator
    everything = INTS + FLOATS + STRINGS + OTHERS
    cases = []
    for key, tp in _keys():
        own = _own_type_values(tp)
        picks = ([rng.choice(own)] if own else []) + [rng.choice(everything) for _ in range(n_random)]
        cases += [(key, v) for v in picks]
    return cases


def _toml_value(value) -> str:
    """``value`` as the right-hand side of a TOML assignment (what --set reads)."""
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).split("=", 1)[1].strip()


CASES = _cases(int(os.environ.get("KDFORGE_FUZZ_CASES", "2")))


@contextlib.contextmanager
def _time_limit(seconds: int):
    def fail(signum, frame):
        raise TimeoutError(f"the case ran for more than {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _listing(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@pytest.fixture
def in_tmp_cwd(tmp_path, monkeypatch):
    """Run from an empty folder (a recipe's default output directory is runs/<run.name> under the working
    directory), restoring what a run may change in this process."""
    monkeypatch.chdir(tmp_path)
    # teacher.pretrained = true: fail at once, as on a machine offline (huggingface_hub reads the variable when it
    # is imported, which an earlier test may have done, hence its constant too)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants  # timm's hub client, installed with it

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


@pytest.mark.parametrize("key, value", CASES, ids=[f"{k}={_toml_value(v)}"[:80] for k, v in CASES])
def test_fuzzed_recipe_key_is_refused_cleanly_or_runs(in_tmp_cwd, key, value, capsys):
    from kdforge.cli import main

    recipe = in_tmp_cwd / "recipe.toml"
    recipe.write_text(TINY.read_text())
    before = _listing(in_tmp_cwd)
    args = ["train", str(recipe), "--no-progress"]
    for item in [*BASE, f"{key}={_toml_value(value)}"]:
        args += ["--set", item]
    with _time_limit(120):
        rc = main(args)  # an exception escaping main() is a traceback for the user: the test fails on it
    err = capsys.readouterr().err
    if rc == 2:
        message = [line for line in err.splitlines() if line.startswith("kdforge: error:")]
        assert len(message) == 1, f"exit 2 needs one error message, stderr was:\n{err}"
        assert "Traceback" not in err
        assert _listing(in_tmp_cwd) == before, f"refused, yet wrote: {_listing(in_tmp_cwd) - before}"
    else:
        assert rc == 0, f"exit {rc}, stderr:\n{err[-3000:]}"
        summaries = list(in_tmp_cwd.rglob("summary.json"))
        assert len(summaries) == 1, f"ran, but wrote no summary.json: {sorted(_listing(in_tmp_cwd) - before)}"


def test_every_key_is_fuzzed_with_values_of_its_own_type_and_others():
    keys = {k for k, _ in CASES}
    assert {"optim.lr", "train.batch_size", "run.name", "losses.token.weight", "data.num_train",
            "student.drop_path_rate", "masker.mask_ratio", "eval.evaluators.knn.k"} <= keys
    assert len(CASES) >= 3 * len(keys)
