"""The "adapted" teacher: the student of a finished adaptation run, served frozen with its task logits.

Task-specific distillation runs in stages (papers/001 stage (a), papers/002 step 1, then distillation): an
adaptation run trains a foundation model's task head (the "encoder" student, or any student with logits), and the
distillation stage reads that run back through this teacher. The run's recipe.toml rebuilds its student and the
checkpoint (last.pt unless ``checkpoint`` names another) fills it, read with weights_only through
:func:`kdforge.engine.runs.load_run_student`. The student normalises its own input, so this teacher passes images
through unchanged (mean 0, std 1).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from torch import Tensor

from kdforge.errors import KdforgeError
from kdforge.teachers import Teacher, TeacherOutput

__all__ = ["AdaptedTeacher"]


class AdaptedTeacher(Teacher):
    """A frozen adaptation run's student: its final CLS and patch tokens and its task logits."""

    name = "adapted"

    @dataclasses.dataclass
    class Config(Teacher.Config):
        run: str = ""
        """Directory of the finished adaptation run (its recipe.toml and last.pt), e.g. runs/adapt_dinov2."""
        checkpoint: str = ""
        """Checkpoint of that run to load ("": <run>/last.pt), e.g. runs/adapt_dinov2/step_00010000.pt."""
        trust_recipe: bool = False
        """Build the run's [student] even if it would run code from outside kdforge (only for runs you trust)."""

        def __post_init__(self):
            super().__post_init__()
            if not self.run:
                raise ValueError("run must name the directory of the adaptation run, e.g. run = \"runs/adapt\"")
            if self.hidden_layers:
                raise ValueError(f"hidden_layers = {self.hidden_layers}: the adapted teacher gives no hidden block "
                                 "outputs; set hidden_layers = 0")

        def runs_code(self) -> list[str]:
            """Settings that run code from outside kdforge (see kdforge.engine.runs.code_it_would_run)."""
            if self.trust_recipe:
                return [f"trust_recipe = true builds the [student] of '{self.run}' whatever code its recipe runs"]
            return []

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        from kdforge.engine.runs import load_run_student

        run = Path(cfg.run)
        checkpoint = Path(cfg.checkpoint) if cfg.checkpoint else run / "last.pt"
        for path, what in ((run, "run directory"), (run / "recipe.toml", "run recipe"), (checkpoint, "checkpoint")):
            if not path.exists():
                raise KdforgeError(
                    f"[teacher] no adaptation {what} at '{path}': the adaptation stage must run first (kdforge train "
                    f"with the encoder student, writing to '{run}'), or set teacher.run / teacher.checkpoint to a "
                    "finished one"
                )
        student, _ = load_run_student(run, checkpoint, trust=cfg.trust_recipe)
        if getattr(getattr(student, "cfg", None), "num_classes", None) == 0:
            raise self._no_logits(run)
        self.student = student
        self.run_dir = run
        self.model_name = f"{student.model_name} adapted in {run}"
        self.embed_dim, self.patch_size = int(student.embed_dim), int(student.patch_size)
        self.set_normalization((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # the student normalises its own input
        self.freeze()

    def _no_logits(self, run: Path) -> KdforgeError:
        return KdforgeError(
            f"[teacher] the student of the adaptation run '{run}' gives no logits: the adaptation stage's student "
            "needs num_classes (the encoder student, or the timm student with num_classes > 0)"
        )

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return tuple(self.student.grid(image_size))

    def encode(self, x: Tensor) -> TeacherOutput:
        out = self.student(x)
        if out.logits is None:
            raise self._no_logits(self.run_dir)
        return TeacherOutput(cls=out.cls, patches=out.patches, grid=tuple(out.grid), logits=out.logits)
