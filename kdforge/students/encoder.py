"""The "encoder" student: a foundation model being adapted to a task, the first stage of task-specific distillation.

papers/001 (section 3.1, "adapting VFM to target task", the first stage of its task-oriented transfer) trains a
task head on the foundation model, either with the model frozen or finetuning all of it, and keeps the better;
papers/002 (step 1, "teacher probing") only probes: the encoder stays frozen and a head learns the task on its
features. This student is that model: a teacher table builds the foundation model (any teacher whose ``.model`` is
a timm model: "timm", "embedded"), a head gives its logits, and the run's checkpoint becomes the "adapted" teacher
of the distillation stage (:class:`kdforge.teachers.adapted.AdaptedTeacher`).

The head reads what DINOv2's linear evaluation reads and papers/002 (section 4.1, A.4) keeps for its classification
heads: the CLS tokens of the last ``blocks`` blocks, each after the final norm, concatenated, optionally followed by
the mean of the last block's patch tokens. ``head = "linear"`` is DINOv2's linear classifier (and papers/001's, A.3,
on the final CLS token: ``blocks = 1``). ``head = "mlp"`` is papers/002's MLP head, "input, hidden and output
neurons": Linear(n_in, n_h), an activation, Linear(n_h, C). The paper picks n_h per backbone (one width for ViT-S,
an intermediate width for ViT-L/g, "for a more progressive decrease toward" C) but our copy of its text has lost
the formulas, and it names neither the activation nor any dropout. kdforge's choices, to be set in a recipe where
the paper's width is known: ``mlp_hidden = 0`` takes n_h = n_in, the activation is GELU (the ViTs' own MLP
activation) and there is no dropout.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Annotated, Any, Literal

import torch
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.ranges import NonNegativeInt, PositiveInt, Range
from kdforge.students import Student, StudentOutput, check_images
from kdforge.teachers.timm_utils import (
    block_layer_ids,
    check_input_size,
    is_token_model,
    last_block_tokens,
    split_tokens,
)

__all__ = ["EncoderStudent", "task_head"]


def task_head(kind: str, in_dim: int, num_classes: int, hidden: int = 0) -> nn.Module:
    """The classification head Tensor[B, in_dim] -> Tensor[B, num_classes]: ``"linear"`` (DINOv2's linear
    classifier, weights drawn from N(0, 0.01^2), zero bias) or ``"mlp"`` (Linear(in_dim, hidden) -> GELU ->
    Linear(hidden, num_classes), timm's truncated-normal init with std 0.02, zero biases; ``hidden`` 0: in_dim)."""
    if kind == "linear":
        head = nn.Linear(in_dim, num_classes)
        nn.init.normal_(head.weight, std=0.01)
        nn.init.zeros_(head.bias)
        return head
    if kind != "mlp":
        raise ValueError(f"head must be 'linear' or 'mlp', got {kind!r}")
    hidden = hidden or in_dim
    head = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, num_classes))
    for layer in (head[0], head[2]):
        nn.init.trunc_normal_(layer.weight, std=0.02)
        nn.init.zeros_(layer.bias)
    return head


class EncoderStudent(Student):
    """A teacher's timm model with a task head: probed (``tune = "head"``) or finetuned (``tune = "all"``).

    Under ``tune = "head"`` the backbone's parameters have no gradients (the optimizer holds only the head), the
    backbone stays in eval mode whatever ``.train()`` says and runs without autograd. Under ``tune = "all"`` it
    trains like any student. Inputs are normalised with the wrapped teacher's mean and std.
    """

    name = "encoder"

    @dataclasses.dataclass
    class Config:
        teacher: dict[str, Any]
        """Teacher table of the foundation model to adapt (plugin = "timm" ...); its .model must be a timm model."""
        num_classes: Annotated[int, Range(ge=2)]
        """Classes of the task: the head's outputs, given as StudentOutput.logits."""
        tune: Literal["head", "all"] = "head"
        """"head": probe, the backbone frozen in eval mode (papers/002); "all": finetune it too (papers/001)."""
        head: Literal["linear", "mlp"] = "linear"
        """Task head: a linear classifier (DINOv2, papers/001) or an MLP with one hidden layer (papers/002)."""
        blocks: PositiveInt = 1
        """The head reads the CLS tokens of this many last blocks, concatenated (papers/002: 3 or 4; ViTs only)."""
        pooled_patches: bool = False
        """Also feed the head the mean of the last block's patch tokens (papers/002 does for DomainNet)."""
        mlp_hidden: NonNegativeInt = 0
        """Hidden width of the MLP head; 0: its input width, embed_dim * (blocks + pooled_patches)."""

        def __post_init__(self):
            if not isinstance(self.teacher.get("plugin"), str):
                raise ValueError(
                    "teacher must be a teacher table with a plugin, e.g. teacher = { plugin = \"timm\", model = "
                    "\"vit_large_patch14_dinov2.lvd142m\", pretrained = true }"
                )
            if self.mlp_hidden and self.head != "mlp":
                raise ValueError(f"mlp_hidden = {self.mlp_hidden} sizes the MLP head: set head = \"mlp\" or leave "
                                 "mlp_hidden at 0")

        def runs_code(self) -> list[str]:
            """What the wrapped teacher's settings would run from outside kdforge (its own ``runs_code``)."""
            from kdforge.plugins import get_registry
            from kdforge.recipe.schema import build

            table = dict(self.teacher)
            cls = get_registry().get("teachers", table.pop("plugin"), "student.teacher")
            cfg = build(cls.Config, table, "student.teacher")
            return [f"teacher: {line}" for line in getattr(cfg, "runs_code", lambda: [])()]

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        from kdforge.plugins import create

        teacher = create("teachers", cfg.teacher, "student.teacher")
        model = getattr(teacher, "model", None)
        if not isinstance(model, nn.Module) or not type(model).__module__.startswith("timm."):
            got = "no .model" if model is None else f"a {type(model).__module__}.{type(model).__qualname__}"
            raise KdforgeError(
                f"[student.teacher] the encoder student adapts a timm model, but teacher plugin "
                f"'{cfg.teacher['plugin']}' holds {got}: use a teacher that wraps one in .model (plugin = \"timm\" "
                "with the foundation model's timm name, or \"embedded\")"
            )
        self.model_name = teacher.model_name
        self.backbone = model
        self.embed_dim, self.patch_size = int(teacher.embed_dim), int(teacher.patch_size)
        self._teacher_grid = teacher.grid  # the teacher's grid rules (patch size, or probing a feature map)
        self.register_buffer("mean", teacher.mean.detach().clone(), persistent=False)
        self.register_buffer("std", teacher.std.detach().clone(), persistent=False)
        self._check_blocks(cfg.blocks)
        for p in self.backbone.parameters():  # the teacher froze them all
            p.requires_grad_(cfg.tune == "all")
        in_dim = self.embed_dim * (cfg.blocks + int(cfg.pooled_patches))
        self.head = task_head(cfg.head, in_dim, cfg.num_classes, cfg.mlp_hidden)
        self.train()

    def _is_vit(self) -> bool:
        m = self.backbone
        return is_token_model(m) and hasattr(m, "forward_intermediates") and bool(len(getattr(m, "blocks", ())))

    def _check_blocks(self, n: int) -> None:
        if n == 1:
            return
        if not self._is_vit():
            raise KdforgeError(
                f"[student] blocks = {n} reads the CLS tokens of the last {n} blocks, which needs a timm vision "
                f"transformer (blocks, num_prefix_tokens, forward_intermediates); '{self.model_name}' gives a "
                "feature map: set blocks = 1"
            )
        depth = len(self.backbone.blocks)
        if n > depth:
            raise KdforgeError(
                f"[student] blocks = {n} but '{self.model_name}' has {depth} blocks: set blocks <= {depth}"
            )

    # -- training state -----------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "EncoderStudent":
        """The head follows ``mode``; a probed backbone (tune = "head") stays in eval mode (no dropout, drop path
        or batch-norm updates: its features must not change while the head learns them)."""
        super().train(mode)
        if self.cfg.tune == "head":
            self.backbone.train(False)
        return self

    def no_weight_decay(self) -> set[str]:
        """Nothing of its own: the timm backbone names its tokens and position embedding itself (see
        kdforge.engine.optim), and the head's weights are decayed like any classifier's."""
        return set()

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """({parameter name: layer}, L) for layer-wise lr decay when finetuning a ViT (tune = "all"): the
        backbone numbered like the timm student's model (0 embeddings, b + 1 block b, L + 1 after the blocks), the
        head in layer L + 1 (the full lr)."""
        if self.cfg.tune != "all":
            raise KdforgeError(
                "optim.layer_decay: the encoder student probes (tune = \"head\"), so only its head trains and there "
                "are no layers to decay: set optim.layer_decay = 1.0, or tune = \"all\" to finetune the backbone"
            )
        if not self._is_vit():
            raise KdforgeError(
                f"optim.layer_decay numbers the blocks of a ViT, and the encoder student's '{self.model_name}' is "
                "not one (it gives a feature map): set optim.layer_decay = 1.0"
            )
        return block_layer_ids(self.backbone, "backbone.")

    # -- the contract -------------------------------------------------------------------------------------------------

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        return self._teacher_grid(image_size)

    def _backbone_context(self) -> contextlib.AbstractContextManager:
        return torch.no_grad() if self.cfg.tune == "head" else contextlib.nullcontext()

    def _normalised(self, images: Tensor) -> Tensor:
        check_images(images, f"student {self.model_name}")
        check_input_size(self.backbone, *images.shape[-2:], role="student", model_name=self.model_name)
        return (images - self.mean) / self.std

    def forward(self, images: Tensor, mask: Tensor | None = None) -> StudentOutput:
        """Tensor[B, 3, H, W] in [0, 1] -> :class:`StudentOutput` of the final block (after the final norm) with
        the head's ``logits`` Tensor[B, num_classes]. ``mask`` must be None."""
        if mask is not None:
            raise KdforgeError(
                f"student encoder ({self.model_name}) adapts a foundation model to a task and takes no masked view: "
                "drop the losses that read the masked view (proteus.patch ...) and the [masker] table"
            )
        x = self._normalised(images)
        n = self.cfg.blocks
        with self._backbone_context():
            if n == 1:  # one pass of forward_features: any timm model, CNNs included
                layers = [split_tokens(self.backbone, self.backbone.forward_features(x), tuple(x.shape[-2:]),
                                       model_name=self.model_name)]
            else:
                layers = last_block_tokens(self.backbone, x, n, role="student", model_name=self.model_name)
        cls, patches, grid = layers[-1]
        features = [c for c, _, _ in layers] + ([patches.mean(dim=1)] if self.cfg.pooled_patches else [])
        logits = self.head(torch.cat(features, dim=-1))
        return StudentOutput(cls=cls, patches=patches, grid=tuple(grid), logits=logits)

    def intermediate_layers(self, images: Tensor, n: int) -> list[StudentOutput]:
        """The backbone's last ``n`` blocks' outputs, oldest first, each after the final norm (the last one is
        :meth:`forward`'s cls and patches), without logits: Tensor[B, 3, H, W] in [0, 1] -> n StudentOutputs.
        ViT backbones only."""
        x = self._normalised(images)
        with self._backbone_context():
            layers = last_block_tokens(self.backbone, x, n, role="student", model_name=self.model_name)
        return [StudentOutput(cls=c, patches=p, grid=tuple(g)) for c, p, g in layers]
