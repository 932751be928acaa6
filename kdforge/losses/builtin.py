"""Built-in losses: Proteus' token / feature / patch objectives (papers/000 sec. 3.2), FD's whitened
feature-map loss (papers/004 eq. 1), supervised cross-entropy (:mod:`kdforge.losses.supervised`) and the losses of
task-specific distillation (:mod:`kdforge.losses.task`: distill.kl, contrastive.global, cosine.patch). The
patch-level math of Proteus and FD runs in :func:`kdforge.ops.whitened_loss`."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
from torch import nn

from kdforge.errors import RecipeError
from kdforge.losses import DistillLoss
from kdforge.losses.supervised import SupervisedCELoss
from kdforge.losses.task import ContrastiveGlobalLoss, CosinePatchLoss, DistillKLLoss
from kdforge.ops import masked_gather, whitened_loss
from kdforge.plugins import hookimpl
from kdforge.ranges import PositiveFloat
from kdforge.students import ProjectionHead

Backend = Literal["auto", "reference", "triton", "ext"]


class ProteusLoss(DistillLoss):
    """Base of the Proteus objectives: each owns a :class:`ProjectionHead` (Proteus A.9) from the student's width
    to the teacher's, trained with the student."""

    def __init__(self, cfg, *, student_dim, teacher_dim):
        super().__init__(cfg, student_dim=student_dim, teacher_dim=teacher_dim)
        self.head = ProjectionHead(student_dim, teacher_dim)


class ProteusTokenLoss(ProteusLoss):
    """MSE between the projected student CLS token and the teacher's CLS token."""

    name = "proteus.token"

    @dataclasses.dataclass
    class Config:
        backend: Backend = "auto"
        """Kernel backend of kdforge.ops.whitened_loss."""

    def forward(self, student_out, teacher_out, batch):
        pred = self.head(student_out.cls)
        loss = whitened_loss(pred, teacher_out.cls, loss="mse", whiten=False, backend=self.cfg.backend)
        return loss, {}


class ProteusFeatureLoss(ProteusLoss):
    """MSE between the student's projected token map [CLS; patches] and the teacher's, position by position, over
    every element (the released code's feature objective: the CLS row through the token objective's head, the
    patch rows through this loss's own head)."""

    name = "proteus.feature"
    needs_patches = True

    @dataclasses.dataclass
    class Config:
        cls: Literal["token_head", "own_head", "exclude"] = "token_head"
        """Row 0 of the map is the CLS token, projected by the recipe's proteus.token head (as released), or by
        this loss's own head; "exclude" compares the patch tokens only."""
        whiten: bool = False
        """Normalise teacher tokens by a LayerNorm without affine first (FD-style targets)."""
        backend: Backend = "auto"
        """Kernel backend of kdforge.ops.whitened_loss."""

    def bind(self, losses, where):
        if self.cfg.cls != "token_head":
            return
        tokens = [loss for loss in losses.values() if isinstance(loss, ProteusTokenLoss)]
        if len(tokens) != 1:
            raise RecipeError(
                f"[{where}] cls = 'token_head' projects the CLS row with the head of the recipe's proteus.token loss, "
                f"but the recipe has {len(tokens)} proteus.token losses: add one, or set cls = 'own_head' or 'exclude'"
            )
        # A reference, not a submodule: the token loss owns the head (its parameters, state dict and weight decay).
        object.__setattr__(self, "_cls_head", tokens[0].head)

    def forward(self, student_out, teacher_out, batch):
        pred, target = self.head(student_out.patches), teacher_out.patches
        if self.cfg.cls != "exclude":
            if self.cfg.cls == "token_head" and "_cls_head" not in self.__dict__:
                raise RuntimeError("proteus.feature with cls = 'token_head' was not bound to a proteus.token loss: "
                                   "call bind(losses, where) after building the recipe's losses")
            head = self.__dict__["_cls_head"] if self.cfg.cls == "token_head" else self.head
            pred = torch.cat([head(student_out.cls).unsqueeze(1), pred], dim=1)
            target = torch.cat([teacher_out.cls.unsqueeze(1), target], dim=1)
        loss = whitened_loss(pred, target, loss="mse", whiten=self.cfg.whiten, backend=self.cfg.backend)
        return loss, {}


class ProteusPatchLoss(ProteusLoss):
    """MSE on the masked positions: the student sees the masked view, the targets are the teacher's tokens of the
    unmasked view at those positions (iBOT-style masked patch prediction)."""

    name = "proteus.patch"
    needs_patches = True
    view = "masked"

    @dataclasses.dataclass
    class Config:
        whiten: bool = False
        """Normalise teacher tokens by a LayerNorm without affine first."""
        backend: Backend = "auto"
        """Kernel backend of kdforge.ops.whitened_loss and masked_gather."""

    def forward(self, student_out, teacher_out, batch):
        mask, index = batch["mask"], batch.get("mask_index")
        # Project only the masked rows: the head's cost then scales with the mask ratio. The engine sends the rows'
        # indices with the mask (no count on the device, so no synchronisation).
        rows = masked_gather(student_out.patches, mask, backend=self.cfg.backend, index=index)
        target = masked_gather(teacher_out.patches, mask, backend=self.cfg.backend, index=index)
        pred = self.head(rows)
        if pred.shape[0] == 0:
            # No image of this batch was masked: a zero that keeps the head in the graph (DDP needs every
            # parameter to take part in each step's backward).
            return pred.sum() * 0.0, {"masked_patches": 0.0}
        loss = whitened_loss(pred, target, loss="mse", whiten=self.cfg.whiten, backend=self.cfg.backend)
        return loss, {"masked_patches": float(pred.shape[0])}


class FDFeatureLoss(DistillLoss):
    """Feature Distillation (papers/004): smooth-L1 (beta 2) between a 1x1 projection of the student's feature map
    and the teacher's feature map whitened by a LayerNorm without affine, over every token [CLS; patches] (the
    released loss covers the whole 197-token map of a ViT-B/16)."""

    name = "fd.feature"
    needs_patches = True

    @dataclasses.dataclass
    class Config:
        include_cls: bool = True
        """Row 0 of both maps is the CLS token (as released); false compares the patch tokens only."""
        beta: PositiveFloat = 2.0
        """Smooth-L1 beta (FD's released code uses 2.0)."""
        eps: PositiveFloat = 1e-5
        """LayerNorm epsilon of the whitening (torch's default)."""
        backend: Backend = "auto"
        """Kernel backend of kdforge.ops.whitened_loss."""

    def __init__(self, cfg, *, student_dim, teacher_dim):
        super().__init__(cfg, student_dim=student_dim, teacher_dim=teacher_dim)
        self.head = nn.Linear(student_dim, teacher_dim)  # the 1x1 convolution over the token map

    def forward(self, student_out, teacher_out, batch):
        tokens, target = student_out.patches, teacher_out.patches
        if self.cfg.include_cls:
            tokens = torch.cat([student_out.cls.unsqueeze(1), tokens], dim=1)
            target = torch.cat([teacher_out.cls.unsqueeze(1), target], dim=1)
        loss = whitened_loss(
            self.head(tokens), target, loss="smooth_l1", beta=self.cfg.beta, whiten=True, eps=self.cfg.eps,
            backend=self.cfg.backend,
        )
        return loss, {}


@hookimpl
def kdforge_register_losses():
    return [ProteusTokenLoss, ProteusFeatureLoss, ProteusPatchLoss, FDFeatureLoss, SupervisedCELoss, DistillKLLoss,
            ContrastiveGlobalLoss, CosinePatchLoss]
