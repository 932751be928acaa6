"""Maskers: ratios, per-image probability, block shapes and determinism under a seeded generator."""

import math

import numpy as np

import pytest
import torch

from kdforge.errors import RecipeError
from kdforge.plugins import create, get_registry


def _masker(**table):
    return create("maskers", table, "masker")


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _components(mask_2d: torch.Tensor) -> list[int]:
    """Sizes of the 4-connected components of True cells in a [gh, gw] bool mask."""
    gh, gw = mask_2d.shape
    cells = {(i, j) for i in range(gh) for j in range(gw) if mask_2d[i, j]}
    sizes = []
    while cells:
        stack = [cells.pop()]
        size = 0
        while stack:
            i, j = stack.pop()
            size += 1
            for nb in ((i + 1, j), (i - 1, j), (i, j + 1), (i, j - 1)):
                if nb in cells:
                    cells.remove(nb)
                    stack.append(nb)
        sizes.append(size)
    return sizes


def test_builtin_maskers_are_registered():
    assert {"random", "block"} <= set(get_registry().names("maskers"))


def test_random_masker_follows_proteus_released_code():
    m = _masker(plugin="random")  # defaults: probability 0.5, ratio 0.5
    mask = m(4000, (14, 14), _gen())
    assert mask.dtype == torch.bool and mask.shape == (4000, 196)
    counts = mask.sum(1)
    assert set(counts.unique().tolist()) == {0, 98}  # an image is masked at 0.5 of its patches, or not at all
    assert abs((counts > 0).float().mean().item() - 0.5) < 0.03
    # positions are uniform: every patch is masked about equally often
    per_patch = mask[counts > 0].float().mean(0)
    assert per_patch.min() > 0.38 and per_patch.max() < 0.62


@pytest.mark.parametrize("ratio, grid, expected", [(0.5, (7, 7), 25), (0.25, (4, 4), 4), (0.0, (4, 4), 0), (1.0, (3, 5), 15)])
def test_random_masker_rounds_the_ratio(ratio, grid, expected):
    mask = _masker(plugin="random", mask_probability=1.0, mask_ratio=ratio)(16, grid, _gen())
    assert (mask.sum(1) == expected).all()


def test_random_masker_probability_extremes():
    assert not _masker(plugin="random", mask_probability=0.0)(64, (4, 4), _gen()).any()
    assert (_masker(plugin="random", mask_probability=1.0)(64, (4, 4), _gen()).sum(1) == 8).all()
    assert _masker(plugin="random")(0, (4, 4), _gen()).shape == (0, 16)


@pytest.mark.parametrize("plugin", ["random", "block"])
def test_maskers_are_deterministic_under_the_generator(plugin):
    m = _masker(plugin=plugin)
    a, b, c = m(32, (8, 8), _gen(1)), m(32, (8, 8), _gen(1)), m(32, (8, 8), _gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # the generator advances: two calls in a row differ
    g = _gen(1)
    assert not torch.equal(m(32, (8, 8), g), m(32, (8, 8), g))


def test_block_masker_ratios_and_probability():
    m = _masker(plugin="block")  # iBOT: probability 0.5, ratio 0.1..0.5, blocks of >= 4 patches
    mask = m(2000, (14, 14), _gen())
    assert mask.shape == (2000, 196) and mask.dtype == torch.bool
    counts = mask.sum(1).float()
    masked = counts > 0
    assert abs(masked.float().mean().item() - 0.5) < 0.04
    ratios = counts[masked] / 196
    assert ratios.max() <= 0.5 + 1e-6  # never above the largest target
    assert ratios.min() >= 0.08  # the smallest target is round(0.1 * 196) = 20; a small shortfall is allowed
    assert 0.27 < ratios.mean() < 0.31  # targets average 0.3 of the patches


def test_block_masker_reaches_its_target_closely():
    m = _masker(plugin="block", mask_probability=1.0, min_ratio=0.4, max_ratio=0.4)
    counts = m(500, (16, 16), _gen()).sum(1)
    target = round(0.4 * 256)
    assert (counts <= target).all()
    assert counts.float().mean() > target - 3 and (counts >= target - 8).float().mean() > 0.95


def test_block_masker_draws_rectangles():
    m = _masker(plugin="block", mask_probability=1.0, min_ratio=0.1, max_ratio=0.2)
    mask = m(200, (14, 14), _gen()).view(200, 14, 14)
    sizes = [s for image in mask for s in _components(image)]
    assert min(sizes) >= 4  # union of rectangles of at least min_block_patches
    # compact shapes, not scattered patches: a mask's bounding boxes are filled densely
    filled = []
    for image in mask:
        rows, cols = image.any(1).nonzero(), image.any(0).nonzero()
        if len(_components(image)) == 1:
            box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
            filled.append(image.sum().item() / box.item())
    assert filled and sum(filled) / len(filled) > 0.6
    # a random mask of the same size is far more fragmented
    rnd = _masker(plugin="random", mask_probability=1.0, mask_ratio=0.15)(200, (14, 14), _gen()).view(200, 14, 14)
    assert sum(len(_components(im)) for im in rnd) > 3 * sum(len(_components(im)) for im in mask)


def test_block_masker_respects_aspect_and_size_limits():
    # thin blocks allowed down to 1:4, no block above 6 patches
    m = _masker(plugin="block", mask_probability=1.0, min_ratio=0.3, max_ratio=0.3, max_block_patches=6,
                min_aspect=0.25)
    mask = m(50, (10, 10), _gen()).view(50, 10, 10)
    assert (mask.flatten(1).sum(1) <= 30).all() and (mask.flatten(1).sum(1) >= 24).all()
    # grids too small for one block give empty masks rather than failing
    tiny = _masker(plugin="block", mask_probability=1.0, min_block_patches=4)(8, (1, 3), _gen())
    assert tiny.shape == (8, 3) and not tiny.any()


@pytest.mark.parametrize(
    "table, message",
    [
        ({"plugin": "random", "mask_ratio": 1.5}, "mask_ratio must be in"),
        ({"plugin": "random", "mask_probabilty": 0.5}, "did you mean 'mask_probability'"),
        ({"plugin": "block", "min_ratio": 0.6, "max_ratio": 0.5}, "min_ratio <= max_ratio"),
        ({"plugin": "block", "max_block_patches": 2}, "max_block_patches"),
        ({"plugin": "block", "min_aspect": 2.0}, "min_aspect must be in"),
    ],
)
def test_bad_masker_config_is_a_recipe_error(table, message):
    with pytest.raises(RecipeError, match=message):
        _masker(**table)


def test_bad_call_arguments():
    m = _masker(plugin="random")
    with pytest.raises(ValueError, match="grid must be"):
        m(4, (0, 4), _gen())
    with pytest.raises(ValueError, match="batch_size"):
        m(-1, (4, 4), _gen())


def test_block_masker_speed_is_reasonable():
    """A training step masks a whole batch on the CPU; it must cost far less than the step itself."""
    import time

    m = _masker(plugin="block")
    m(8, (16, 16), _gen())
    best = math.inf
    for seed in range(3):
        t = time.perf_counter()
        m(256, (16, 16), _gen(seed))
        best = min(best, time.perf_counter() - t)
    print(f"block masker: {best * 1e3:.1f} ms for 256 images on a 16x16 grid (best of 3)")
    assert best < 1.0, f"{best:.3f} s for one batch"


@pytest.mark.parametrize("plugin", ["random", "block"])
@pytest.mark.parametrize("batch", [10, 7, 1, 0])
def test_exact_count_masks_int_b_times_p_images_at_random_places(plugin, batch):
    # Proteus' and DINOv2's released collate: exactly int(B x p) images of every batch are masked
    m = _masker(plugin=plugin, mask_probability=0.5)
    places = set()
    for seed in range(20):
        mask = m(batch, (8, 8), _gen(seed))
        chosen = mask.any(1)
        assert int(chosen.sum()) == int(batch * 0.5)
        places.add(tuple(chosen.nonzero().flatten().tolist()))
    if batch >= 7:
        assert len(places) > 10  # not always the same images
    # exact_count = false: each image on its own coin, so the count varies from batch to batch
    free = _masker(plugin=plugin, mask_probability=0.5, exact_count=False)
    counts = {int(free(10, (8, 8), _gen(seed)).any(1).sum()) for seed in range(20)}
    assert len(counts) > 2


def test_block_masker_stratifies_the_ratios_over_the_masked_images(monkeypatch):
    # DINOv2: the i-th of n masked images draws its ratio from the i-th of n equal slices of [min_ratio, max_ratio]
    from kdforge.masking.maskers import BlockMasker

    n_patches, lo, hi = 256, 0.1, 0.5
    for seed in range(5):
        m = _masker(plugin="block", mask_probability=0.75, min_ratio=lo, max_ratio=hi)
        targets = []
        original = BlockMasker._fill

        def spy(self, mask, target, rand):
            targets.append(target)
            return original(self, mask, target, rand)

        monkeypatch.setattr(BlockMasker, "_fill", spy)
        m(16, (16, 16), _gen(seed))
        monkeypatch.undo()
        n = int(16 * 0.75)
        assert len(targets) == n
        for i, t in enumerate(sorted(targets)):
            step = (hi - lo) / n
            assert int((lo + i * step) * n_patches) <= t <= int((lo + (i + 1) * step) * n_patches), (seed, i, t)


def test_block_masker_never_draws_a_block_as_tall_or_wide_as_the_grid():
    from kdforge.masking.maskers import _Uniforms

    m = _masker(plugin="block", min_block_patches=2)
    for grid in [(4, 4), (2, 8), (3, 5)]:
        rects = []
        for seed in range(50):
            rects += m._fill(np.zeros(grid, dtype=bool), int(0.75 * grid[0] * grid[1]), _Uniforms(_gen(seed)))
        assert rects and all(h < grid[0] and w < grid[1] for _, _, h, w in rects), grid
    # a 1-patch-high grid has no room for any block
    assert not m(4, (1, 16), _gen()).any()
