"""Supervised classification on the student: the loss of fine-tuning stages (FD's fine-tuning evaluation,
papers/004; the student fine-tuning of task-oriented transfer, papers/001), run by the same engine as distillation.

The classifier head belongs to the loss (like a distillation loss's projection head), so the student stays a pure
encoder and its checkpoint keys are those of the distillation run it may start from (``[student] init_from``).
With ``head = "student"`` the loss reads the student's own classifier instead (``StudentOutput.logits``): the task
loss of task-specific distillation (papers/002 eq. 2), whose KL term (``distill.kl``) reads the same logits.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import DataError, RecipeError, ShapeError
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


def soft_target_cross_entropy(logits: Tensor, target: Tensor, smoothing: float = 0.0,
                              reduction: Literal["mean", "none"] = "mean") -> Tensor:
    """Mean over rows of ``-sum_c t_c log softmax(logits)_c`` with ``t = (1 - smoothing) * target + smoothing / C``
    (``reduction = "none"``: the Tensor[B] of rows).

    ``target``: Tensor[B, C] rows summing to 1 (one-hot labels, or Mixup / CutMix's mixed ones). With one-hot
    targets this is torch's ``cross_entropy(label_smoothing=smoothing)`` and timm's LabelSmoothingCrossEntropy;
    with mixed ones it is timm's SoftTargetCrossEntropy of the targets timm's Mixup smooths itself.
    """
    c = logits.shape[-1]
    t = target.to(logits.dtype) * (1.0 - smoothing) + smoothing / c
    rows = -(t * F.log_softmax(logits, dim=-1)).sum(dim=-1)
    return rows if reduction == "none" else rows.mean()


class SupervisedCELoss(DistillLoss):
    """Cross-entropy of a classifier head on the student's pooled tokens (or of the student's own classifier,
    ``head = "student"``) against the batch's labels (or the mixed soft targets when the recipe sets
    ``augment.mixup`` / ``augment.cutmix`` and the loss reads the "clean" view), with label smoothing. Reads no
    teacher: a recipe of supervised losses alone needs no ``[teacher]``. With ``unlabelled = "ignore"`` the batch
    may hold unlabelled items (label -1, e.g. synthetic images only the distillation term reads): the loss is the
    mean over the labelled items alone."""

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
        head: Literal["own", "student"] = "own"
        """"own": a classifier head owned by this loss (pooling, head_init_scale); "student": no head, the student's
        own classifier's logits (StudentOutput.logits; set student.num_classes)."""
        unlabelled: Literal["error", "ignore"] = "error"
        """"error": every item must be labelled; "ignore": unlabelled items (label -1) count for nothing, the loss is
        the mean over the labelled ones (zero for a batch without any)."""
        view: Literal["clean", "unmixed"] = "clean"
        """The student view the loss reads: "clean" (after Mixup/CutMix, against the mixed targets) or "unmixed" (the
        image before mixing, against the labels: papers/002 mixes for the distillation term only)."""

    def __init__(self, cfg, *, student_dim, teacher_dim, num_classes: int | None = None):
        super().__init__(cfg, student_dim=student_dim, teacher_dim=teacher_dim)
        self.view = cfg.view
        self.ignores_unlabelled = cfg.unlabelled == "ignore"
        if cfg.num_classes and num_classes and cfg.num_classes != num_classes:
            raise RecipeError(f"num_classes = {cfg.num_classes} but the training data has {num_classes} classes: "
                              "leave num_classes at 0 to take the data's")
        self.num_classes = cfg.num_classes or num_classes
        if not self.num_classes or self.num_classes < 2:
            raise RecipeError(f"supervised.ce needs the number of classes (got {self.num_classes}): the training data "
                              "source does not give it; set num_classes in the loss's table")
        if cfg.head == "own":
            self.head = ClassifierHead(student_dim, self.num_classes, cfg.pooling, cfg.head_init_scale)

    def predict(self, student_out) -> Tensor:
        """Logits Tensor[B, C] of the student's output: this loss's head on the pooled tokens, or the student's own
        classifier's (``head = "student"``)."""
        if self.cfg.head == "own":
            return self.head(student_out)
        logits = getattr(student_out, "logits", None)
        if logits is None:
            raise ShapeError("supervised.ce with head = \"student\" reads the student's own logits but the student "
                             f"gives none: give the student a classifier: student.num_classes = {self.num_classes}")
        if logits.ndim != 2 or logits.shape[-1] != self.num_classes:
            raise ShapeError(f"supervised.ce with head = \"student\" has {self.num_classes} classes but the student's "
                             f"logits are {tuple(logits.shape)}: set student.num_classes = {self.num_classes}")
        return logits

    def forward(self, student_out, teacher_out, batch):
        logits = self.predict(student_out).float()
        label = batch.get("label")
        # the unmixed view is the image before Mixup/CutMix: its targets are the labels, never the mixed ones
        target = batch.get("target") if self.view == "clean" else None
        if target is None:
            if label is None:
                raise DataError("supervised.ce reads labels but the batch has none: train on labelled data")
            # checked where the engine keeps the labels (the CPU: no device sync); on a GPU, one_hot would not check
            if not self.ignores_unlabelled and bool((label < 0).any()):
                raise DataError(f"supervised.ce got {int((label < 0).sum())} unlabelled items (label -1) in a batch of "
                                f"{len(label)}: train on labelled data, or set unlabelled = \"ignore\" to skip them")
            target = F.one_hot(label.to(logits.device).clamp(min=0), self.num_classes)
        elif target.shape[-1] != self.num_classes:
            raise ShapeError(f"supervised.ce has {self.num_classes} classes but the mixed targets have "
                             f"{target.shape[-1]}: the loss's num_classes must match the training data's")
        target = target.to(logits.device)
        if self.ignores_unlabelled and label is not None:
            # a weighted mean rather than a selection: no host sync, and a batch without labelled items gives a zero
            # still in the graph (backward works, DDP sees every parameter take part)
            labelled = (label.to(logits.device) >= 0).to(logits.dtype)
            rows = soft_target_cross_entropy(logits, target, self.cfg.label_smoothing, reduction="none")
            return (rows * labelled).sum() / labelled.sum().clamp(min=1.0), {}
        loss = soft_target_cross_entropy(logits, target, self.cfg.label_smoothing)
        return loss, {}
