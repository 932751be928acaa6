"""Losses of task-specific distillation: matching a task-adapted teacher's predictions (papers/002 sec. 3.1) and the
task-agnostic feature-matching baselines of task-oriented transfer (papers/001 sec. A.4).

- ``distill.kl``: Hinton's temperature-scaled KL divergence between the teacher's and the student's class
  predictions (papers/002 eq. 3-4), on every image of the batch, labelled or not.
- ``contrastive.global``: InfoNCE between linearly projected global features (CLS tokens) of student and teacher,
  the other images of the batch as negatives (papers/001 A.4, after Tian et al. 2020).
- ``cosine.patch``: one minus the cosine similarity between the student's linearly projected patch tokens and the
  teacher's (papers/001 A.4).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import RecipeError, ShapeError
from kdforge.losses import DistillLoss
from kdforge.ranges import PositiveFloat, PositiveInt

__all__ = ["ContrastiveGlobalLoss", "CosinePatchLoss", "DistillKLLoss"]


def _working_precision(x: Tensor) -> Tensor:
    """``x`` in float32, or float64 if it already is: softmax and normalisation must not run in half precision."""
    return x if x.dtype == torch.float64 else x.float()


def _needs_teacher(name: str, teacher_dim: int | None) -> int:
    if teacher_dim is None:
        raise RecipeError(f"{name} compares the student with a teacher but the recipe has none: add a [teacher] table")
    return teacher_dim


class DistillKLLoss(DistillLoss):
    """``T^2 KL(softmax(t / T) || softmax(s / T))`` between the teacher's logits t and the student's s, averaged over
    the batch's items (papers/002 eq. 3-4, Hinton et al. 2015; T^2 keeps the gradients' scale independent of T).

    Every item counts, labelled or not (label -1): the images of eq. 3 need no labels. Reads
    ``student_out.logits`` (the student's own classifier) and ``teacher_out.logits`` (a teacher adapted to the
    task), both Tensor[B, C]; computed in float32 (float64 inputs stay float64). The teacher gets no gradient.
    """

    name = "distill.kl"
    reads_teacher = True
    needs_labels = False

    @dataclasses.dataclass
    class Config:
        temperature: PositiveFloat = 1.0
        """Softmax temperature T of both distributions; the loss is scaled by T^2 (papers/002 eq. 4)."""

    def forward(self, student_out, teacher_out, batch):
        s = getattr(student_out, "logits", None)
        t = getattr(teacher_out, "logits", None) if teacher_out is not None else None
        if s is None:
            raise ShapeError("distill.kl matches the student's class predictions but the student gives no logits: "
                             "give the student a classifier: student.num_classes = C (the task's classes)")
        if t is None:
            raise ShapeError("distill.kl matches the teacher's class predictions but the teacher gives no logits: "
                             "distil a teacher adapted to the task: [teacher] plugin = \"adapted\" reading the adapt "
                             "stage's run")
        if s.ndim != 2 or t.ndim != 2 or s.shape[0] != t.shape[0]:
            raise ShapeError(f"distill.kl expects student and teacher logits as Tensor[B, C], got student "
                             f"{tuple(s.shape)} and teacher {tuple(t.shape)}")
        if s.shape[1] != t.shape[1]:
            raise ShapeError(f"distill.kl: the student's classifier has {s.shape[1]} classes but the teacher's has "
                             f"{t.shape[1]}: set student.num_classes = {t.shape[1]} (the adapted teacher's task)")
        temperature = self.cfg.temperature
        log_p_s = F.log_softmax(_working_precision(s) / temperature, dim=-1)
        log_p_t = F.log_softmax(_working_precision(t.detach()).to(log_p_s.dtype) / temperature, dim=-1)
        # KL(p_t || p_s) per item, from log-probabilities: exact where p_t underflows to 0
        kl = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(dim=-1)
        return temperature**2 * kl.mean(), {}


class ContrastiveGlobalLoss(DistillLoss):
    """InfoNCE between global features (papers/001 A.4's contrastive loss, after Tian et al. 2020, with in-batch
    negatives): the student's CLS token through Linear(student_dim, dim), the teacher's through Linear(teacher_dim,
    dim) (or as is, ``project_teacher = false``), both L2-normalised; logits ``s @ t.T / temperature`` Tensor[B, B];
    cross-entropy with image i's teacher feature as the target of student row i. ``symmetric`` averages this with
    the teacher -> student direction (the columns). Both projections train with the student; the teacher's features
    get no gradient. A batch of one image has no negatives and gives 0.
    """

    name = "contrastive.global"

    @dataclasses.dataclass
    class Config:
        dim: PositiveInt = 768
        """Width of the shared embedding space (papers/001: 768, CLIP's embedding width)."""
        temperature: PositiveFloat = 0.07
        """Temperature dividing the cosine similarities (Tian et al. 2020 / CLIP's initial 0.07)."""
        project_teacher: bool = True
        """Project the teacher's feature too (papers/001 with DINOv2); false compares with it as is (with CLIP, whose
        embedding is already the target space), and then dim must equal the teacher's width."""
        symmetric: bool = False
        """Also the teacher -> student direction (each teacher feature against the batch's student features),
        averaged with student -> teacher."""

    def __init__(self, cfg, *, student_dim, teacher_dim):
        super().__init__(cfg, student_dim=student_dim, teacher_dim=teacher_dim)
        teacher_dim = _needs_teacher(self.name, teacher_dim)
        self.student_proj = nn.Linear(student_dim, cfg.dim)
        if cfg.project_teacher:
            self.teacher_proj = nn.Linear(teacher_dim, cfg.dim)
        elif cfg.dim != teacher_dim:
            raise RecipeError(f"contrastive.global with project_teacher = false compares with the teacher's features "
                              f"as they are, {teacher_dim} wide, but dim = {cfg.dim}: set dim = {teacher_dim}, or "
                              "project_teacher = true")
        else:
            self.teacher_proj = None

    def forward(self, student_out, teacher_out, batch):
        s_cls, t_cls = student_out.cls, teacher_out.cls.detach()
        if s_cls.shape[0] != t_cls.shape[0]:
            raise ShapeError(f"contrastive.global: the student gives {s_cls.shape[0]} features but the teacher "
                             f"{t_cls.shape[0]}: both must see the same batch")
        s = F.normalize(_working_precision(self.student_proj(s_cls)), dim=-1)
        t = t_cls if self.teacher_proj is None else self.teacher_proj(t_cls)
        t = F.normalize(_working_precision(t).to(s.dtype), dim=-1)
        logits = s @ t.T / self.cfg.temperature
        positives = torch.arange(logits.shape[0], device=logits.device)
        loss = F.cross_entropy(logits, positives)
        if self.cfg.symmetric:
            loss = (loss + F.cross_entropy(logits.T, positives)) / 2
        return loss, {}


class CosinePatchLoss(DistillLoss):
    """Mean over every patch of ``1 - cos(W s + b, t)`` (papers/001 A.4's cosine similarity loss on DINOv2 patch
    features): the student's patch tokens Tensor[B, N, Ds] through Linear(student_dim, teacher_dim), compared
    position by position with the teacher's Tensor[B, N, Dt]. The grids must agree; with
    ``train.resize_teacher_grid = true`` the engine resizes the teacher's token grid to the student's first (as the
    paper resizes DINOv2's patch features to the target model's resolution). The teacher gets no gradient.
    """

    name = "cosine.patch"
    needs_patches = True

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, cfg, *, student_dim, teacher_dim):
        super().__init__(cfg, student_dim=student_dim, teacher_dim=teacher_dim)
        self.proj = nn.Linear(student_dim, _needs_teacher(self.name, teacher_dim))

    def forward(self, student_out, teacher_out, batch):
        s, t = student_out.patches, teacher_out.patches.detach()
        if s.shape[:2] != t.shape[:2]:
            raise ShapeError(f"cosine.patch compares patch i of the student with patch i of the teacher, but the "
                             f"student gives {tuple(s.shape[:2])} [B, N] and the teacher {tuple(t.shape[:2])}: set "
                             "train.resize_teacher_grid = true, or use models with one patch grid")
        pred = _working_precision(self.proj(s))
        cos = F.cosine_similarity(pred, _working_precision(t).to(pred.dtype), dim=-1)
        return (1.0 - cos).mean(), {}
