"""Distillation losses. Built-ins in :mod:`kdforge.losses.builtin`.

One contract for every loss (timm's ``task/distillation.py`` habit)::

    loss_module(student_out, teacher_out, batch) -> (loss: Tensor[], metrics: dict[str, float])

``student_out`` is a :class:`kdforge.students.StudentOutput` of the view the loss declares (:attr:`view`),
``teacher_out`` a :class:`kdforge.teachers.TeacherOutput` (computed once per batch, on the clean image, and shared
by every loss), ``batch`` the collated batch dict plus ``"mask"`` (BoolTensor[B, N], the masked view's masked
patches; all False when no masker is set). The student runs once per view that some loss reads: Proteus' token
and feature objectives read the clean image and only its patch objective the masked one (the released code runs
the student on [x, x] with masks [mask, None]); both views go through one batched forward.

A loss may own parameters (projection heads); they are trained with the student. It is built as
``cls(cfg, student_dim=..., teacher_dim=...)``, then :meth:`DistillLoss.bind` sees every loss of the recipe (a loss
that shares a head with another finds it there); the recipe key ``weight`` is the engine's, not the loss's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
from torch import nn

View = Literal["clean", "masked"]


class DistillLoss(nn.Module):
    name: ClassVar[str]
    #: True when the loss compares patch tokens, so the teacher's and student's patch grids must agree.
    needs_patches: ClassVar[bool] = False
    #: The student view the loss reads: "clean" (the augmented image, as the teacher sees it) or "masked" (the same
    #: image with the masker's patches replaced by the mask token; the engine then requires a masker).
    view: ClassVar[View] = "clean"

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, cfg: Any, *, student_dim: int, teacher_dim: int):
        super().__init__()
        self.cfg = cfg
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim

    def bind(self, losses: dict[str, "DistillLoss"], where: str) -> None:
        """Called once every loss of the recipe is built (``losses`` by label, this one included; ``where`` is this
        loss's table, e.g. "losses.feature"): a loss that reads another's module looks it up here. Default: none."""

    def forward(self, student_out, teacher_out, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError
