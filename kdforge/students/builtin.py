"""Built-in students, registered like any third-party plugin (see kdforge.plugins.DEFAULT_PLUGINS)."""

from __future__ import annotations

from kdforge.plugins import hookimpl


@hookimpl
def kdforge_register_students() -> list[type]:
    from kdforge.students.encoder import EncoderStudent
    from kdforge.students.timm_student import TimmStudent

    return [TimmStudent, EncoderStudent]
