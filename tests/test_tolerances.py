"""tests/tolerances.py, the comparison every kernel test uses (tests/ops, tests/ext): it must reject the wrong
gradients that an absolute atol, or one scaled by a magnitude floored at 1, let through, and still accept the right
gradient rounded to the input dtype."""

from __future__ import annotations

import pytest
import torch
from tolerances import close, score_tol

# The shape of the GPU whitened_loss test: a mean over 4 * 257 * 768 elements puts each gradient element near 1e-6.
ROWS, DIM, BETA = 4 * 257, 768, 2.0


def _mean_smooth_l1_gradient(gen) -> torch.Tensor:
    """d/ds of mean(smooth_l1(s - t, beta)) in float64: clamp((s - t) / beta, -1, 1) / (rows * dim)."""
    diff = torch.randn(ROWS, DIM, generator=gen, dtype=torch.float64) * 2.0
    return (diff / BETA).clamp(-1.0, 1.0) / (ROWS * DIM)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("factor", [1.0, 8.0])
def test_small_gradient_zero_or_doubled_is_rejected(gen, dtype, factor):
    expected = _mean_smooth_l1_gradient(gen)
    assert 5e-7 < expected.abs().max() < 2e-6  # the size the old absolute tolerances could not see
    close(expected.to(dtype), expected, dtype, factor=factor)  # the right gradient, rounded to the dtype, passes
    for wrong, name in ((torch.zeros_like(expected), "all-zero"), (2 * expected, "doubled"),
                        (1.5 * expected, "1.5x")):
        with pytest.raises(AssertionError):
            close(wrong.to(dtype), expected, dtype, factor=factor)
            pytest.fail(f"a {name} gradient of magnitude {expected.abs().max():.1e} passed as {dtype}")


def test_a_gradient_wrong_in_a_few_rows_is_rejected(gen):
    expected = _mean_smooth_l1_gradient(gen)
    wrong = expected.clone()
    wrong[5:8] = 0  # e.g. a tile the kernel never wrote
    with pytest.raises(AssertionError):
        close(wrong.float(), expected, torch.float32)


def test_exactly_zero_expected_demands_zero():
    expected = torch.zeros(7, 5, dtype=torch.float64)
    close(torch.zeros(7, 5), expected, torch.float32)
    close(torch.zeros(0, 5), torch.zeros(0, 5), torch.float32)  # empty
    leak = torch.zeros(7, 5)
    leak[3, 2] = 1e-9  # a gradient leaking into rows that must get none
    with pytest.raises(AssertionError):
        close(leak, expected, torch.float32)


def test_elements_near_zero_get_the_large_elements_rounding():
    """A cancellation leaves an element near zero with the absolute error of the tensor's large ones: allowed."""
    expected = torch.tensor([1.0, -3.0, 1e-9], dtype=torch.float64)
    close(torch.tensor([1.0, -3.0, 1e-6]), expected, torch.float32)
    with pytest.raises(AssertionError):
        close(torch.tensor([1.0, -3.0, 1e-3]), expected, torch.float32)


def test_a_factor_that_would_accept_half_wrong_results_is_refused():
    x = torch.ones(3)
    close(x, x, torch.bfloat16, factor=16)  # the loosest factor the tests use
    with pytest.raises(ValueError, match="off by half its size"):
        close(x, x, torch.bfloat16, factor=20)


def test_score_tolerance_is_relative_to_the_largest_finite_score():
    scores = torch.tensor([[-50.0, 3.0], [float("inf"), 1.0]])
    assert score_tol(scores, 1e-5) == pytest.approx(5e-4, rel=1e-12)
    assert score_tol(scores * 1e-3, 1e-5) == pytest.approx(5e-7, rel=1e-12)
