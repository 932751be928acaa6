"""Losses: distillation objectives and supervised ones, on one contract. Built-ins in :mod:`kdforge.losses.builtin`.

One contract for every loss (timm's ``task/distillation.py`` habit)::

    loss_module(student_out, teacher_out, batch) -> (loss: Tensor[], metrics: dict[str, float])

``student_out`` is a :class:`kdforge.students.StudentOutput` of the view the loss declares (:attr:`view`),
``teacher_out`` a :class:`kdforge.teachers.TeacherOutput` (computed once per batch, on the clean image, and shared
by every loss), ``batch`` the collated batch dict plus ``"mask"`` (BoolTensor[B, N], the masked view's masked
patches; all False when no masker is set). The student runs once per view that some loss reads: Proteus' token
and feature objectives read the clean image and only its patch objective the masked one (the released code runs
the student on [x, x] with masks [mask, None]); both views go through one batched forward.

A loss may own parameters (projection heads, a classifier head); they are trained with the student. It is built
as ``cls(cfg, student_dim=..., teacher_dim=...)`` (``teacher_dim`` is None in a recipe without a teacher), plus
``num_classes=...`` (the training data source's, None if unknown) for a loss that sets :attr:`needs_labels`; then
:meth:`DistillLoss.bind` sees every loss of the recipe (a loss that shares a head with another finds it there); the
recipe key ``weight`` is the engine's, not the loss's.

Supervised stages (fine-tuning a student, adapting a teacher) run on the same engine: a loss that does not read
the teacher (:attr:`reads_teacher` False; ``teacher_out`` is then None) lets a recipe leave ``[teacher]`` out, and
the engine runs no teacher forward when no loss reads it. A loss that reads labels (:attr:`needs_labels`) finds
``batch["label"]`` (LongTensor[B], every label valid: the engine refuses unlabelled images, unless the loss
sets :attr:`ignores_unlabelled`, when label -1 marks them) and, when the recipe mixes images (``augment.mixup`` /
``augment.cutmix``) and the loss reads the "clean" view, ``batch["target"]``: Tensor[B, C] soft targets, the mixed
one-hot labels, not smoothed. A loss on the "unmixed" view reads ``batch["label"]`` alone. A loss that owns a
classifier implements ``predict(student_out) -> Tensor[B, C]`` logits, which the "classifier" evaluator scores.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar, Literal

import torch
from torch import nn

View = Literal["clean", "masked", "unmixed"]
"""The student views a loss may read. "clean": the augmented image, as the teacher sees it (after Mixup / CutMix
when the recipe mixes). "masked": the same image with the masker's patches replaced by the mask token (the engine
then requires a masker). "unmixed": the augmented image before Mixup/CutMix, for supervised terms that mixing must
not reach (papers/002: mixing only for the distillation term); a loss on it reads ``batch["label"]``, never the
mixed ``batch["target"]``."""


class DistillLoss(nn.Module):
    name: ClassVar[str]
    #: True when the loss compares patch tokens, so the teacher's and student's patch grids must agree.
    needs_patches: ClassVar[bool] = False
    #: The student view the loss reads (:data:`View`): "clean" (the augmented image, as the teacher sees it),
    #: "masked" (the same image with the masker's patches replaced by the mask token; the engine then requires a
    #: masker) or "unmixed" (the augmented image before Mixup/CutMix). A class attribute that an instance may
    #: override: a loss whose config chooses its view sets ``self.view`` in ``__init__`` (supervised.ce's ``view``).
    view: View = "clean"
    #: False for a loss that never reads ``teacher_out`` (a supervised loss): a recipe whose losses all say so may
    #: have no teacher, and the engine then runs none.
    reads_teacher: ClassVar[bool] = True
    #: True for a loss that reads the batch's labels: the training data must be labelled, and the loss is built
    #: with ``num_classes``.
    needs_labels: ClassVar[bool] = False
    #: True for a label-reading loss that skips unlabelled items: the engine then accepts label -1 in the batch for
    #: this loss (otherwise it refuses unlabelled images whenever a loss reads labels). Like :attr:`view`, an
    #: instance may override it from its config (supervised.ce's ``unlabelled = "ignore"``).
    ignores_unlabelled: bool = False

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, cfg: Any, *, student_dim: int, teacher_dim: int | None):
        super().__init__()
        self.cfg = cfg
        self.student_dim = student_dim
        self.teacher_dim = teacher_dim

    def bind(self, losses: dict[str, "DistillLoss"], where: str) -> None:
        """Called once every loss of the recipe is built (``losses`` by label, this one included; ``where`` is this
        loss's table, e.g. "losses.feature"): a loss that reads another's module looks it up here. Default: none."""

    def forward(self, student_out, teacher_out, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        raise NotImplementedError
