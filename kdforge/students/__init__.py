"""Students: the trainable models. Built-ins in :mod:`kdforge.students.builtin`.

Contract (every student, built-in or third-party)::

    student = cls(cfg)                          # cfg: cls.Config, built from the recipe's [student] table
    out = student(images, mask=None)            # images: Tensor[B, 3, H, W] float in [0, 1]
    out.cls      # Tensor[B, D]     after the final norm
    out.patches  # Tensor[B, N, D]  after the final norm, N = gh * gw (no register tokens)
    out.grid     # (gh, gw)
    out.logits   # Tensor[B, C] from the student's own classifier, or None (a student without one)
    student.features(images) -> Tensor[B, D]    # the CLS token after the norm, for evaluation
    student.intermediate_layers(images, n)      # optional: the last n blocks' StudentOutputs, oldest first,
                                                # each after the final norm (the linear_dinov2 evaluator reads them)

The student owns its input normalisation. Where ``mask`` (BoolTensor[B, N]) is True the patch embedding is
replaced by a learnable mask token before the position embedding is added (iBOT / DINOv2); students without patch
tokens to mask (the timm student on a CNN, the "encoder" student) refuse a mask with a KdforgeError.

Also here: :class:`ProjectionHead` (Proteus A.9: LayerNorm + Linear, maps student width to teacher width),
:func:`check_grids` (teacher and student patch grids must agree for patch-level losses) and
:func:`resize_patches` (bilinear resampling of a token grid, for when they may differ).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.errors import ShapeError
from kdforge.teachers import check_images, patch_grid

__all__ = ["ProjectionHead", "Student", "StudentOutput", "check_grids", "resize_patches"]


@dataclasses.dataclass
class StudentOutput:
    """What a student gives for one batch. Shapes: B images, N = gh * gw patches, D = ``student.embed_dim``."""

    cls: Tensor
    """Tensor[B, D]: the CLS token after the final norm (the mean patch token for models without a CLS token)."""
    patches: Tensor
    """Tensor[B, N, D]: patch tokens after the final norm, row-major over the grid, no register tokens."""
    grid: tuple[int, int]
    """(gh, gw): the patch grid of ``patches``."""
    logits: Tensor | None = None
    """Tensor[B, C]: the student's own classifier output (students built with ``num_classes`` > 0), else None."""


class Student(nn.Module):
    """A trainable encoder. Subclasses set ``embed_dim``, ``patch_size`` and ``model_name``."""

    name: ClassVar[str]

    @dataclasses.dataclass
    class Config:
        pass

    embed_dim: int
    patch_size: int
    #: Human-readable model name used in messages ("vit_small_patch14_dinov2").
    model_name: str

    def __init__(self, cfg: Any):
        super().__init__()
        self.cfg = cfg
        self.model_name = getattr(self, "name", type(self).__name__)

    def grid(self, image_size: tuple[int, int]) -> tuple[int, int]:
        """The (gh, gw) patch grid for images of ``image_size`` = (H, W)."""
        return patch_grid(self.model_name, "student", image_size, self.patch_size)

    def forward(self, images: Tensor, mask: Tensor | None = None) -> StudentOutput:
        """Tensor[B, 3, H, W] in [0, 1] (and BoolTensor[B, N] mask) -> :class:`StudentOutput`."""
        raise NotImplementedError(f"{type(self).__name__} must implement forward(images, mask=None)")

    def features(self, images: Tensor) -> Tensor:
        """Tensor[B, 3, H, W] in [0, 1] -> Tensor[B, D]: the CLS token after the final norm (no mask)."""
        return self.forward(images).cls


class ProjectionHead(nn.Module):
    """LayerNorm + Linear (Proteus, appendix A.9): Tensor[..., in_dim] -> Tensor[..., out_dim].

    Proteus maps the student's tokens to the teacher's width with this head, one per objective; the LayerNorm
    was slightly better than alternatives in the paper's ablation (Tab. 20).
    """

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        if in_dim < 1 or out_dim < 1:
            raise ShapeError(f"ProjectionHead needs positive widths, got in_dim={in_dim}, out_dim={out_dim}")
        self.in_dim, self.out_dim = in_dim, out_dim
        self.norm = nn.LayerNorm(in_dim)
        self.linear = nn.Linear(in_dim, out_dim)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)  # timm / DeiT's init for linear layers
        nn.init.zeros_(self.linear.bias)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.in_dim:
            raise ShapeError(f"ProjectionHead expects [..., {self.in_dim}], got {tuple(x.shape)}")
        return self.linear(self.norm(x))


def _hw(image_size) -> tuple[int, int]:
    return (int(image_size), int(image_size)) if isinstance(image_size, int) else (int(image_size[0]), int(image_size[1]))


def check_grids(teacher, student, image_size, resize: bool) -> tuple[tuple[int, int], tuple[int, int]]:
    """Check at start-up that the teacher's and student's patch grids fit; returns (teacher_grid, student_grid).

    Patch-level losses compare token i of the teacher with token i of the student, so both grids must be equal,
    unless ``resize`` is allowed (the loss then resamples the teacher's tokens with :func:`resize_patches`).
    Raises :class:`ShapeError` naming both models, their patch sizes and the three ways out.
    """
    size = _hw(image_size)
    t_grid = tuple(teacher.grid(size))
    s_grid = tuple(student.grid(size))
    if t_grid != s_grid and not resize:
        t_name = getattr(teacher, "model_name", getattr(teacher, "name", type(teacher).__name__))
        s_name = getattr(student, "model_name", getattr(student, "name", type(student).__name__))
        tp, sp = teacher.patch_size, student.patch_size
        px = f"{size[0]} px" if size[0] == size[1] else f"{size[0]}x{size[1]} px"
        raise ShapeError(
            f"teacher {t_name} gives a {t_grid[0]}x{t_grid[1]} patch grid at {px} (patch {tp}) but student {s_name} "
            f"gives {s_grid[0]}x{s_grid[1]} (patch {sp}): use a student with patch size {tp}, set "
            f"student.model_kwargs.patch_size = {tp}, or set train.resize_teacher_grid = true"
        )
    return t_grid, s_grid


def resize_patches(patches: Tensor, from_grid: tuple[int, int], to_grid: tuple[int, int]) -> Tensor:
    """Bilinearly resample patch tokens Tensor[B, gh * gw, D] on grid ``from_grid`` to Tensor[B, gh' * gw', D].

    Treats the tokens as a D-channel image of the grid (half-pixel centres, ``align_corners=False``), so a token
    grid covering the same image at another patch size maps position for position. Same grid: returned as is.
    """
    from_grid, to_grid = tuple(from_grid), tuple(to_grid)
    if patches.ndim != 3 or patches.shape[1] != from_grid[0] * from_grid[1]:
        raise ShapeError(
            f"resize_patches: expected patches [B, {from_grid[0]}*{from_grid[1]}, D], got {tuple(patches.shape)}"
        )
    if from_grid == to_grid:
        return patches
    b, _, d = patches.shape
    grid = patches.transpose(1, 2).reshape(b, d, from_grid[0], from_grid[1])
    # half precision is interpolated in float32 and cast back (bf16 tokens under autocast); float64 stays float64
    work = grid.float() if grid.dtype in (torch.float16, torch.bfloat16) else grid
    out = F.interpolate(work, size=to_grid, mode="bilinear", align_corners=False).to(patches.dtype)
    return out.flatten(2).transpose(1, 2)


def check_mask(mask: Tensor, batch: int, grid: tuple[int, int], who: str) -> None:
    """ShapeError unless ``mask`` is a BoolTensor[batch, gh * gw]."""
    n = grid[0] * grid[1]
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool or tuple(mask.shape) != (batch, n):
        got = f"{mask.dtype} {tuple(mask.shape)}" if isinstance(mask, Tensor) else type(mask).__name__
        raise ShapeError(
            f"{who}: mask must be a BoolTensor[B, N] = [{batch}, {n}] for a {grid[0]}x{grid[1]} patch grid, got {got}"
        )


__all__ += ["check_images", "check_mask"]
