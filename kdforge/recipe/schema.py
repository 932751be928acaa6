"""Typed configs: map plain TOML data onto dataclasses and reject what does not fit.

Every component declares a ``Config`` dataclass; each field is followed by a one-line string literal that
documents it (attribute docstring). :func:`build` converts a dict (one recipe table) into that dataclass,
checking keys, types, ``Literal`` values and ranges, and raises :class:`RecipeError` naming the table, the key
and the closest valid key, or the allowed range.

Numbers: every float must be finite (TOML can spell ``nan`` and ``inf``; no recipe value means either), and a field
annotated ``Annotated[int, Range(ge=1)]`` (or one of the aliases of :mod:`kdforge.ranges`, e.g. ``PositiveInt``)
must lie in its range. Ranges are checked when the recipe is resolved, before anything is built or written.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import math
import textwrap
import types
import typing
from typing import Annotated, Any, Literal, Mapping, Union, get_args, get_origin

from kdforge.errors import RecipeError
from kdforge.ranges import Range

__all__ = ["build", "closest", "field_docs", "to_dict"]


def closest(name: str, options: typing.Iterable[str]) -> str | None:
    """The option most similar to ``name`` (or None when nothing is close)."""
    options = list(options)
    match = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return match[0] if match else None


def did_you_mean(name: str, options: typing.Iterable[str]) -> str:
    options = sorted(options)
    best = closest(name, options)
    if best is not None:
        return f"did you mean '{best}'?"
    return "valid keys: " + (", ".join(options) if options else "(none)")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is Annotated:
        inner, *extras = get_args(tp)
        value = _convert(value, inner, where)
        for rng in extras:
            if isinstance(rng, Range) and value not in rng:
                raise RecipeError(f"{where} = {value!r} is out of range: it must be {rng.describe()}")
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, where)
            except RecipeError as exc:
                errors.append(str(exc))
        if len(errors) == 1:  # ``X | None``: X's own message says more (a range, a length) than the type name
            raise RecipeError(errors[0])
        raise RecipeError(f"{where} = {value!r}: expected {_type_name(tp)}")
    if origin is Literal:
        allowed = get_args(tp)
        if value not in allowed:
            hint = closest(str(value), [str(a) for a in allowed])
            extra = f"; did you mean {hint!r}?" if hint else ""
            raise RecipeError(
                f"{where} = {value!r} is not allowed: choose one of {', '.join(map(repr, allowed))}{extra}"
            )
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        return build(tp, value, where)
    if origin in (list, tuple, typing.Sequence):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"{where} must be a list, got {type(value).__name__} {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise RecipeError(f"{where} must have {len(args)} items, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        inner = args[0] if args else Any
        out = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where} must be a table, got {type(value).__name__} {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {k: _convert(v, vt, f"{where}.{k}") for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where} must be an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where} must be a number, got {type(value).__name__} {value!r}")
        if not math.isfinite(value):
            raise RecipeError(f"{where} must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where} must be a string, got {type(value).__name__} {value!r}")
        return value
    if isinstance(tp, type) and not isinstance(value, tp):
        raise RecipeError(f"{where} must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def build(cls: type, data: dict[str, Any] | None, where: str, extra: Mapping[str, Any] | None = None) -> Any:
    """Instantiate dataclass ``cls`` from ``data`` (a recipe table at ``where``), checking every key.

    ``extra`` maps keys that the table may hold besides ``cls``'s fields (keys the engine reads, such as a loss
    table's ``weight``) to their types: they are checked like fields and offered as suggestions, but not passed to
    ``cls``. Raises RecipeError("unknown key 'lr_sched' in [optim]: did you mean 'lr_schedule'?") and alike.
    """
    data = dict(data or {})
    extra = dict(extra or {})
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in data.items():
        if key in extra and key not in fields:
            _convert(value, extra[key], f"{where}.{key}")
            continue
        if key not in fields:
            kind = "table" if isinstance(value, dict) else "key"
            raise RecipeError(f"unknown {kind} '{key}' in [{where}]: {did_you_mean(key, [*fields, *extra])}")
        kwargs[key] = _convert(value, hints[key], f"{where}.{key}")
    missing = [
        n
        for n, f in fields.items()
        if n not in kwargs and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise RecipeError(f"[{where}] is missing required key(s): {', '.join(missing)}")
    try:
        obj = cls(**kwargs)
    except (ValueError, TypeError) as exc:  # __post_init__ validation
        raise RecipeError(f"[{where}]: {exc}") from None
    return obj


def to_dict(obj: Any) -> Any:
    """Plain data (for printing a resolved recipe and saving it beside a run)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each field of dataclass ``cls`` (attribute docstrings)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            src = textwrap.dedent(inspect.getsource(klass))
        except (OSError, TypeError):
            continue
        body = ast.parse(src).body[0].body
        for a, b in zip(body, body[1:]):
            if (
                isinstance(a, ast.AnnAssign)
                and isinstance(a.target, ast.Name)
                and isinstance(b, ast.Expr)
                and isinstance(b.value, ast.Constant)
                and isinstance(b.value.value, str)
            ):
                docs[a.target.id] = b.value.value.strip().splitlines()[0]
    return docs
