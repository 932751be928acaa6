"""What the timm teacher, the embedded teacher and the timm student share: building a timm model with errors a
user can act on, reading its patch size and image statistics, checking input sizes, splitting its tokens, and the
convolutional stem of small ViTs (:func:`conv_stem_embed`).

timm is imported inside the functions: building the plugin registry (``kdforge plugins``) should not pay for it.
"""

from __future__ import annotations

import difflib
import functools
import math
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.errors import KdforgeError, ShapeError

__all__ = [
    "create_timm_model",
    "model_mean_std",
    "model_patch_size",
    "check_input_size",
    "split_tokens",
    "pool_patches",
    "last_block_tokens",
    "is_token_model",
    "output_stride",
    "probe_grid",
    "block_layer_ids",
]


def create_timm_model(name: str, *, pretrained: bool, kwargs: dict[str, Any], where: str) -> nn.Module:
    """``timm.create_model(name, pretrained=pretrained, **kwargs)`` with KdforgeErrors for an unknown name,
    bad keyword arguments and weights that cannot be fetched."""
    import timm

    if not timm.is_model(name):
        base = name.split(".")[0]
        close = difflib.get_close_matches(base, timm.list_models(), n=3, cutoff=0.6)
        hint = f"did you mean {', '.join(close)}?" if close else "list names with python -c \"import timm; print(timm.list_models('vit_*'))\""
        raise KdforgeError(f"[{where}] model = '{name}' is not a timm model: {hint}")
    try:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    except (TypeError, ValueError, AssertionError, ZeroDivisionError, OverflowError) as exc:
        raise KdforgeError(f"[{where}] timm model '{name}' rejected model_kwargs {kwargs}: "
                           f"{type(exc).__name__}: {exc}") from exc
    except (OSError, RuntimeError) as exc:
        if not pretrained:  # no weights to fetch: the arguments built an impossible model (negative sizes ...)
            raise KdforgeError(f"[{where}] timm model '{name}' could not be built with model_kwargs {kwargs}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
        raise KdforgeError(
            f"[{where}] could not load pretrained weights for timm model '{name}' ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Without network access, download the weights elsewhere "
            "and set checkpoint = \"/path/to/model.safetensors\" (pretrained is then ignored), or copy the Hugging "
            "Face cache (~/.cache/huggingface) here and set HF_HUB_OFFLINE=1."
        ) from exc


def model_mean_std(model: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The RGB mean/std the model's pretrained weights expect (timm's pretrained_cfg), for images in [0, 1]."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    return tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"])


def model_patch_size(model: nn.Module) -> tuple[int, int] | None:
    """(ph, pw) of a patch-embedding model (ViT family), or None for models without ``patch_embed.patch_size``."""
    pe = getattr(model, "patch_embed", None)
    ps = getattr(pe, "patch_size", None)
    if ps is None:
        return None
    return (int(ps), int(ps)) if isinstance(ps, int) else (int(ps[0]), int(ps[1]))


def is_token_model(model: nn.Module) -> bool:
    """True for timm vision transformers whose tokens map onto a patch grid (``patch_embed.patch_size`` and
    ``num_prefix_tokens``); False for CNNs and hierarchical models (Swin), whose output is a feature map."""
    return hasattr(model, "num_prefix_tokens") and model_patch_size(model) is not None


def output_stride(model: nn.Module) -> int:
    """Pixels per output position of a timm model's last feature map (``feature_info``'s reduction: 32 for a
    ResNet, MobileNet or Swin, whose patch_embed is only its stem), 0 where the model does not say."""
    return int((getattr(model, "feature_info", None) or [{}])[-1].get("reduction", 0))


def check_input_size(model: nn.Module, height: int, width: int, *, role: str, model_name: str) -> None:
    """ShapeError when a fixed-size timm model gets images of another size (timm would fail with a bare assert)."""
    pe = getattr(model, "patch_embed", None)
    img_size = getattr(pe, "img_size", None)
    if img_size is None or not getattr(pe, "strict_img_size", False):
        return
    if tuple(img_size) != (height, width):
        raise ShapeError(
            f"{role} {model_name} was built for {img_size[0]}x{img_size[1]} px images but got {height}x{width}: "
            f"set {role}.model_kwargs.img_size = {height} (or dynamic_img_size = true), or change the image size"
        )


def feature_grid(model: nn.Module, height: int, width: int) -> tuple[int, int] | None:
    """The token grid a patch-embedding model produces for (height, width), honouring dynamic padding."""
    pe = getattr(model, "patch_embed", None)
    if pe is None or model_patch_size(model) is None:
        return None
    if hasattr(pe, "dynamic_feat_size"):
        gh, gw = pe.dynamic_feat_size((height, width))
        return int(gh), int(gw)
    ph, pw = model_patch_size(model)
    return height // ph, width // pw


def split_tokens(model: nn.Module, y: Tensor, image_hw: tuple[int, int], *, model_name: str):
    """Split a timm ``forward_features`` output into (cls Tensor[B, D], patches Tensor[B, N, D], (gh, gw)).

    Token outputs Tensor[B, P + N, D] (P = ``num_prefix_tokens``: CLS, then registers) keep the CLS and drop the
    registers; models without a CLS token get their own global pooling of the patch tokens (:func:`pool_patches`)
    as their CLS, feature maps (NCHW or NHWC per ``model.output_fmt``) the mean patch token. Models whose final
    norm follows the pooling (``fc_norm``) give their pre-logits feature as CLS and fc_norm-ed patch tokens.
    """
    if y.ndim == 4:
        if str(getattr(model, "output_fmt", "NCHW")) in ("NHWC", "Format.NHWC"):
            y = y.permute(0, 3, 1, 2)
        b, d, gh, gw = y.shape
        patches = y.flatten(2).transpose(1, 2)
        return patches.mean(dim=1), patches, (gh, gw)
    if y.ndim != 3:
        raise ShapeError(f"{model_name}: forward_features gave {tuple(y.shape)}, expected tokens [B, T, D] or a map")
    num_prefix = int(getattr(model, "num_prefix_tokens", 0))
    has_cls = bool(getattr(model, "has_class_token", getattr(model, "cls_token", None) is not None)) and num_prefix > 0
    patches = y[:, num_prefix:]
    grid = feature_grid(model, *image_hw)
    if grid is None:
        side = int(round(patches.shape[1] ** 0.5))
        if side * side != patches.shape[1]:
            raise ShapeError(
                f"{model_name}: cannot tell the patch grid of {patches.shape[1]} tokens (no patch_embed.patch_size "
                "and not a square number)"
            )
        grid = (side, side)
    if grid[0] * grid[1] != patches.shape[1]:
        raise ShapeError(
            f"{model_name}: expected {grid[0]}x{grid[1]} = {grid[0] * grid[1]} patch tokens after {num_prefix} prefix "
            f"token(s), got {patches.shape[1]}; this timm model's tokens do not map onto its patch grid"
        )
    if norm_after_pool(model):
        # the final norm follows the pooling (fc_norm): the model's global feature is its pooled, normed vector and
        # its tokens are normed by that same layer, so that both are "after the final norm" like any other ViT's
        return model.forward_head(y, pre_logits=True), model.fc_norm(patches), grid
    cls = y[:, 0] if has_cls else pool_patches(model, patches)
    return cls, patches, grid


def norm_after_pool(model: nn.Module) -> bool:
    """True for timm ViTs built with ``fc_norm`` (global_pool avg / max): ``norm`` is an Identity and the final
    LayerNorm is applied after pooling, so ``forward_features`` returns un-normalised tokens."""
    fc_norm, norm = getattr(model, "fc_norm", None), getattr(model, "norm", None)
    return (
        isinstance(fc_norm, nn.Module) and not isinstance(fc_norm, nn.Identity)
        and isinstance(norm, nn.Identity) and hasattr(model, "forward_head")
    )


def pool_patches(model: nn.Module, patches: Tensor) -> Tensor:
    """The global feature of a model without a CLS token: its own ``global_pool`` ("max", "avgmax") over the patch
    tokens, else their mean. Tensor[B, N, D] -> Tensor[B, D]."""
    pool = getattr(model, "global_pool", "avg")
    if pool == "max":
        return patches.amax(dim=1)
    if pool == "avgmax":
        return 0.5 * (patches.mean(dim=1) + patches.amax(dim=1))
    return patches.mean(dim=1)


def last_block_tokens(model: nn.Module, x: Tensor, n: int, *, role: str, model_name: str):
    """The outputs of the last ``n`` blocks of a timm ViT on normalised images ``x`` Tensor[B, 3, H, W], each after
    the final norm and split like :func:`split_tokens` (CLS, or the model's own pooling without one; patches without
    registers): a list of (cls Tensor[B, D], patches Tensor[B, N, D], (gh, gw)), oldest block first, so that the
    last item equals the split of ``forward_features``. One pass through timm's ``forward_intermediates``.

    Raises KdforgeError, naming ``role`` and ``model_name``, for models without token blocks (CNNs, Swin) or with
    fewer than ``n`` blocks.
    """
    depth = len(getattr(model, "blocks", None) or ())
    if not (hasattr(model, "forward_intermediates") and depth and is_token_model(model)):
        raise KdforgeError(
            f"{role} {model_name} gives no per-block tokens: that needs a timm vision transformer (blocks, "
            "num_prefix_tokens, forward_intermediates), not a CNN or a hierarchical model"
        )
    if not 1 <= n <= depth:
        raise KdforgeError(f"{role} {model_name} has {depth} block(s): cannot take the last {n}")
    layers = model.forward_intermediates(
        x, indices=n, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
    )
    out = []
    for item in layers:
        spatial, prefix = item if isinstance(item, tuple) else (item, None)
        tokens = spatial if prefix is None else torch.cat([prefix, spatial], dim=1)
        out.append(split_tokens(model, tokens, tuple(x.shape[-2:]), model_name=model_name))
    return out


@torch.no_grad()
def probe_grid(model: nn.Module, height: int, width: int, *, model_name: str) -> tuple[int, int]:
    """The output grid of a model without a patch embedding (CNNs), by running it once on a blank image.

    The pass runs in eval mode (each module's mode is restored afterwards): a training model's batch norms would
    otherwise fold the blank image into their running statistics, or fail on a 1 x 1 map of one image."""
    param = next(model.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        y = model.forward_features(torch.zeros(1, 3, height, width, device=device))
    finally:
        for m, training in modes:
            m.training = training
    return split_tokens(model, y, (height, width), model_name=model_name)[2]


def block_layer_ids(model: nn.Module, prefix: str) -> tuple[dict[str, int], int]:
    """({``prefix`` + parameter name: layer}, L) of a timm ViT with L ``blocks``, for layer-wise lr decay
    (:mod:`kdforge.engine.optim`): layer 0 for what the model registers before its blocks (patch embedding, class /
    register tokens, position embedding), b + 1 for block b, L + 1 for what comes after them (final norm, head)."""
    blocks = list(model.blocks)
    num_layers = len(blocks)
    of_block = {id(p): b + 1 for b, blk in enumerate(blocks) for p in blk.parameters()}
    ids: dict[str, int] = {}
    seen_block = False
    for name, p in model.named_parameters():
        if id(p) in of_block:
            seen_block = True
            ids[f"{prefix}{name}"] = of_block[id(p)]
        else:
            ids[f"{prefix}{name}"] = num_layers + 1 if seen_block else 0
    return ids, num_layers


def conv_stem_embed(width: int):
    """A timm ``embed_layer``: PatchEmbed whose single stride-p patchify convolution is replaced by a small CNN of
    the same total stride (Xiao et al. 2021, "Early convolutions help transformers see better").

    For patch size p = 2^k: k stages of [conv (5x5 first, then 3x3) + BatchNorm + ReLU + 2x2 max pool], widths
    ``width``, 2 ``width``, ..., then a 3x3 convolution to the embedding width. Everything else (grid, image size
    checks, flattening) is timm's PatchEmbed, so the model stays a VisionTransformer with the same token grid. On
    small data such a stem learns shapes in a few epochs where a plain patchify ViT barely leaves chance level.
    """
    return functools.partial(_conv_stem_class(), stem_width=width)


def _conv_stem_class() -> type:
    # Built on first use so that importing this module (when the plugin registry is built) does not import timm;
    # stored as a module attribute so that models using it can be pickled.
    global ConvStemPatchEmbed
    if "ConvStemPatchEmbed" in globals():
        return ConvStemPatchEmbed
    from timm.layers import PatchEmbed

    class ConvStemPatchEmbed(PatchEmbed):  # noqa: F811 - the global assigned above
        def __init__(self, *args, stem_width: int = 16, **kwargs):
            super().__init__(*args, **kwargs)
            ph, pw = self.patch_size
            stages = int(math.log2(ph)) if ph == pw else -1
            if stages < 1 or 2**stages != ph:
                raise KdforgeError(
                    f"stem = 'conv' needs a square power-of-two patch size (2, 4, 8, 16), got {ph}x{pw}: "
                    "change model_kwargs.patch_size or set stem = 'patch'"
                )
            layers, chans = [], 3
            for i in range(stages):
                out = stem_width * 2**i
                k = 5 if i == 0 else 3
                layers += [nn.Conv2d(chans, out, k, padding=k // 2, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
                           nn.MaxPool2d(2)]
                chans = out
            layers.append(nn.Conv2d(chans, self.proj.out_channels, 3, padding=1))
            self.proj = nn.Sequential(*layers)

    ConvStemPatchEmbed.__qualname__ = "ConvStemPatchEmbed"
    return ConvStemPatchEmbed
