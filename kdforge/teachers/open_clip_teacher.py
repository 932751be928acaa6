"""The "open_clip" teacher: the image tower of an OpenCLIP (or OpenAI CLIP) model, whose text tower embeds text.

Its features live in CLIP's joint image-text space. ``cls`` is the image embedding after the tower's projection
(``model.encode_image``, not L2-normalised), the vector that :meth:`OpenClipTeacher.encode_text` embeddings are
compared with, so that ``kdforge retrieve`` can rank images by text queries. ``embed_dim`` is that joint width (768 for
ViT-L-14), not the width of the tower's transformer (1024 for ViT-L-14).

``patches`` go through the same per-token maps as ``cls``, so they share its width and space:

* open_clip ViTs (``VisionTransformer``: ViT-B-32 ... ViT-bigG-14, OpenAI, LAION, DataComp, MetaCLIP weights): the
  last block's patch tokens after the final norm ``ln_post`` and the projection ``proj``, the maps the CLS token goes
  through (with ``pool_type = "avg"`` the image embedding is exactly their mean). ``hidden_layers`` returns the last
  blocks' outputs (CLS, then patches) through the same norm and projection.
* ResNets (RN50 ...: ``ModifiedResNet``): each position of the last feature map through the attention pool's value
  and output projections, ``c_proj(v_proj(x + pos))`` (MaskCLIP's dense CLIP features): the values whose attention-
  weighted sum is the image embedding. The grid is the image size / 32.
* towers with a timm ViT trunk (SigLIP, EVA02 ...): the trunk's normed patch tokens through the per-token part of its
  head (fc_norm, projection) and open_clip's projection head.
* other towers (attentional pooling as in CoCa, CNN trunks such as ConvNeXt, attention-pool heads): the image
  embedding only. ``patches`` is then empty, Tensor[B, 0, D] on a (0, 0) grid, and ``patch_size`` is 0: the teacher
  serves retrieval and losses on ``cls``; a loss on patch tokens stops at start-up on the grid check.

Weights: ``pretrained`` names an open_clip tag (``open_clip.list_pretrained_tags_by_model(model)``) whose weights
open_clip fetches (network or the local Hugging Face cache); ``checkpoint`` loads a local file instead
(``.safetensors``, or a ``torch.save`` file of tensors only: never unpickled). Mean/std come from the tag (OpenAI's CLIP
statistics without one); tags trained with QuickGELU get it. Images must have the model's size (its positional
embeddings are fixed): ``image_size`` builds the model for another size and resizes the weights' positional embeddings
as they load (ViT towers only).
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import pickle
import string
import warnings
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from kdforge.errors import KdforgeError, ShapeError
from kdforge.ranges import NonNegativeInt
from kdforge.teachers import Teacher, TeacherOutput, autocast_context, to_plain_float
from kdforge.teachers.checkpoint import load_into, read_state_dict
from kdforge.teachers.timm_utils import feature_grid, is_token_model, model_patch_size, split_tokens

__all__ = ["OpenClipTeacher", "import_open_clip"]

_SCHEMAS = ("hf-hub:", "local-dir:")
_OFFLINE = (
    "Without network access, download the weights elsewhere and set checkpoint = \"/path/to/open_clip_model."
    "safetensors\" (pretrained then only picks the mean/std), or copy the Hugging Face cache (~/.cache/huggingface) "
    "here and set HF_HUB_OFFLINE=1."
)
_FIT_HINT = (
    "Check that model names the architecture the file was trained with; image_size resizes the positional "
    "embeddings of ViT towers only (leave it 0 for the file's own size)."
)


def import_open_clip():
    """The ``open_clip`` module, or a KdforgeError saying how to install it."""
    try:
        import open_clip
    except ImportError as exc:
        raise KdforgeError(
            f"[teacher] plugin = \"open_clip\" needs the open_clip_torch package, which cannot be imported ({exc}): "
            "pip install open_clip_torch (or pip install 'kdforge[clip]')"
        ) from exc
    return open_clip


def _first_line(exc: BaseException) -> str:
    text = str(exc)
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class OpenClipTeacher(Teacher):
    """A frozen open_clip image tower (see the module docstring for what ``cls`` and ``patches`` are).

    Beyond the teacher contract: :meth:`encode_text` embeds strings in the same space as ``cls`` and
    :meth:`class_prompts` turns class names into texts with the ``prompt`` template.
    """

    name = "open_clip"

    @dataclasses.dataclass
    class Config(Teacher.Config):
        model: str = "ViT-L-14"
        """open_clip architecture (open_clip.list_models()): ViT-L-14, ViT-B-16-SigLIP, RN50 ..., or hf-hub:org/repo."""
        pretrained: str = "datacomp_xl_s13b_b90k"
        """open_clip pretrained tag, e.g. openai, laion2b_s32b_b82k, datacomp_xl_s13b_b90k; "" for random weights."""
        checkpoint: str = ""
        """Local .safetensors / .pth open_clip state dict (tensors only), loaded instead of the tag's weights."""
        image_size: NonNegativeInt = 0
        """Image side the model is built for (0: the model's own); positional embeddings are resized to it."""
        prompt: str = "a photo of a {}."
        """Template that class_prompts() puts each class name into, at the {}."""

        def __post_init__(self):
            super().__post_init__()
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(self.prompt) if f is not None]
            except ValueError as exc:
                raise ValueError(f"prompt = {self.prompt!r} is not a valid template ({exc})") from None
            if fields != [""]:
                raise ValueError(
                    f"prompt = {self.prompt!r} must hold exactly one {{}} where the class name goes, and no other "
                    "braces (write {{ and }} for literal ones), e.g. prompt = \"a photo of a {}.\""
                )

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        oc = import_open_clip()
        self.model_name = cfg.model
        tag = _check_names(oc, cfg)
        self.model = _create_model(oc, cfg, tag)
        if cfg.checkpoint:
            _load_checkpoint(self.model, cfg.checkpoint)
        elif not cfg.pretrained and not cfg.model.startswith(_SCHEMAS):
            warnings.warn(
                f"teacher {cfg.model} has random weights (pretrained = \"\" and no checkpoint): fine for tests, "
                "useless for distillation",
                stacklevel=2,
            )
        pp = oc.get_model_preprocess_cfg(self.model)
        self.set_normalization(pp["mean"], pp["std"])
        visual = self.model.visual
        self._kind = _tower_kind(visual)
        h, w = self.image_hw = _pair(getattr(visual, "image_size", None) or pp.get("size"))
        if self._kind == "vit":
            ph, pw = _pair(visual.patch_size)
            self.patch_size, self._grid = ph, (h // ph, w // pw)
        elif self._kind == "resnet":
            self.patch_size = 32
            self._grid = (h // 32, w // 32)
        elif self._kind == "timm":
            self._grid = feature_grid(visual.trunk, h, w)
            self.patch_size = int(model_patch_size(visual.trunk)[0])
        else:
            self.patch_size, self._grid = 0, (0, 0)
        if cfg.hidden_layers:
            if self._kind != "vit":
                raise KdforgeError(
                    f"[teacher] hidden_layers = {cfg.hidden_layers} needs an open_clip ViT image tower; "
                    f"'{cfg.model}' has a {type(visual).__name__}: set hidden_layers = 0"
                )
            depth = len(visual.transformer.resblocks)
            if cfg.hidden_layers > depth:
                raise KdforgeError(f"[teacher] hidden_layers = {cfg.hidden_layers} but {cfg.model} has {depth} blocks")
        self._tokenizer = None
        self.freeze()
        self.embed_dim = _embed_dim(self)

    # -- images -----------------------------------------------------------------------------------------------------

    def grid(self, image_size) -> tuple[int, int]:
        """The (gh, gw) patch grid, (0, 0) for towers without patch tokens; ShapeError for another image size."""
        h, w = _pair(image_size)
        self._check_size(h, w)
        return self._grid

    def _check_size(self, h: int, w: int) -> None:
        mh, mw = self.image_hw
        if (int(h), int(w)) != (mh, mw):
            raise ShapeError(
                f"teacher {self.model_name} takes {mh}x{mw} px images (its positional embeddings are fixed) but got "
                f"{h}x{w}: resize the images to {mh} px, or set image_size = {h} in [teacher] to build it for {h} px "
                "(the weights' positional embeddings are resized as they load)"
            )

    def encode(self, x: Tensor) -> TeacherOutput:
        self._check_size(*x.shape[-2:])
        visual = self.model.visual
        hidden = None
        if self._kind == "vit":
            n = max(1, self.cfg.hidden_layers)
            out = visual.forward_intermediates(x, indices=n, output_fmt="NLC", output_extra_tokens=True)
            cls = out["image_features"]
            patches = self._vit_project(out["image_intermediates"][-1])
            if self.cfg.hidden_layers:
                hidden = [self._vit_project(torch.cat([prefix, tokens], dim=1))
                          for prefix, tokens in zip(out["image_intermediates_prefix"], out["image_intermediates"])]
        elif self._kind == "resnet":
            out = visual.forward_intermediates(x, indices=1)
            cls, fmap = out["image_features"], out["image_intermediates"][-1]
            pool = visual.attnpool
            tokens = fmap.flatten(2).transpose(1, 2) + pool.positional_embedding[1:].to(fmap.dtype)
            patches = pool.c_proj(pool.v_proj(tokens))
        elif self._kind == "timm":
            trunk = visual.trunk
            y = trunk.forward_features(x)
            cls = visual.head(trunk.forward_head(y))
            _, tokens, _ = split_tokens(trunk, y, tuple(x.shape[-2:]), model_name=self.model_name)
            patches = visual.head(trunk.head(tokens))
        else:
            cls = self.model.encode_image(x)
            patches = cls.new_zeros(cls.shape[0], 0, cls.shape[-1])
        if cls.ndim != 2:
            raise ShapeError(f"{self.model_name}: the image tower gave {tuple(cls.shape)}, expected [B, D] embeddings")
        return TeacherOutput(cls=cls, patches=patches, grid=self._grid, hidden=hidden)

    def _vit_project(self, tokens: Tensor) -> Tensor:
        """Tokens Tensor[B, T, width] of an open_clip ViT -> Tensor[B, T, D]: the final norm, then the projection."""
        visual = self.model.visual
        tokens = visual.ln_post(tokens)
        return tokens if visual.proj is None else tokens @ visual.proj

    # -- text -------------------------------------------------------------------------------------------------------

    @property
    def tokenizer(self):
        """open_clip's tokenizer for the model (built on first use: some models' need the Hugging Face cache)."""
        if self._tokenizer is None:
            oc = import_open_clip()
            try:
                context = getattr(self.model, "context_length", None)
                self._tokenizer = oc.get_tokenizer(self.cfg.model, context_length=context)
            except (OSError, RuntimeError, ValueError) as exc:
                raise KdforgeError(
                    f"[teacher] could not build the tokenizer of open_clip model '{self.cfg.model}' "
                    f"({_first_line(exc)}). "
                    "Some models' tokenizers come from the Hugging Face hub: without network access, copy the Hugging "
                    "Face cache (~/.cache/huggingface) here and set HF_HUB_OFFLINE=1."
                ) from exc
        return self._tokenizer

    def encode_text(self, texts: str | Iterable[str]) -> Tensor:
        """B strings -> Tensor[B, embed_dim] float32 on the teacher's device: CLIP text embeddings in the space of
        ``cls``, raw (not L2-normalised: the caller normalises both sides for cosine similarities)."""
        texts = [texts] if isinstance(texts, str) else [str(t) for t in texts]
        device = self.mean.device
        if not texts:
            return torch.zeros(0, self.embed_dim, device=device)
        tokens = self.tokenizer(texts).to(device)
        with torch.inference_mode(), autocast_context(device.type, self.cfg.autocast):
            emb = self.model.encode_text(tokens)
        return to_plain_float(emb)

    def class_prompts(self, classes: Iterable[str]) -> list[str]:
        """Class names -> texts for :meth:`encode_text`: each name, underscores as spaces ("golden_retriever" ->
        "golden retriever"), put into the ``prompt`` template ("a photo of a golden retriever.")."""
        return [self.cfg.prompt.format(str(c).replace("_", " ")) for c in classes]


# ----------------------------------------------------------------------------------------------------- building
def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def _check_names(oc, cfg) -> dict:
    """KdforgeError for an unknown model or tag; returns the tag's open_clip pretrained config ({} without one)."""
    if cfg.model.startswith(_SCHEMAS):
        if cfg.pretrained:
            raise KdforgeError(
                f"[teacher] model = '{cfg.model}' brings its own weights, so pretrained = '{cfg.pretrained}' cannot "
                "apply: set pretrained = \"\" (or set checkpoint to load a local file instead)"
            )
        return {}
    name = cfg.model.replace("/", "-")  # open_clip's own spelling: ViT-B/32 is ViT-B-32
    models = oc.list_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=3, cutoff=0.6)
        hint = (f"did you mean {', '.join(close)}?" if close else
                "list names with python -c \"import open_clip; print(open_clip.list_models())\"")
        raise KdforgeError(f"[teacher] model = '{cfg.model}' is not an open_clip model: {hint}")
    if not cfg.pretrained:
        return {}
    if not oc.is_pretrained_cfg(name, cfg.pretrained):
        tags = oc.list_pretrained_tags_by_model(name)
        known = f"its tags: {', '.join(tags)}" if tags else "open_clip has no pretrained weights for it"
        raise KdforgeError(
            f"[teacher] pretrained = '{cfg.pretrained}' is not an open_clip tag of model '{cfg.model}' ({known}). "
            "For a local weight file set checkpoint = \"/path\" instead; pretrained = \"\" gives random weights."
        )
    return oc.get_pretrained_cfg(name, cfg.pretrained)


def _create_model(oc, cfg, tag: dict) -> nn.Module:
    """open_clip.create_model for the config: the tag's weights unless a checkpoint will be loaded, never the
    towers' base weights (a timm trunk's ImageNet weights, a Hugging Face text model's)."""
    kwargs = {"pretrained_image": False, "pretrained_text": False}
    if cfg.image_size:
        kwargs["force_image_size"] = cfg.image_size
    if tag.get("quick_gelu"):  # the weights were trained with QuickGELU; open_clip would only warn and use GELU
        kwargs["force_quick_gelu"] = True
    if cfg.model.startswith(_SCHEMAS):
        kwargs["load_weights"] = not cfg.checkpoint
    elif cfg.pretrained and not cfg.checkpoint:
        kwargs["pretrained"] = cfg.pretrained
    elif cfg.pretrained:  # a local file of the tag's weights: the tag's preprocessing
        kwargs["force_preprocess_cfg"] = {k: tag[k] for k in ("mean", "std") if k in tag}
    fetches = cfg.model.startswith("hf-hub:") or bool(cfg.pretrained and not cfg.checkpoint)
    try:
        return oc.create_model(cfg.model, **kwargs)
    except (OSError, RuntimeError, ValueError) as exc:
        if "loading state_dict" in str(exc):  # downloaded, but the weights do not fit the model as built
            size = f" with image_size = {cfg.image_size} (try 0, the model's own size)" if cfg.image_size else ""
            raise KdforgeError(f"[teacher] the '{cfg.pretrained}' weights do not fit open_clip model '{cfg.model}' "
                               f"as built{size}: {_first_line(exc)}") from exc
        if fetches:
            what = f"pretrained weights '{cfg.pretrained}'" if cfg.pretrained else "the config and weights"
            raise KdforgeError(f"[teacher] could not load {what} for open_clip model '{cfg.model}' "
                               f"({_first_line(exc)}). {_OFFLINE}") from exc
        raise KdforgeError(f"[teacher] open_clip could not build model '{cfg.model}': {_first_line(exc)}") from exc


def _load_checkpoint(model: nn.Module, path: str) -> None:
    """Load a local open_clip state dict (safetensors, or torch.save of tensors: never unpickled) into ``model``,
    after the layout fixes open_clip's own loader makes (older text-tower key names, position-embedding sizes)."""
    try:
        sd = read_state_dict(path, where="teacher.checkpoint")
    except KdforgeError as exc:
        if isinstance(exc.__cause__, pickle.UnpicklingError):
            raise KdforgeError(
                f"teacher.checkpoint = '{path}' stores Python objects besides tensors, and the open_clip teacher "
                "never unpickles (unpickling can run code). Where you trust the file, re-save only its weights: "
                "torch.save(ckpt['state_dict'], 'weights.pth'), or safetensors.torch.save_file(state_dict, "
                "'weights.safetensors')"
            ) from exc.__cause__
        raise
    load_into(model, _open_clip_layout(model, sd), path=path, where="teacher.checkpoint", hint=_FIT_HINT)


def _open_clip_layout(model: nn.Module, sd: dict) -> dict:
    """What open_clip.load_checkpoint does to a state dict before loading it, for a dict already read safely."""
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    try:
        from open_clip.convert import convert_state_dict  # third-party layouts (MobileCLIP)

        sd = convert_state_dict(model, sd)
    except ImportError:
        pass
    own = model.state_dict()
    if "positional_embedding" in sd and "positional_embedding" not in own:
        sd = convert_to_custom_text_state_dict(sd)  # the text tower's keys before CustomTextCLIP
    for key in ("logit_scale", "logit_bias"):
        if key in sd and key in own and sd[key].ndim != own[key].ndim:
            sd[key] = sd[key].reshape(own[key].shape)
    if "logit_bias" in own and "logit_bias" not in sd:
        sd["logit_bias"] = torch.zeros_like(own["logit_bias"])  # a CLIP file in a SigLIP model, as open_clip does
    position_ids = "text.transformer.embeddings.position_ids"
    if position_ids in sd and position_ids not in own:
        del sd[position_ids]
    resize_pos_embed(sd, model)
    resize_text_pos_embed(sd, model)
    _resize_timm_pos_embed(sd, model, own)
    return sd


def _resize_timm_pos_embed(sd: dict, model: nn.Module, own: dict) -> None:
    """A timm trunk built for another image_size: resample the file's position embeddings as timm would."""
    key = "visual.trunk.pos_embed"
    if key not in sd or key not in own or sd[key].shape == own[key].shape or sd[key].ndim != 3:
        return
    from timm.layers import resample_abs_pos_embed

    trunk = model.visual.trunk
    prefix = 0 if getattr(trunk, "no_embed_class", False) else int(getattr(trunk, "num_prefix_tokens", 0))
    side = math.isqrt(sd[key].shape[1] - prefix)
    if side * side + prefix != sd[key].shape[1]:
        return  # not a square grid: load_into reports the mismatch
    sd[key] = resample_abs_pos_embed(sd[key], list(trunk.patch_embed.grid_size), [side, side], num_prefix_tokens=prefix)


def _tower_kind(visual: nn.Module) -> str:
    """"vit", "resnet", "timm" (a timm ViT trunk with a per-token head) or "pooled" (image embedding only)."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        if not hasattr(visual, "forward_intermediates"):
            raise KdforgeError("[teacher] this open_clip_torch is too old for the open_clip teacher (its "
                               "VisionTransformer has no forward_intermediates): pip install -U open_clip_torch")
        return "vit" if visual.attn_pool is None and visual.pool_type in ("tok", "avg") else "pooled"
    if isinstance(visual, ModifiedResNet):
        return "resnet" if hasattr(visual, "forward_intermediates") else "pooled"
    trunk, head = getattr(visual, "trunk", None), getattr(visual, "head", None)
    if trunk is not None and isinstance(head, nn.Sequential) and is_token_model(trunk):
        token_wise = isinstance(getattr(trunk, "head", None), (nn.Linear, nn.Identity)) and all(
            isinstance(m, (nn.Dropout, nn.Linear, nn.Identity)) or type(m).__name__ == "Mlp" for m in head
        )
        if token_wise and hasattr(trunk, "forward_head"):
            return "timm"
    return "pooled"


def _embed_dim(teacher: OpenClipTeacher) -> int:
    """The width of the image embedding: the tower's output_dim, else (timm towers) one image's embedding."""
    dim = getattr(teacher.model.visual, "output_dim", None)
    if dim:
        return int(dim)
    h, w = teacher.image_hw
    with torch.inference_mode():
        return int(teacher.model.encode_image(torch.zeros(1, 3, h, w)).shape[-1])
