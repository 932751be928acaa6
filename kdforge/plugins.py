"""The plugin manager: built-in modules and third-party packages contribute components the same way.

Built-ins are listed in :data:`DEFAULT_PLUGINS` and registered like any entry point. Third-party packages declare
``[project.entry-points.kdforge] name = "module"``; ``KDFORGE_DISABLE_PLUGIN_AUTOLOAD=1`` turns that autoload off.
A plugin that fails to import is recorded (name, distribution, error) and reported; the others keep working.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import importlib.metadata
import os
import traceback
from typing import Any

import pluggy

from kdforge import hookspecs
from kdforge.errors import PluginError
from kdforge.recipe.schema import build, did_you_mean

hookimpl = pluggy.HookimplMarker("kdforge")

ENTRY_POINT_GROUP = "kdforge"

#: Built-in plugin modules, registered exactly like third-party ones.
DEFAULT_PLUGINS = (
    "kdforge.teachers.builtin",
    "kdforge.students.builtin",
    "kdforge.losses.builtin",
    "kdforge.data.builtin",
    "kdforge.masking.builtin",
    "kdforge.eval.builtin",
    "kdforge.engine.loggers",
)


_SINGULAR = {"teachers": "teacher", "students": "student", "losses": "loss", "data_sources": "data source",
             "maskers": "masker", "evaluators": "evaluator", "loggers": "logger"}


@dataclasses.dataclass(frozen=True)
class Component:
    kind: str
    name: str
    cls: type
    origin: str  # "builtin (kdforge.losses.builtin)" or "my-dist 1.0 (my_module)"


@dataclasses.dataclass(frozen=True)
class FailedPlugin:
    name: str
    distribution: str
    error: str


class Registry:
    """Components by kind and name, collected from every registered plugin."""

    def __init__(self, pm: pluggy.PluginManager, origins: dict[str, str], failed: list[FailedPlugin]):
        self.pm = pm
        self.failed = failed
        self._by_kind: dict[str, dict[str, Component]] = {k: {} for k in hookspecs.KINDS}
        for kind in hookspecs.KINDS:
            hook = getattr(pm.hook, f"kdforge_register_{kind}")
            for impl in hook.get_hookimpls():
                origin = origins.get(pm.get_name(impl.plugin) or "", pm.get_name(impl.plugin) or "?")
                for cls in impl.function() or []:
                    name = getattr(cls, "name", None)
                    if not isinstance(name, str) or not name:
                        raise PluginError(f"{kind} component {cls!r} from {origin} has no string `name` attribute")
                    if name in self._by_kind[kind]:
                        other = self._by_kind[kind][name]
                        raise PluginError(
                            f"two {kind} components are named '{name}': {other.cls.__module__}.{other.cls.__qualname__}"
                            f" from {other.origin} and {cls.__module__}.{cls.__qualname__} from {origin}; "
                            "rename one or uninstall one of the packages"
                        )
                    self._by_kind[kind][name] = Component(kind, name, cls, origin)

    def components(self, kind: str | None = None) -> list[Component]:
        kinds = [kind] if kind else list(hookspecs.KINDS)
        return [c for k in kinds for c in sorted(self._by_kind[k].values(), key=lambda c: c.name)]

    def names(self, kind: str, pattern: str = "*") -> list[str]:
        return sorted(n for n in self._by_kind[kind] if fnmatch.fnmatch(n, pattern))

    def get(self, kind: str, name: str, where: str | None = None) -> type:
        try:
            return self._by_kind[kind][name].cls
        except KeyError:
            loc = f" in [{where}]" if where else ""
            known = self._by_kind[kind]
            failed = "".join(f"\n  (plugin '{f.name}' from {f.distribution} failed to load: {f.error})" for f in self.failed)
            raise PluginError(f"unknown {_SINGULAR.get(kind, kind)} '{name}'{loc}: {did_you_mean(name, known)}{failed}") from None

    def create(self, kind: str, table: dict[str, Any], where: str, default_plugin: str | None = None, **extra: Any):
        """Build a component from a recipe table: ``plugin`` picks the class, the other keys its Config."""
        table = dict(table)
        name = table.pop("plugin", default_plugin)
        if name is None:
            raise PluginError(f"[{where}] needs a `plugin` key naming a {_SINGULAR.get(kind, kind)}: one of {', '.join(self.names(kind))}")
        cls = self.get(kind, name, where)
        cfg = build(cls.Config, table, where)
        return cls(cfg, **extra)


def _entry_points() -> list[importlib.metadata.EntryPoint]:
    return list(importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


def build_plugin_manager(autoload: bool | None = None, extra_plugins: tuple = ()) -> Registry:
    """Register the built-ins, then (unless disabled) every ``kdforge`` entry point, then ``extra_plugins``."""
    if autoload is None:
        autoload = os.environ.get("KDFORGE_DISABLE_PLUGIN_AUTOLOAD", "") in ("", "0")
    pm = pluggy.PluginManager("kdforge")
    pm.add_hookspecs(hookspecs)
    origins: dict[str, str] = {}
    failed: list[FailedPlugin] = []
    for modname in DEFAULT_PLUGINS:
        pm.register(importlib.import_module(modname), name=modname)
        origins[modname] = f"builtin ({modname})"
    if autoload:
        for ep in _entry_points():
            dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else "unknown distribution"
            if pm.get_plugin(ep.value) is not None or pm.is_blocked(ep.value):
                continue
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - any import failure is reported, not fatal
                last = traceback.format_exception_only(type(exc), exc)[-1].strip()
                failed.append(FailedPlugin(ep.name, dist, last))
                continue
            pm.register(plugin, name=ep.value)
            origins[ep.value] = f"{dist} ({ep.value})"
    for plugin in extra_plugins:
        pm.register(plugin)
        origins[pm.get_name(plugin)] = f"extra ({pm.get_name(plugin)})"
    pm.check_pending()
    return Registry(pm, origins, failed)


_REGISTRY: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, built on first use."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_plugin_manager()
    return _REGISTRY


def reset_registry() -> None:
    """Forget the registry (tests that install or remove plugins)."""
    global _REGISTRY
    _REGISTRY = None


def create(kind: str, table: dict[str, Any], where: str, **extra: Any):
    return get_registry().create(kind, table, where, **extra)


def list_components(kind: str, pattern: str = "*") -> list[str]:
    return get_registry().names(kind, pattern)
