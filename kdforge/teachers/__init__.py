"""Teachers: frozen models that produce distillation targets. Built-ins in :mod:`kdforge.teachers.builtin`.

Contract (every teacher, built-in or third-party)::

    teacher = cls(cfg)                      # cfg: cls.Config, built from the recipe's [teacher] table
    out = teacher(images)                   # images: Tensor[B, 3, H, W] float in [0, 1]
    out.cls      # Tensor[B, D]     CLS token after the final norm (DINOv2's x_norm_clstoken)
    out.patches  # Tensor[B, N, D]  patch tokens after the final norm, N = gh * gw, no register tokens
    out.grid     # (gh, gw)
    out.hidden   # list of Tensor[B, 1 + N, D] (CLS then patches) for the last `hidden_layers` blocks, or None
    out.logits   # Tensor[B, C] task logits (a teacher adapted to a task), or None
    teacher.intermediate_layers(images, n)  # optional (timm ViT teachers): the last n blocks' TeacherOutputs,
                                            # oldest first, after the final norm (for the linear_dinov2 evaluator)

The base class owns what every teacher must do the same way (timm's ``task/distillation.py`` habit): input
normalisation with the model's mean/std, eval mode that ``.train()`` cannot undo, no gradients, inference mode,
autocast on the input's device type, and float32 outputs that are ordinary tensors (inference-mode tensors cannot
be saved for backward, and the losses put the teacher's outputs into autograd graphs).
Subclasses implement :meth:`Teacher.encode` on normalised images.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ClassVar, Literal

import torch
from torch import Tensor, nn

from kdforge.errors import ShapeError
from kdforge.ranges import NonNegativeInt

__all__ = ["Teacher", "TeacherOutput", "autocast_context", "to_plain_float"]

_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass
class TeacherOutput:
    """What a teacher gives for one batch. Shapes: B images, N = gh * gw patches, D = ``teacher.embed_dim``."""

    cls: Tensor
    """Tensor[B, D]: the CLS token after the final norm (the mean patch token for models without a CLS token)."""
    patches: Tensor
    """Tensor[B, N, D]: patch tokens after the final norm, row-major over the (gh, gw) grid, no register tokens."""
    grid: tuple[int, int]
    """(gh, gw): the patch grid of ``patches``."""
    hidden: list[Tensor] | None = None
    """Outputs of the last ``hidden_layers`` blocks, oldest first, each Tensor[B, 1 + N, D] (CLS, then patches)."""
    logits: Tensor | None = None
    """Tensor[B, C]: task logits of a teacher adapted to a task (the "adapted" teacher), else None."""


def to_plain_float(t: Tensor) -> Tensor:
    """``t`` as float32, guaranteed not to be an inference tensor (call outside inference mode)."""
    if t.dtype != torch.float32:
        return t.float()  # a new, ordinary tensor
    return t.clone() if t.is_inference() else t


def autocast_context(device_type: str, autocast: str) -> contextlib.AbstractContextManager:
    """``torch.autocast`` for ``autocast`` in {"bf16", "fp16"}, a no-op for "none"; "auto" is "bf16" on CUDA and
    "none" elsewhere (CPUs without bf16 units emulate it, several times slower than float32)."""
    if autocast == "auto":
        autocast = "bf16" if device_type == "cuda" else "none"
    if autocast == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=_AUTOCAST_DTYPES[autocast])


class Teacher(nn.Module):
    """A frozen feature extractor. Subclasses set ``embed_dim``, ``patch_size``, ``model_name`` and the model's
    mean/std (:meth:`set_normalization`), then call :meth:`freeze`; they implement :meth:`encode`."""

    name: ClassVar[str]

    @dataclasses.dataclass
    class Config:
        autocast: Literal["auto", "bf16", "fp16", "none"] = "auto"
        """Mixed precision of the teacher's forward: auto is bf16 on CUDA, none elsewhere; outputs are float32."""
        hidden_layers: NonNegativeInt = 0
        """How many of the last blocks' outputs to return in TeacherOutput.hidden (0: none)."""

        def __post_init__(self):
            if self.hidden_layers < 0:
                raise ValueError(f"hidden_layers must be >= 0, got {self.hidden_layers}")

    embed_dim: int
    patch_size: int
    #: Human-readable model name used in messages ("dinov2_vitb14"); defaults to the plugin name.
    model_name: str

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg
        self.model_name = getattr(self, "name", type(self).__name__)
        # ImageNet statistics until the subclass knows its model's; non-persistent: they are not weights.
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    # -- helpers for subclasses -------------------------------------------------------------------------------------

    def set_normalization(self, mean, std) -> None:
        """Use ``mean``/``std`` (3 floats each, for images in [0, 1]) to normalise inputs."""
        mean_t = torch.as_tensor(tuple(mean), dtype=torch.float32)
        std_t = torch.as_tensor(tuple(std), dtype=torch.float32)
        if mean_t.numel() != 3 or std_t.numel() != 3:
            raise ShapeError(f"{self.model_name}: mean and std need 3 values (RGB), got {tuple(mean)} and {tuple(std)}")
        self.mean.copy_(mean_t.view(1, 3, 1, 1))
        self.std.copy_(std_t.view(1, 3, 1, 1))

    def freeze(self) -> None:
        """No gradients, eval mode (kept by :meth:`train`)."""
        for p in self.parameters():
            p.requires_grad_(False)
        super().train(False)

    # -- the contract -----------------------------------------------------------------------------------------------

    def train(self, mode: bool = True) -> "Teacher":
        """A teacher stays in eval mode: dropout, drop path and batch-norm statistics would change its targets."""
        return super().train(False)

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The (gh, gw) patch grid for images of ``image_size`` = (H, W); ShapeError if H or W is not a multiple."""
        return patch_grid(self.model_name, "teacher", image_size, self.patch_size)

    def forward(self, images: Tensor, *, encode: Callable[[Tensor], Any] | None = None) -> TeacherOutput:
        """Tensor[B, 3, H, W] float in [0, 1] -> :class:`TeacherOutput` (float32, ordinary tensors). ``encode``
        stands in for :meth:`encode` (the same function compiled: ``train.compile_teacher``)."""
        out = self.run_frozen(encode if encode is not None else self.encode, images)
        return TeacherOutput(
            cls=to_plain_float(out.cls),
            patches=to_plain_float(out.patches),
            grid=tuple(out.grid),
            hidden=None if out.hidden is None else [to_plain_float(h) for h in out.hidden],
            logits=None if getattr(out, "logits", None) is None else to_plain_float(out.logits),
        )

    def run_frozen(self, encode: Callable[[Tensor], Any], images: Tensor) -> Any:
        """``encode(normalised images)`` the way every teacher pass runs: images checked, normalised with the
        model's mean/std, under inference mode and the teacher's autocast. Outputs are inference tensors in any
        dtype: convert them with :func:`to_plain_float` (as :meth:`forward` does) after this returns."""
        check_images(images, f"teacher {self.model_name}")
        with torch.inference_mode():
            x = (images.to(self.mean.dtype) - self.mean) / self.std
            with autocast_context(images.device.type, self.cfg.autocast):
                return encode(x)

    def encode(self, x: Tensor) -> TeacherOutput:
        """Normalised Tensor[B, 3, H, W] -> TeacherOutput (any dtype). Runs under inference mode and autocast."""
        raise NotImplementedError(f"{type(self).__name__} must implement encode(x)")


def check_images(images: Tensor, who: str) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4 or images.shape[1] != 3:
        got = tuple(images.shape) if isinstance(images, Tensor) else type(images).__name__
        raise ShapeError(f"{who} expects images as Tensor[B, 3, H, W], got {got}")
    if not images.is_floating_point():
        raise ShapeError(
            f"{who} expects float images in [0, 1], got dtype {images.dtype}; convert uint8 images with x.float() / 255"
        )


def patch_grid(model_name: str, role: str, image_size: tuple[int, int], patch_size: int | tuple[int, int]):
    """(H // ph, W // pw), or ShapeError naming the model when the image does not split into whole patches."""
    h, w = (int(image_size), int(image_size)) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))
    ph, pw = (patch_size, patch_size) if isinstance(patch_size, int) else patch_size
    if h % ph or w % pw:
        raise ShapeError(
            f"{role} {model_name} has patch size {ph}x{pw} but the images are {h}x{w} px, not a whole number of "
            f"patches: use an image size that is a multiple of {ph} (e.g. {max(ph, h // ph * ph)})"
        )
    return h // ph, w // pw
