"""The "timm" teacher: any timm model whose ``forward_features`` returns tokens or a feature map."""

from __future__ import annotations

import dataclasses
import json
import sys
import warnings
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.errors import KdforgeError
from kdforge.ranges import ColourStd
from kdforge.teachers import Teacher, TeacherOutput, patch_grid, to_plain_float
from kdforge.teachers.checkpoint import load_into, read_state_dict
from kdforge.teachers.timm_utils import (
    check_input_size,
    create_timm_model,
    is_token_model,
    last_block_tokens,
    model_mean_std,
    model_patch_size,
    norm_after_pool,
    output_stride,
    pool_patches,
    probe_grid,
    split_tokens,
)

__all__ = ["TimmBackedTeacher", "TimmTeacher", "load_timm_checkpoint"]


def _is_head_key(name: str) -> bool:
    # The teacher is built without a classifier (num_classes=0): a checkpoint's head weights are not needed.
    return name.startswith(("head.", "fc.", "classifier.", "head_dist."))


def load_timm_checkpoint(model: nn.Module, path: str, *, key: str = "", trust_pickle: bool = False,
                         where: str = "teacher.checkpoint") -> None:
    """Load a local weight file into a timm model. timm's own converter for the architecture runs first (as
    for its pretrained weights), so original DINOv2 / OpenAI CLIP layouts and other position-embedding grids load.
    ``path`` may be a timm / Hugging Face folder (``kdforge export --format timm`` writes one) or its
    model.safetensors: its config.json must then name the model's architecture, and a misfit names the
    architecture and model_args to set."""
    from kdforge.export import export_folder_of, read_export_config

    folder = export_folder_of(path)
    hint = None
    if folder is not None:
        config = read_export_config(folder)
        arch = config["architecture"]
        args = {k: v for k, v in config.get("model_args", {}).items() if k != "num_classes" and v is not None}
        kwargs = ", ".join(f"{k} = {json.dumps(v)}" for k, v in args.items())
        hint = (f"'{folder}' holds a timm {arch} with model_args {args} (its config.json): set model = \"{arch}\" "
                f"and model_kwargs = {{ {kwargs} }} in [{where.split('.')[0]}]")
        ours = (getattr(model, "pretrained_cfg", None) or {}).get("architecture")
        if ours and ours != arch:
            raise KdforgeError(f"{where} = '{path}': the model is timm's {ours}, but {hint}")
    sd = read_state_dict(path, key=key, trust_pickle=trust_pickle, where=where)
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if convert is not None:
        sd = convert(sd, model)
    load_into(model, sd, path=path, where=where, ignore=_is_head_key, **({"hint": hint} if hint else {}))


class TimmBackedTeacher(Teacher):
    """What every teacher wrapping a timm model shares: token splitting, grids, hidden layers.

    Subclasses build ``model`` (a timm model without classifier use) and call :meth:`adopt`. Their Config must
    have ``hidden_norm`` besides the common fields.
    """

    model: nn.Module

    def adopt(self, model: nn.Module, *, mean=None, std=None, where: str = "teacher") -> None:
        """Take ``model`` as the frozen backbone; mean/std default to its pretrained_cfg."""
        self.model = model
        hidden = self.cfg.hidden_layers
        if hidden:
            depth = len(getattr(model, "blocks", ()))
            if not hasattr(model, "forward_intermediates") or not depth:
                raise KdforgeError(
                    f"[{where}] hidden_layers = {hidden} needs a timm model with blocks and "
                    f"forward_intermediates(); '{self.model_name}' has none: set hidden_layers = 0"
                )
            if hidden > depth:
                raise KdforgeError(f"[{where}] hidden_layers = {hidden} but '{self.model_name}' has {depth} blocks")
        model_mean, model_std = model_mean_std(model)
        self.set_normalization(mean or model_mean, std or model_std)
        self.embed_dim = int(getattr(model, "num_features", getattr(model, "embed_dim", 0)))
        # The output stride: the patch size for ViTs, 32 for a ResNet or Swin (whose patch_embed is only its stem).
        self._token_model = is_token_model(model)
        self._patch_hw = model_patch_size(model) if self._token_model else (output_stride(model),) * 2
        self.patch_size = self._patch_hw[0]
        self._probed: dict[tuple[int, int], tuple[int, int]] = {}
        self.freeze()

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        h, w = (image_size, image_size) if isinstance(image_size, int) else image_size
        if self._token_model:
            pe = self.model.patch_embed
            if getattr(pe, "dynamic_img_pad", False):
                return tuple(int(v) for v in pe.dynamic_feat_size((h, w)))
            return patch_grid(self.model_name, "teacher", (h, w), self._patch_hw)
        if (h, w) not in self._probed:  # CNNs, Swin: the grid depends on padding and strides; ask the model once
            self._probed[(h, w)] = probe_grid(self.model, h, w, model_name=self.model_name)
        return self._probed[(h, w)]

    def encode(self, x: Tensor) -> TeacherOutput:
        h, w = x.shape[-2:]
        check_input_size(self.model, h, w, role="teacher", model_name=self.model_name)
        if not self.cfg.hidden_layers:
            y = self.model.forward_features(x)
            cls, patches, grid = split_tokens(self.model, y, (h, w), model_name=self.model_name)
            return TeacherOutput(cls=cls, patches=patches, grid=grid)
        # One pass gives both the final tokens and the last blocks' outputs.
        final, inter = self.model.forward_intermediates(
            x,
            indices=self.cfg.hidden_layers,
            return_prefix_tokens=True,
            norm=self.cfg.hidden_norm,
            output_fmt="NLC",
        )
        cls, patches, grid = split_tokens(self.model, final, (h, w), model_name=self.model_name)
        fc_norm = self.model.fc_norm if self.cfg.hidden_norm and norm_after_pool(self.model) else None
        hidden = []
        for item in inter:
            spatial, prefix = item if isinstance(item, tuple) else (item, None)
            has_cls = prefix is not None and bool(getattr(self.model, "has_class_token", True))
            first = prefix[:, :1] if has_cls else pool_patches(self.model, spatial).unsqueeze(1)
            tokens = torch.cat([first, spatial], dim=1)
            hidden.append(fc_norm(tokens) if fc_norm is not None else tokens)  # the norm forward_intermediates skips
        return TeacherOutput(cls=cls, patches=patches, grid=grid, hidden=hidden)

    def intermediate_layers(self, images: Tensor, n: int) -> list[TeacherOutput]:
        """The last ``n`` blocks' outputs, oldest first, each after the final norm (the last equals :meth:`forward`'s
        cls and patches): Tensor[B, 3, H, W] in [0, 1] -> n float32 TeacherOutputs without ``hidden``. ViTs only."""

        def encode(x: Tensor) -> list:
            check_input_size(self.model, *x.shape[-2:], role="teacher", model_name=self.model_name)
            return last_block_tokens(self.model, x, n, role="teacher", model_name=self.model_name)

        layers = self.run_frozen(encode, images)
        return [TeacherOutput(cls=to_plain_float(c), patches=to_plain_float(p), grid=tuple(g)) for c, p, g in layers]


class TimmTeacher(TimmBackedTeacher):
    """A frozen timm model (ViT, DeiT, EVA, DINOv2-in-timm, ... or a CNN, whose feature map becomes the patches).

    Weights: ``pretrained = true`` loads timm's own (network or the local Hugging Face cache); ``checkpoint``
    loads a local file instead. Mean/std come from the model's pretrained_cfg unless set.
    """

    name = "timm"

    @dataclasses.dataclass
    class Config(Teacher.Config):
        model: str = "vit_base_patch14_dinov2.lvd142m"
        """timm model name (timm.list_models() lists them), e.g. vit_base_patch14_dinov2.lvd142m."""
        pretrained: bool = False
        """Load timm's pretrained weights through timm.create_model (ignored when checkpoint is set)."""
        checkpoint: str = ""
        """Local .safetensors / .pth / .pt weight file to load instead of timm's pretrained weights."""
        checkpoint_key: str = ""
        """Entry of the checkpoint dict that holds the weights (empty: model, state_dict or the top level)."""
        trust_pickle: bool = False
        """Allow torch.load to unpickle arbitrary objects in checkpoint (only for files you trust)."""
        model_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
        """Keyword arguments for timm.create_model (img_size, patch_size, embed_dim, depth, dynamic_img_size ...)."""
        hidden_norm: bool = True
        """Apply the final norm to the hidden outputs too (DINOv2's get_intermediate_layers default)."""
        mean: tuple[float, float, float] | None = None
        """RGB mean for input normalisation (default: the model's pretrained_cfg)."""
        std: ColourStd | None = None
        """RGB std for input normalisation (default: the model's pretrained_cfg)."""

        def runs_code(self) -> list[str]:
            """Settings that run code from outside kdforge (see kdforge.engine.runs.code_it_would_run)."""
            if self.trust_pickle and self.checkpoint:
                return [f"trust_pickle = true unpickles '{self.checkpoint}' (pickles can run code)"]
            return []

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.model_name = cfg.model
        kwargs = {"num_classes": 0, **cfg.model_kwargs}
        model = create_timm_model(cfg.model, pretrained=cfg.pretrained and not cfg.checkpoint, kwargs=kwargs,
                                  where="teacher")
        if cfg.checkpoint:
            load_timm_checkpoint(model, cfg.checkpoint, key=cfg.checkpoint_key, trust_pickle=cfg.trust_pickle)
        elif not cfg.pretrained:
            warnings.warn(
                f"teacher {cfg.model} has random weights (pretrained = false and no checkpoint): fine for tests, "
                "useless for distillation",
                stacklevel=2,
            )
        self.adopt(model, mean=cfg.mean, std=cfg.std)

