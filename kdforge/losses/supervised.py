"""Supervised classification on the student: the loss of fine-tuning stages (FD's fine-tuning evaluation,
papers/004; the student fine-tuning of task-oriented transfer, papers/001), run by the same engine as distillation.

The classifier head belongs to the loss (like a distillation loss's projection head), so the student stays a pure
encoder and its checkpoint keys are those of the distillation run it may start from (``[student] init_from``).
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import RecipeError, ShapeError
from kdforge.losses import DistillLoss
from kdforge.ranges import NonNegativeInt, PositiveFloat, Range

__all__ = ["ClassifierHead", "SupervisedCELoss", "soft_target_cross_entropy"]

Pooling = Literal["mean_patch", "cls"]


class ClassifierHead(nn.Module):
    """Pooled student tokens -> logits Tensor[B, C].

    "mean_patch": the mean of the patch tokens through a LayerNorm (FD's and BEiT's ``fc_norm``), then a Linear.
    kdforge's student gives its patch tokens after its final norm, so the tokens are normalised once more before the
    mean than in FD's released model, whose final norm is the identity when it mean-pools. "cls": a Linear on the
    CLS token (after the final norm). The Linear starts as timm's (truncated normal, std 0.02, zero bias) scaled by
    ``init_scale`` (FD and BEiT: 0.001), so the first logits are near zero.
    """

    def __init__(self, in_dim: int, num_classes: int, pooling: Pooling = "mean_patch", init_scale: float = 1e-3):
        super().__init__()
        self.pooling = pooling
        self.fc_norm = nn.LayerNorm(in_dim) if pooling == "mean_patch" else nn.Identity()
        self.linear = nn.Linear(in_dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)
        nn.init.zeros_(self.linear.bias)
        with torch.no_grad():
            self.linear.weight.mul_(init_scale)

    def forward(self, student_out) -> Tensor:
        pooled = student_out.patches.mean(dim=1) if self.pooling == "mean_patch" else student_out.cls
        return self.linear(self.fc_norm(pooled))


def soft_target_cross_entropy(logits: Tensor, target: Tensor, smoothing: float = 0.0) -> Tensor:
    """Mean over rows of ``-sum_c t_c log softmax(logits)_c`` with ``t = (1 - smoothing) * target + smoothing / C``.

    ``target``: Tensor[B, C] rows summing to 1 (one-hot labels, or Mixup / CutMix's mixed ones). With one-hot
    targets this is torch's ``cross_entropy(label_smoothing=smoothing)`` and timm's LabelSmoothingCrossEntropy;
    with mixed ones it is timm's SoftTargetCrossEntropy of the targets timm's Mixup smooths itself.
    """
    c = logits.shape[-1]
    t = target.to(logits.dtype) * (1.0 - smoothing) + smoothing / c
    return -(t * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


class SupervisedCELoss(DistillLoss):
    """Cross-entropy of a classifier head on the student's pooled tokens against the batch's labels (or the mixed
    soft targets when the recipe sets ``augment.mixup`` / ``augment.cutmix``), with label smoothing. Reads no
    teacher: a recipe of supervised losses alone needs no ``[teacher]``."""

    name = "supervised.ce"
    reads_teacher = False
    needs_labels = True

    @dataclasses.dataclass
    class Config:
        pooling: Pooling = "mean_patch"
        """What the classifier reads: the mean patch token through a LayerNorm (FD's fine-tuning) or the CLS token."""
        label_smoothing: Annotated[float, Range(ge=0, lt=1)] = 0.0
        """Label smoothing epsilon (FD's fine-tuning: 0.1), applied to hard and mixed targets alike."""
        num_classes: NonNegativeInt = 0
        """Classes of the head; 0 takes the training data source's (set it for data that does not know it)."""
        head_init_scale: PositiveFloat = 1e-3
        """Factor on the head's initial weights (FD and BEiT: 0.001, so training starts from near-uniform logits)."""

    def __init__(self, cfg, *, student_dim, teacher_dim, num_classes: int | None = None):
        super().__init__(cfg, student_dim=student_dim, teacher_dim=teacher_dim)
        if cfg.num_classes and num_classes and cfg.num_classes != num_classes:
            raise RecipeError(f"num_classes = {cfg.num_classes} but the training data has {num_classes} classes: "
                              "leave num_classes at 0 to take the data's")
        self.num_classes = cfg.num_classes or num_classes
        if not self.num_classes or self.num_classes < 2:
            raise RecipeError(f"supervised.ce needs the number of classes (got {self.num_classes}): the training data "
                              "source does not give it; set num_classes in the loss's table")
        self.head = ClassifierHead(student_dim, self.num_classes, cfg.pooling, cfg.head_init_scale)

    def predict(self, student_out) -> Tensor:
        """Logits Tensor[B, C] of the student's output."""
        return self.head(student_out)

    def forward(self, student_out, teacher_out, batch):
        logits = self.predict(student_out).float()
        target = batch.get("target")
        if target is None:
            target = F.one_hot(batch["label"].to(logits.device), self.num_classes)
        elif target.shape[-1] != self.num_classes:
            raise ShapeError(f"supervised.ce has {self.num_classes} classes but the mixed targets have "
                             f"{target.shape[-1]}: the loss's num_classes must match the training data's")
        loss = soft_target_cross_entropy(logits, target.to(logits.device), self.cfg.label_smoothing)
        return loss, {}
