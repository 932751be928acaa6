"""Built-in teachers, registered like any third-party plugin (see kdforge.plugins.DEFAULT_PLUGINS)."""

from __future__ import annotations

from kdforge.plugins import hookimpl


@hookimpl
def kdforge_register_teachers() -> list[type]:
    from kdforge.teachers.adapted import AdaptedTeacher
    from kdforge.teachers.embedded import EmbeddedTeacher
    from kdforge.teachers.hub import TorchHubTeacher
    from kdforge.teachers.open_clip_teacher import OpenClipTeacher
    from kdforge.teachers.timm_teacher import TimmTeacher

    return [TimmTeacher, TorchHubTeacher, EmbeddedTeacher, AdaptedTeacher, OpenClipTeacher]
