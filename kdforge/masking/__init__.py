"""Maskers: which patches of the student's view are replaced by the mask token. Built-ins in
:mod:`kdforge.masking.builtin` ("random", "block"; implementations in :mod:`kdforge.masking.maskers`).

Contract (every masker, built-in or third-party)::

    masker = cls(cfg)                                  # cfg: cls.Config, from the recipe's [masker] table
    mask = masker(batch_size, (gh, gw), generator)     # BoolTensor[B, gh * gw] on the CPU, True = masked

The mask is a pure function of the arguments and the generator's state (the engine seeds the generator per step),
row-major over the grid like the patch tokens. A row may be all False (that image is not masked).
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import torch

__all__ = ["Masker", "draw_on_host"]


class Masker:
    name: ClassVar[str]

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def __call__(self, batch_size: int, grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        """BoolTensor[batch_size, gh * gw]: True where the student sees the mask token instead of the patch."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(batch_size, grid, generator)")


def check_call(batch_size: int, grid: tuple[int, int], who: str) -> tuple[int, int]:
    """Validate the call arguments; returns (gh, gw) as ints."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 0:
        raise ValueError(f"{who}: batch_size must be a non-negative int, got {batch_size!r}")
    try:
        gh, gw = (int(v) for v in grid)
    except (TypeError, ValueError):
        raise ValueError(f"{who}: grid must be (gh, gw), got {grid!r}") from None
    if gh < 1 or gw < 1:
        raise ValueError(f"{who}: grid must be positive, got {(gh, gw)}")
    return gh, gw


def draw_on_host(masker: Masker, batch_size: int, grid: tuple[int, int], seed: int,
                 device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's mask and the flat indices of its masked patches, drawn on the CPU and sent to ``device`` without
    a host synchronisation: (BoolTensor[B, gh * gw], LongTensor[M]) with M = mask.sum(), the positions
    ``b * gh * gw + n`` in row-major order. The indices are what the masked-patch losses gather with: counting the
    masked patches on the GPU (``nonzero``) would stop the CPU until every queued kernel had run."""
    mask = masker(batch_size, grid, torch.Generator().manual_seed(seed))
    index = mask.reshape(-1).nonzero().reshape(-1)
    if device.type == "cuda":  # pinned: the copies are queued and return at once
        mask, index = mask.pin_memory(), index.pin_memory()
    return mask.to(device, non_blocking=True), index.to(device, non_blocking=True)
