"""Built-in maskers, registered like any third-party plugin (see kdforge.plugins.DEFAULT_PLUGINS)."""

from __future__ import annotations

from kdforge.plugins import hookimpl


@hookimpl
def kdforge_register_maskers() -> list[type]:
    from kdforge.masking.maskers import BlockMasker, RandomMasker

    return [RandomMasker, BlockMasker]
