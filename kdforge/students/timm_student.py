"""The "timm" student: any timm model trained from scratch (or from timm's weights), with its own classifier or none.

Vision transformers (VisionTransformer, DeiT, EVA ...: ``patch_embed`` and ``num_prefix_tokens``) give their CLS and
patch tokens and can be masked: a forward hook on ``patch_embed`` swaps the masked patch embeddings for the learnable
mask token, so the substitution happens before ``_pos_embed`` adds the position embedding (iBOT / DINOv2) whatever
the family's own ``forward_features`` does next (registers, RoPE, patch dropout, ``dynamic_img_size``, gradient
checkpointing).

Every other model (the small task models of papers/001 and 002: FastViT, MobileViT-V2, ResNet, MobileNet,
ConvNeXt; hierarchical transformers such as Swin) runs in feature-map mode: its last feature map is the patch grid
and the mean of its positions is the CLS. Such a model has no patch tokens to mask, so masked views, kdforge's
attention, relative position biases, per-block outputs and layer-wise lr decay are refused with a message.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Any, Callable, Literal

import torch
from torch import Tensor, nn

from kdforge.errors import KdforgeError, ShapeError
from kdforge.ranges import ColourStd, NonNegativeInt, Range
from kdforge.students import Student, StudentOutput, check_images, check_mask
from kdforge.teachers import patch_grid
from kdforge.teachers.timm_utils import (
    block_layer_ids,
    check_input_size,
    conv_stem_embed,
    create_timm_model,
    is_token_model,
    last_block_tokens,
    model_mean_std,
    model_patch_size,
    output_stride,
    probe_grid,
    split_tokens,
)

__all__ = ["KdforgeAttention", "RelativePositionBias", "TimmStudent"]


class RelativePositionBias(nn.Module):
    """A learned additive attention bias that depends only on the relative position of two patches (BEiT; FD
    shares one across all blocks, papers/004 "shared RPB").

    One value per head for each of the (2 gh - 1)(2 gw - 1) offsets between two patches of a gh x gw grid, and
    three more for the prefix (class / register) tokens: prefix -> patch, patch -> prefix and prefix -> prefix.
    The table starts at zero (no bias). ``forward()`` gives the bias Tensor[H, N, N], N = prefix + gh * gw.
    """

    def __init__(self, grid: tuple[int, int], num_heads: int, num_prefix_tokens: int):
        super().__init__()
        gh, gw = grid
        self.grid, self.num_prefix_tokens = (gh, gw), num_prefix_tokens
        num_offsets = (2 * gh - 1) * (2 * gw - 1)
        self.table = nn.Parameter(torch.zeros(num_offsets + 3, num_heads))
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        rows, cols = rows.reshape(-1), cols.reshape(-1)
        offset = (rows[:, None] - rows[None, :] + gh - 1) * (2 * gw - 1) + (cols[:, None] - cols[None, :] + gw - 1)
        p = num_prefix_tokens
        index = torch.empty(p + gh * gw, p + gh * gw, dtype=torch.long)
        index[p:, p:] = offset
        index[:p, p:] = num_offsets  # a prefix token attending to a patch
        index[p:, :p] = num_offsets + 1  # a patch attending to a prefix token
        index[:p, :p] = num_offsets + 2
        self.register_buffer("index", index, persistent=False)

    @property
    def num_tokens(self) -> int:
        return self.index.shape[0]

    def no_weight_decay(self) -> set[str]:
        """A position encoding, like timm's pos_embed: not decayed (see kdforge.engine.optim)."""
        return {"table"}

    def forward(self) -> Tensor:
        return self.table[self.index].permute(2, 0, 1).contiguous()


class KdforgeAttention(nn.Module):
    """timm's ``Attention`` with the score-softmax-value product computed by :func:`kdforge.ops.attention`.

    It takes over the timm module's own layers under the same names (qkv, q_norm, k_norm, norm, proj, ...), so
    state dicts are interchangeable with attention = "timm" and the two give the same outputs (unless a relative
    position bias is added, whose tables live on the student).
    """

    def __init__(self, attn: nn.Module, backend: str = "auto", bias: Callable[[], Tensor] | None = None):
        """``bias``: a function giving the additive bias Tensor[H, N, N] of every call (a relative position bias's
        forward; the module itself lives on the student, so that one bias can be shared by all blocks)."""
        super().__init__()
        if attn.attn_drop.p > 0:
            raise KdforgeError(
                f"[student] attention = 'kdforge' has no attention dropout but the model has attn_drop = "
                f"{attn.attn_drop.p}: set student.model_kwargs.attn_drop_rate = 0 or attention = 'timm'"
            )
        self.num_heads, self.head_dim, self.attn_dim = attn.num_heads, attn.head_dim, attn.attn_dim
        self.scale = attn.scale
        self.backend = backend
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.norm, self.proj, self.proj_drop = attn.norm, attn.proj, attn.proj_drop
        self.attn_drop = attn.attn_drop  # kept (p == 0) so that the module tree matches timm's
        self.gate = getattr(attn, "gate", None)
        self.bias_fn = bias

    def forward(self, x: Tensor, attn_mask: Tensor | None = None, is_causal: bool = False) -> Tensor:
        from kdforge.ops import attention  # imported here: kdforge.ops pulls in kernels only when used

        if attn_mask is not None or is_causal:
            raise KdforgeError("attention = 'kdforge' supports neither attn_mask nor causal attention")
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, H, N, d]
        q, k = self.q_norm(q), self.k_norm(k)
        bias = self.bias_fn() if self.bias_fn is not None else None
        if bias is not None and bias.shape[-1] != n:
            raise KdforgeError(
                f"[student] the relative position bias covers {bias.shape[-1]} tokens but the input has {n}: feed "
                "images of the size the student was built for (student.model_kwargs.img_size)"
            )
        x = attention(q, k, v, bias=bias, scale=self.scale, backend=self.backend)
        x = x.transpose(1, 2).reshape(b, n, self.attn_dim)
        x = self.norm(x)
        if gate is not None:
            x = x * gate
        return self.proj_drop(self.proj(x))


class TimmStudent(Student):
    """A timm model with its own input normalisation: a ViT with a learnable mask token, or any other model (CNN,
    hybrid, hierarchical) in feature-map mode; with timm's own classifier when ``num_classes`` > 0."""

    name = "timm"

    @dataclasses.dataclass
    class Config:
        model: str = "vit_small_patch14_dinov2"
        """timm model name: a ViT (maskable tokens) or any other model, e.g. fastvit_s12 (feature-map mode)."""
        model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
        """Keyword arguments for timm.create_model (img_size, patch_size, embed_dim, depth, num_heads, reg_tokens ...)."""
        pretrained: bool = False
        """Start from timm's pretrained weights (Proteus starts from random weights: inheriting them hurt, A.8)."""
        num_classes: NonNegativeInt = 0
        """Classes of timm's own classifier, whose output forward gives as logits (0: no classifier, logits None)."""
        drop_path_rate: float = 0.0
        """Stochastic depth rate of the last block (timm decays it linearly from 0 at the first)."""
        attention: Literal["timm", "kdforge"] = "timm"
        """A ViT's attention computation: timm's own, or kdforge.ops.attention (fused kernels), same weights."""
        attention_backend: Literal["auto", "triton", "sdpa", "xformers", "reference"] = "auto"
        """Backend of kdforge.ops.attention when attention = "kdforge"."""
        rel_pos_bias: Literal["none", "shared", "per_block"] = "none"
        """Relative position bias added to the attention scores (needs attention = "kdforge"): one table shared by
        all blocks (FD's default, papers/004) or one per block (BEiT); "none" keeps only the model's pos_embed
        (FD drops it: model_kwargs.pos_embed = "none")."""
        stem: Literal["patch", "conv"] = "patch"
        """ViTs' patch embedding: the single patchify convolution, or a small CNN of the same stride (Xiao et al.
        2021, "Early convolutions help transformers see better": small ViTs learn far faster on small data)."""
        stem_width: Annotated[int, Range(ge=1, le=1024)] = 16
        """Channels of the conv stem's first stage (doubling per stage), with stem = "conv"."""
        mask_token_init: Literal["zeros", "trunc_normal"] = "zeros"
        """Initial mask token of a ViT: zeros (DINOv2) or truncated normal with std 0.02 (iBOT / BEiT)."""
        grad_checkpointing: bool = False
        """Recompute block activations in the backward pass (less memory, ~30% more compute)."""
        mean: tuple[float, float, float] | None = None
        """RGB mean for input normalisation (default: the model's pretrained_cfg)."""
        std: ColourStd | None = None
        """RGB std for input normalisation (default: the model's pretrained_cfg)."""

        def __post_init__(self):
            if not 0.0 <= self.drop_path_rate < 1.0:
                raise ValueError(f"drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
            if self.rel_pos_bias != "none" and self.attention != "kdforge":
                raise ValueError(
                    f"rel_pos_bias = '{self.rel_pos_bias}' is added by kdforge's attention: set attention = 'kdforge'"
                )

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.model_name = cfg.model
        if "num_classes" in cfg.model_kwargs:
            raise KdforgeError(
                "[student] model_kwargs.num_classes: set student.num_classes instead (the student then returns its "
                "classifier's logits)"
            )
        kwargs = {"num_classes": cfg.num_classes, "drop_path_rate": cfg.drop_path_rate, **cfg.model_kwargs}
        if cfg.stem == "conv":
            kwargs["embed_layer"] = conv_stem_embed(cfg.stem_width)
        self.model = create_timm_model(cfg.model, pretrained=cfg.pretrained, kwargs=kwargs, where="student")
        m = self.model
        #: True for a maskable ViT (tokens on a patch grid), False in feature-map mode (CNNs and the like).
        self.token_model = is_token_model(m) and all(hasattr(m, a) for a in ("blocks", "norm", "forward_features"))
        mean, std = model_mean_std(m)
        self.register_buffer("mean", torch.tensor(cfg.mean or mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.std or std).view(1, 3, 1, 1), persistent=False)
        if self.token_model:
            self._init_vit(cfg)
        else:
            self._init_feature_map(cfg)
        if cfg.num_classes and not callable(getattr(m, "forward_head", None)):
            raise KdforgeError(
                f"[student] num_classes = {cfg.num_classes} needs a timm model with forward_head(), which "
                f"'{cfg.model}' lacks: set num_classes = 0 and train a loss head instead (supervised.ce)"
            )

    def _init_feature_map(self, cfg: Config) -> None:
        """Feature-map mode: no mask token; the output stride as patch size; the grid probed per image size."""
        m = self.model
        if not callable(getattr(m, "forward_features", None)):
            raise KdforgeError(
                f"[student] timm model '{cfg.model}' has no forward_features(): kdforge cannot read its features; "
                "choose a timm ViT, CNN or hybrid (fastvit_s12, mobilevitv2_100, resnet50, convnext_tiny ...)"
            )
        if cfg.attention == "kdforge":  # rel_pos_bias needs it (Config), so this refuses both
            raise KdforgeError(
                f"[student] '{cfg.model}' is not a vision transformer (feature-map mode): attention = 'kdforge' and "
                "rel_pos_bias replace a ViT's token attention, which it does not have; set attention = 'timm' and "
                "rel_pos_bias = 'none', or choose a ViT student"
            )
        self.embed_dim = int(m.num_features)
        stride = output_stride(m)
        self._patch_hw = (stride, stride)
        self.patch_size = stride
        self._probed: dict[tuple[int, int], tuple[int, int]] = {}
        if cfg.grad_checkpointing:
            try:
                m.set_grad_checkpointing(True)
            except (AttributeError, AssertionError, NotImplementedError) as exc:
                raise KdforgeError(
                    f"[student] timm model '{cfg.model}' does not support gradient checkpointing ({exc}): set "
                    "grad_checkpointing = false"
                ) from None

    def _feature_map_only(self, what: str, fix: str) -> KdforgeError:
        return KdforgeError(
            f"student {self.model_name} is not a vision transformer (it runs in feature-map mode: its patches are the "
            f"last feature map of a CNN or hierarchical model): {what}; {fix}"
        )

    def _init_vit(self, cfg: Config) -> None:
        m = self.model
        self.embed_dim = int(getattr(m, "num_features", m.embed_dim))
        self._patch_hw = model_patch_size(m)
        self.patch_size = self._patch_hw[0]

        self.mask_token = nn.Parameter(torch.zeros(1, 1, self.embed_dim))
        if cfg.mask_token_init == "trunc_normal":
            nn.init.trunc_normal_(self.mask_token, std=0.02)
        self._pending_mask: Tensor | None = None
        m.patch_embed.register_forward_hook(self._substitute_masked)

        if cfg.attention == "kdforge":
            self._use_kdforge_attention(cfg.attention_backend, cfg.rel_pos_bias)
        if cfg.grad_checkpointing:
            m.set_grad_checkpointing(True)

    def _use_kdforge_attention(self, backend: str, rel_pos_bias: str) -> None:
        from timm.layers import Attention

        blocks = list(self.model.blocks)
        kinds = {type(b.attn).__name__ for b in blocks if not isinstance(getattr(b, "attn", None), Attention)}
        if kinds:
            raise KdforgeError(
                f"[student] attention = 'kdforge' replaces timm.layers.Attention, but '{self.model_name}' uses "
                f"{', '.join(sorted(kinds))} (RoPE or relative-position attention): set attention = 'timm'"
            )
        biases: list[Callable[[], Tensor] | None] = [None] * len(blocks)
        if rel_pos_bias != "none":
            grid = tuple(int(g) for g in self.model.patch_embed.grid_size)
            heads, prefix = blocks[0].attn.num_heads, self.model.num_prefix_tokens

            def make() -> RelativePositionBias:
                return RelativePositionBias(grid, heads, prefix)

            if rel_pos_bias == "shared":
                self.rel_pos_bias = make()
                biases = [self.rel_pos_bias.forward] * len(blocks)
            else:
                self.rel_pos_biases = nn.ModuleList(make() for _ in blocks)
                biases = [b.forward for b in self.rel_pos_biases]
        for blk, bias in zip(blocks, biases):
            blk.attn = KdforgeAttention(blk.attn, backend, bias)

    def _substitute_masked(self, module: nn.Module, args, out):
        mask = self._pending_mask
        if mask is None:
            return out
        tokens = out[0] if isinstance(out, tuple) else out  # some embedders also return their grid size
        # [B, N, D], or [B, gh, gw, D] with dynamic_img_size: the mask follows the token layout either way
        m = mask.reshape(tokens.shape[:-1]).unsqueeze(-1)
        tokens = torch.where(m, self.mask_token.to(tokens.dtype), tokens)
        return (tokens, *out[1:]) if isinstance(out, tuple) else tokens

    def no_weight_decay(self) -> set[str]:
        """The mask token, like timm's class token, is not decayed (the timm model names its own, see
        kdforge.engine.optim)."""
        return {"mask_token"} if self.token_model else set()

    def layer_ids(self) -> tuple[dict[str, int], int]:
        """({parameter name: layer}, L) for layer-wise lr decay (:mod:`kdforge.engine.optim`), L = number of blocks:
        layer 0 for what the model registers before its blocks (patch embedding, class / register tokens, position
        embedding) and the mask token, b + 1 for block b and its own relative position bias, L + 1 for what comes
        after the blocks (the final norm) and the shared relative position bias (as FD's released fine-tuning
        code, whose ``get_vit_layer`` puts ``rel_pos_bias`` in the top layer). ViTs only."""
        if not self.token_model:
            raise self._feature_map_only(
                "layer-wise lr decay numbers the blocks of a ViT, and this model has none",
                "set optim.layer_decay = 1.0",
            )
        ids, num_layers = block_layer_ids(self.model, "model.")
        ids["mask_token"] = 0
        for b, bias in enumerate(getattr(self, "rel_pos_biases", ())):
            ids.update({f"rel_pos_biases.{b}.{n}": b + 1 for n, _ in bias.named_parameters()})
        if hasattr(self, "rel_pos_bias"):
            ids.update({f"rel_pos_bias.{n}": num_layers + 1 for n, _ in self.rel_pos_bias.named_parameters()})
        return ids, num_layers

    def remap_state_dict(self, weights: dict[str, Tensor]) -> dict[str, Tensor]:
        """The weights of this student with a shared relative position bias (``rel_pos_bias.table``) for this one
        with one per block: the shared table copied into every block's (FD's released fine-tuning starts its
        per-block biases from the distilled shared one, ``remap_pretrained_keys_vit``). Any other weights are
        returned as they are (:func:`kdforge.engine.runs.load_student_state` then compares them key by key)."""
        if "rel_pos_bias.table" not in weights or not hasattr(self, "rel_pos_biases"):
            return weights
        weights = dict(weights)
        shared = weights.pop("rel_pos_bias.table")
        weights.update({f"rel_pos_biases.{b}.table": shared.clone() for b in range(len(self.rel_pos_biases))})
        return weights

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if not self.token_model:  # the grid depends on the model's padding and strides: ask it once per size
            if (h, w) not in self._probed:
                self._probed[(h, w)] = probe_grid(self.model, h, w, model_name=self.model_name)
            return self._probed[(h, w)]
        pe = self.model.patch_embed
        if getattr(pe, "dynamic_img_pad", False):
            return tuple(int(v) for v in pe.dynamic_feat_size((h, w)))
        return patch_grid(self.model_name, "student", (h, w), self._patch_hw)

    def _checked_grid(self, images: Tensor) -> tuple[int, int]:
        """The patch grid of ``images`` Tensor[B, 3, H, W], after checking their type, shape and size."""
        check_images(images, f"student {self.model_name}")
        h, w = images.shape[-2:]
        check_input_size(self.model, h, w, role="student", model_name=self.model_name)
        return self.grid((h, w))

    def forward(self, images: Tensor, mask: Tensor | None = None) -> StudentOutput:
        """Tensor[B, 3, H, W] in [0, 1] (and, for a ViT, BoolTensor[B, N] mask) -> :class:`StudentOutput`, with
        the classifier's logits Tensor[B, num_classes] when ``num_classes`` > 0."""
        if not self.token_model:
            return self._forward_feature_map(images, mask)
        grid = self._checked_grid(images)
        h, w = images.shape[-2:]
        x = (images - self.mean) / self.std
        if mask is not None:
            check_mask(mask, images.shape[0], grid, f"student {self.model_name}")
            mask = mask.to(images.device)
        self._pending_mask = mask
        try:
            y = self.model.forward_features(x)
        finally:
            self._pending_mask = None
        cls, patches, grid = split_tokens(self.model, y, (h, w), model_name=self.model_name)
        return StudentOutput(cls=cls, patches=patches, grid=grid, logits=self._logits(y))

    def _logits(self, features: Tensor) -> Tensor | None:
        """timm's classifier on a ``forward_features`` output (None without one)."""
        return self.model.forward_head(features) if self.cfg.num_classes else None

    def _forward_feature_map(self, images: Tensor, mask: Tensor | None) -> StudentOutput:
        if mask is not None:
            raise self._feature_map_only(
                "a CNN has no patch tokens to mask and no mask token",
                "drop the losses that read the masked view (proteus.patch ...) and the [masker] table, or choose a "
                "ViT student",
            )
        check_images(images, f"student {self.model_name}")
        h, w = images.shape[-2:]
        y = self.model.forward_features((images - self.mean) / self.std)
        cls, patches, grid = split_tokens(self.model, y, (h, w), model_name=self.model_name)
        if patches.shape[-1] != self.embed_dim:
            raise ShapeError(
                f"student {self.model_name}: forward_features gave {patches.shape[-1]} channels but the model's "
                f"num_features is {self.embed_dim}; this timm model's last feature map is not its feature width"
            )
        self._probed.setdefault((h, w), grid)
        return StudentOutput(cls=cls, patches=patches, grid=grid, logits=self._logits(y))

    def intermediate_layers(self, images: Tensor, n: int) -> list[StudentOutput]:
        """The last ``n`` blocks' outputs, oldest first, each after the final norm like :meth:`forward`'s (whose
        output equals the last item): Tensor[B, 3, H, W] in [0, 1] -> n StudentOutputs. No mask. ViTs only."""
        if not self.token_model:
            raise self._feature_map_only(
                "it has no per-block tokens to give",
                "evaluate it with an evaluator that reads the final features (knn, linear_probe), not linear_dinov2",
            )
        self._checked_grid(images)
        x = (images - self.mean) / self.std
        layers = last_block_tokens(self.model, x, n, role="student", model_name=self.model_name)
        return [StudentOutput(cls=cls, patches=patches, grid=grid) for cls, patches, grid in layers]
