"""The "torch_hub" teacher: a model from a torch.hub repository exposing DINOv2's interface.

The model must provide ``forward_features(x) -> {"x_norm_clstoken": [B, D], "x_norm_patchtokens": [B, N, D], ...}``,
``embed_dim``, ``patch_size`` and, for ``hidden_layers``, ``get_intermediate_layers(x, n, return_class_token=True,
norm=...)`` (DINOv2's ``DinoVisionTransformer`` does). ``source = "local"`` loads ``hubconf.py`` from a directory,
which works offline (``git clone https://github.com/facebookresearch/dinov2`` elsewhere and copy it here).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from unittest import mock
from typing import Any, Literal

import torch
from torch import Tensor

from kdforge.errors import KdforgeError, ShapeError
from kdforge.ranges import ColourStd
from kdforge.teachers import Teacher, TeacherOutput
from kdforge.teachers.checkpoint import load_into, read_state_dict

__all__ = ["TorchHubTeacher"]

_REQUIRED = ("forward_features", "embed_dim", "patch_size")


class _Untrusted(Exception):
    """torch.hub wanted to ask whether to trust a repository: kdforge answers no (trusting is a recipe setting)."""


@contextlib.contextmanager
def _no_prompt():
    """torch.hub asks on stdin before running an untrusted repository's code and raises a bare Exception on "no";
    a training job has nobody to answer, so the question itself becomes :class:`_Untrusted`."""

    def refuse(prompt: str = "") -> str:
        raise _Untrusted(prompt)

    with mock.patch.object(torch.hub, "input", refuse, create=True):  # torch.hub's own name shadows the builtin
        yield


class TorchHubTeacher(Teacher):
    """A frozen torch.hub model with DINOv2's interface (dinov2_vits14 ... dinov2_vitg14, *_reg variants)."""

    name = "torch_hub"

    @dataclasses.dataclass
    class Config(Teacher.Config):
        repo: str = "facebookresearch/dinov2"
        """GitHub "owner/name[:ref]" (source = "github") or a local directory holding hubconf.py (source = "local")."""
        model: str = "dinov2_vitb14"
        """Entry point in the repository's hubconf.py, e.g. dinov2_vitb14 or dinov2_vitl14_reg."""
        source: Literal["github", "local"] = "github"
        """Where hubconf.py comes from: GitHub (network or torch.hub's cache) or a local directory (offline)."""
        pretrained: bool = True
        """Passed to the hub entry point; it downloads the weights (ignored when checkpoint is set)."""
        checkpoint: str = ""
        """Local .pth / .safetensors weight file loaded into the model instead of the hub's download."""
        checkpoint_key: str = ""
        """Entry of the checkpoint dict that holds the weights (empty: model, state_dict or the top level)."""
        trust_pickle: bool = False
        """Allow torch.load to unpickle arbitrary objects in checkpoint (only for files you trust)."""
        trust_repo: bool = False
        """Run a GitHub repository's hubconf.py even when torch.hub does not trust it yet. Off, torch.hub's own check
        decides: repositories of owners it trusts (facebookresearch, pytorch ...) or trusted before on this machine
        load, others are refused (kdforge asks no question). Set true only for a repository whose code you trust."""
        hub_kwargs: dict[str, Any] = dataclasses.field(default_factory=dict)
        """Extra keyword arguments for the hub entry point."""
        hidden_norm: bool = True
        """Apply the final norm to the hidden outputs too (get_intermediate_layers(norm=True), DINOv2's default)."""

        mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
        """RGB mean for input normalisation (DINOv2 uses ImageNet's)."""
        std: ColourStd = (0.229, 0.224, 0.225)
        """RGB std for input normalisation (DINOv2 uses ImageNet's)."""

        def runs_code(self) -> list[str]:
            """Settings that run code from outside kdforge (see kdforge.engine.runs.code_it_would_run)."""
            found = []
            if self.source == "local":
                found.append(f"source = 'local' runs {os.path.join(self.repo, 'hubconf.py')}")
            if self.trust_repo:
                found.append(f"trust_repo = true runs hubconf.py of '{self.repo}' without torch.hub's trust check")
            if self.trust_pickle and self.checkpoint:
                found.append(f"trust_pickle = true unpickles '{self.checkpoint}' (pickles can run code)")
            return found

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.model_name = cfg.model
        self.model = self._load(cfg)
        missing = [a for a in _REQUIRED if not hasattr(self.model, a)]
        if cfg.hidden_layers and not hasattr(self.model, "get_intermediate_layers"):
            missing.append("get_intermediate_layers")
        if missing:
            raise KdforgeError(
                f"[teacher] torch.hub model {cfg.repo}:{cfg.model} lacks {', '.join(missing)}; the torch_hub teacher "
                "needs DINOv2's interface (forward_features -> x_norm_clstoken / x_norm_patchtokens). Use the timm "
                "teacher for other models."
            )
        if cfg.checkpoint:
            sd = read_state_dict(cfg.checkpoint, key=cfg.checkpoint_key, trust_pickle=cfg.trust_pickle,
                                 where="teacher.checkpoint")
            load_into(self.model, sd, path=cfg.checkpoint, where="teacher.checkpoint",
                      ignore=lambda k: k.startswith("head."))
        ps = self.model.patch_size
        self.patch_size = int(ps if isinstance(ps, int) else ps[0])
        self.embed_dim = int(self.model.embed_dim)
        depth = len(getattr(self.model, "blocks", ())) or None
        if depth is not None and cfg.hidden_layers > depth:
            raise KdforgeError(f"[teacher] hidden_layers = {cfg.hidden_layers} but {cfg.model} has {depth} blocks")
        self.set_normalization(cfg.mean, cfg.std)
        self.freeze()

    @staticmethod
    def _load(cfg: Config):
        if cfg.source == "local":
            hubconf = os.path.join(os.path.expanduser(cfg.repo), "hubconf.py")
            if not os.path.isfile(hubconf):
                raise KdforgeError(
                    f"[teacher] repo = '{cfg.repo}' with source = 'local' needs a directory holding hubconf.py; "
                    f"{hubconf} does not exist. Clone the repository there (git clone "
                    "https://github.com/facebookresearch/dinov2) or use source = 'github'."
                )
        kwargs = {"pretrained": cfg.pretrained and not cfg.checkpoint, **cfg.hub_kwargs}
        try:
            with _no_prompt():
                return torch.hub.load(
                    os.path.expanduser(cfg.repo) if cfg.source == "local" else cfg.repo,
                    cfg.model,
                    source=cfg.source,
                    trust_repo=True if cfg.trust_repo else "check",
                    verbose=False,
                    **kwargs,
                )
        except _Untrusted:
            raise KdforgeError(
                f"[teacher] torch.hub does not trust the repository '{cfg.repo}' (its owner is not on torch.hub's "
                "trusted list and it was not trusted on this machine before), so its hubconf.py was not run. If you "
                "trust its code, set trust_repo = true in [teacher]."
            ) from None
        except (OSError, RuntimeError, ValueError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            offline = (
                "" if cfg.source == "local" else
                " Without network access: clone the repository elsewhere, copy it here and set source = 'local', "
                "repo = '/path/to/dinov2'; download the weights too and set checkpoint (pretrained is then ignored)."
            )
            raise KdforgeError(f"[teacher] torch.hub.load('{cfg.repo}', '{cfg.model}') failed: {first}.{offline}") from exc

    def encode(self, x: Tensor) -> TeacherOutput:
        grid = self.grid(tuple(x.shape[-2:]))
        if self.cfg.hidden_layers and self.cfg.hidden_norm:
            # One pass: with norm=True the last block's output is exactly x_norm_clstoken / x_norm_patchtokens.
            layers = self.model.get_intermediate_layers(x, n=self.cfg.hidden_layers, return_class_token=True, norm=True)
            patches, cls = layers[-1]
        else:
            feats = self.model.forward_features(x)
            cls, patches = feats["x_norm_clstoken"], feats["x_norm_patchtokens"]
            layers = None
            if self.cfg.hidden_layers:
                layers = self.model.get_intermediate_layers(
                    x, n=self.cfg.hidden_layers, return_class_token=True, norm=False
                )
        if patches.shape[1] != grid[0] * grid[1]:
            raise ShapeError(
                f"{self.model_name}: expected {grid[0]}x{grid[1]} patch tokens for {x.shape[-2]}x{x.shape[-1]} px "
                f"images (patch {self.patch_size}), got {patches.shape[1]}"
            )
        hidden = None if layers is None else [torch.cat([c[:, None], p], dim=1) for p, c in layers]
        return TeacherOutput(cls=cls, patches=patches, grid=grid, hidden=hidden)
