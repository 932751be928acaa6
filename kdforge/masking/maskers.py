"""The built-in maskers: "random" (Proteus' released code) and "block" (iBOT-style blocks, as the Proteus paper says,
drawn as DINOv2's and iBOT's released code draws them).

Both draw every random number from the ``generator`` argument, so the same generator state gives the same mask.
Both mask exactly int(B x mask_probability) images of a batch of B by default (``exact_count``, as the released
Proteus and DINOv2 collate functions do), at random places in the batch; ``exact_count = false`` masks each image
independently with that probability instead.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch

from kdforge.masking import Masker, check_call

__all__ = ["BlockMasker", "RandomMasker"]


def _masked_images(batch_size: int, probability: float, exact: bool, generator: torch.Generator) -> torch.Tensor:
    """BoolTensor[batch_size]: which images of the batch are masked. ``exact``: exactly int(batch_size x
    probability) of them, at uniformly random places (the released code masks the first ones of a randomly ordered
    batch, or shuffles); otherwise each one independently with ``probability``."""
    if not exact:
        return torch.rand(batch_size, generator=generator) < probability
    chosen = torch.zeros(batch_size, dtype=torch.bool)
    chosen[torch.randperm(batch_size, generator=generator)[: int(batch_size * probability)]] = True
    return chosen


def _count(ratio: float, n: int) -> int:
    """round(ratio * n), halves rounded up (Python's round() would round 24.5 down to 24)."""
    return min(n, int(math.floor(ratio * n + 0.5)))


class RandomMasker(Masker):
    """int(B x ``mask_probability``) images of a batch of B are masked (``exact_count``; or each image with that
    probability); a masked image has round(``mask_ratio`` * N) patches masked at uniformly random positions
    (Proteus' released code: 0.5 and 0.5; it truncates the count, which differs only where ``mask_ratio`` * N has a
    fractional part of at least one half, never for its 0.5 x 256)."""

    name = "random"

    @dataclasses.dataclass
    class Config:
        mask_probability: float = 0.5
        """Probability that an image of the batch is masked at all."""
        mask_ratio: float = 0.5
        """Fraction of the patches masked in a masked image (rounded to a whole number of patches)."""
        exact_count: bool = True
        """Mask exactly int(B x mask_probability) images per batch of B (the released code); false: each image
        independently with probability mask_probability."""

        def __post_init__(self):
            for key in ("mask_probability", "mask_ratio"):
                value = getattr(self, key)
                if not 0.0 <= value <= 1.0:
                    raise ValueError(f"{key} must be in [0, 1], got {value}")

    def __call__(self, batch_size: int, grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        gh, gw = check_call(batch_size, grid, "random masker")
        n = gh * gw
        chosen = _masked_images(batch_size, self.cfg.mask_probability, self.cfg.exact_count, generator)
        k = _count(self.cfg.mask_ratio, n)
        # k positions per row: the k smallest of n uniform scores are a uniform random k-subset
        scores = torch.rand(batch_size, n, generator=generator)
        mask = torch.zeros(batch_size, n, dtype=torch.bool)
        if k > 0:
            mask.scatter_(1, scores.topk(k, dim=1, largest=False).indices, True)
        return mask & chosen.unsqueeze(1)


class _Uniforms:
    """Uniform [0, 1) numbers from a torch generator, drawn in chunks (one torch call per chunk, not per number)."""

    def __init__(self, generator: torch.Generator, chunk: int = 4096):
        self.generator, self.chunk = generator, chunk
        self.buf: list[float] = []
        self.pos = 0

    def __call__(self) -> float:
        if self.pos == len(self.buf):
            self.buf = torch.rand(self.chunk, generator=self.generator, dtype=torch.float64).tolist()
            self.pos = 0
        self.pos += 1
        return self.buf[self.pos - 1]


class BlockMasker(Masker):
    """iBOT / BEiT-style block masking as DINOv2's and iBOT's released code draws it: n = int(B x
    ``mask_probability``) images of a batch are masked (``exact_count``); their target ratios are stratified over
    [min_ratio, max_ratio] (the i-th of the n draws uniformly from the i-th of n equal sub-intervals, target
    int(ratio x N) patches) and the masks are placed at random places in the batch. Rectangles (area drawn uniformly
    from [min_block_patches, the count still missing], aspect ratio log-uniform in [min_aspect, 1 / min_aspect],
    both sides strictly smaller than the grid's: a block never spans a whole row or column of the grid) are added
    at random places until the target count is reached.

    A rectangle is accepted only if it has at least ``min_block_patches`` patches and adds at least one new patch
    and no more than the count still missing, so a mask never exceeds its target; after ``max_attempts`` rejected
    rectangles in a row the image keeps what it has (on small grids the count can fall a little short of the
    target). ``exact_count = false``: each image is masked with probability ``mask_probability`` and its ratio
    drawn uniformly from the whole range (not stratified).
    """

    name = "block"

    @dataclasses.dataclass
    class Config:
        mask_probability: float = 0.5
        """Probability that an image of the batch is masked at all."""
        min_ratio: float = 0.1
        """Smallest fraction of patches masked in a masked image (iBOT: 0.1)."""
        max_ratio: float = 0.5
        """Largest fraction of patches masked in a masked image (iBOT: 0.5)."""
        min_block_patches: int = 4
        """Smallest rectangle, in patches."""
        max_block_patches: int = 0
        """Largest rectangle, in patches (0: no limit other than the count still missing)."""
        min_aspect: float = 0.3
        """Aspect ratios (height / width) are drawn log-uniformly from [min_aspect, 1 / min_aspect]."""
        max_attempts: int = 10
        """Rejected rectangles in a row after which an image stops growing its mask."""
        exact_count: bool = True
        """Mask exactly int(B x mask_probability) images per batch with stratified ratios (DINOv2 / iBOT); false:
        each image independently with probability mask_probability, its ratio uniform over the range."""

        def __post_init__(self):
            if not 0.0 <= self.mask_probability <= 1.0:
                raise ValueError(f"mask_probability must be in [0, 1], got {self.mask_probability}")
            if not 0.0 <= self.min_ratio <= self.max_ratio <= 1.0:
                raise ValueError(
                    f"need 0 <= min_ratio <= max_ratio <= 1, got min_ratio={self.min_ratio}, max_ratio={self.max_ratio}"
                )
            if self.min_block_patches < 1:
                raise ValueError(f"min_block_patches must be >= 1, got {self.min_block_patches}")
            if self.max_block_patches and self.max_block_patches < self.min_block_patches:
                raise ValueError(
                    f"max_block_patches ({self.max_block_patches}) must be 0 or >= min_block_patches "
                    f"({self.min_block_patches})"
                )
            if not 0.0 < self.min_aspect <= 1.0:
                raise ValueError(f"min_aspect must be in (0, 1], got {self.min_aspect}")
            if self.max_attempts < 1:
                raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")

    def __call__(self, batch_size: int, grid: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
        gh, gw = check_call(batch_size, grid, "block masker")
        cfg = self.cfg
        rand = _Uniforms(generator)
        out = np.zeros((batch_size, gh, gw), dtype=bool)
        lo, span = cfg.min_ratio, cfg.max_ratio - cfg.min_ratio
        if cfg.exact_count:
            places = _masked_images(batch_size, cfg.mask_probability, True, generator).nonzero().flatten().tolist()
            n = len(places)
            order = torch.randperm(n, generator=generator).tolist()  # which stratum each masked image gets
            for i, stratum in zip(places, order):
                ratio = lo + span * (stratum + rand()) / n
                self._fill(out[i], int(ratio * gh * gw), rand)
        else:
            for i in range(batch_size):
                # two draws per image whether or not it is masked: image i's mask never depends on image i-1's choice
                masked_image = rand() < cfg.mask_probability
                ratio = lo + span * rand()
                if masked_image:
                    self._fill(out[i], _count(ratio, gh * gw), rand)
        return torch.from_numpy(out.reshape(batch_size, gh * gw))

    def _fill(self, mask: np.ndarray, target: int, rand: _Uniforms) -> list[tuple[int, int, int, int]]:
        """Adds rectangles to ``mask`` (in place) up to ``target`` patches; returns them as (top, left, h, w)."""
        cfg = self.cfg
        gh, gw = mask.shape
        log_lo = math.log(cfg.min_aspect)
        count, misses, rects = 0, 0, []
        while count < target and misses < cfg.max_attempts:
            missing = target - count
            upper = max(cfg.min_block_patches, min(missing, cfg.max_block_patches or missing))
            area = cfg.min_block_patches + (upper - cfg.min_block_patches) * rand()
            aspect = math.exp(log_lo + (-2 * log_lo) * rand())  # log-uniform in [min_aspect, 1 / min_aspect]
            h = max(1, int(round(math.sqrt(area * aspect))))
            w = max(1, int(round(math.sqrt(area / aspect))))
            if h >= gh or w >= gw:  # never a block as tall or as wide as the grid (DINOv2 / iBOT)
                misses += 1
                continue
            top = int(rand() * (gh - h + 1))
            left = int(rand() * (gw - w + 1))
            block = mask[top : top + h, left : left + w]
            new = h * w - int(block.sum())
            # rounding can shrink a rectangle below the minimum: such a one is rejected too
            if h * w >= cfg.min_block_patches and 0 < new <= missing:
                block[...] = True
                count += new
                misses = 0
                rects.append((top, left, h, w))
            else:
                misses += 1
        return rects
