"""Shared helpers of the kdforge._C tests: per-dtype tolerances and a neighbour comparison up to ties."""

from __future__ import annotations

import torch

# Tolerances per input dtype, relative to the largest magnitude of the expected tensor (rtol, atol factor).
TOL = {
    torch.float64: (1e-10, 1e-12),
    torch.float32: (2e-5, 2e-6),
    torch.bfloat16: (2e-2, 1e-2),
    torch.float16: (4e-3, 2e-3),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, factor: float = 1.0) -> None:
    """actual ~ expected (computed in float64) within the tolerance of inputs of ``dtype``."""
    rtol, atol = TOL[dtype]
    scale = float(expected.abs().max()) if expected.numel() else 1.0
    torch.testing.assert_close(actual.detach().cpu().double(), expected.detach().cpu().double(),
                               rtol=rtol * factor, atol=atol * factor * max(scale, 1.0))


def assert_same_neighbours(scores, idx, ref_scores, ref_idx, tol: float, largest: bool = True) -> None:
    """Same k nearest neighbours up to ties: the scores agree within ``tol`` position by position, and for every
    query the indices whose score is clearly better than its k-th score (by more than ``tol``) are the same set."""
    scores, ref_scores = scores.detach().cpu().double(), ref_scores.detach().cpu().double()
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=tol)
    sign = 1.0 if largest else -1.0
    for q in range(scores.shape[0]):
        kth = ref_scores[q, -1] * sign
        ours = {int(i) for s, i in zip(scores[q], idx[q]) if s * sign > kth + tol}
        theirs = {int(i) for s, i in zip(ref_scores[q], ref_idx[q]) if s * sign > kth + tol}
        assert ours == theirs, f"query {q}: clearly-better neighbours differ: {sorted(ours ^ theirs)}"
