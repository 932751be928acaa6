"""Distillation losses. Built-ins in :mod:`kdforge.losses.builtin`.

One contract for every loss (timm's ``task/distillation.py`` habit)::

    loss_module(student_out, teacher_out, batch) -> (loss: Tensor[], metrics: dict[str, float])

``student_out`` is a :class:`kdforge.students.StudentOutput`, ``teacher_out`` a
:class:`kdforge.teachers.TeacherOutput` (computed once per batch and shared by every loss), ``batch`` the collated
batch dict plus ``"mask"`` (BoolTensor[B, N], the student's masked patches; all False when no masker is set).
A loss may own parameters (projection heads); they are trained with the student. It is built as
``cls(cfg, student_dim=..., teacher_dim=...)``; the recipe key ``weight`` is the engine's, not the loss's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
from torch import nn


class DistillLoss(nn.Module):
    name: ClassVar[str]
    #: True when the loss compares patch tokens, so the teacher's and student's patch grids must agree.
    needs_patches: ClassVar[bool] = False
    #: True when the loss reads the masked positions (the engine then requires a masker).
    needs_mask: ClassVar[bool] = False

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, cfg: Any, *, student_dim: int, teacher_dim: int):
        super().__init__()
        self.cfg = cfg
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim

    def forward(self, student_out, teacher_out, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError
