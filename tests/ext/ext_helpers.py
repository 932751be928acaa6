"""Shared helper of the kdforge._C tests: a neighbour comparison up to ties (values: tests/tolerances.py)."""

from __future__ import annotations

import torch
from tolerances import score_tol


def assert_same_neighbours(scores, idx, ref_scores, ref_idx, rtol: float, largest: bool = True) -> None:
    """Same k nearest neighbours up to ties: the scores agree within ``tol`` = ``rtol`` times the largest reference
    |score|, position by position, and for every query the indices whose score is clearly better than its k-th
    score (by more than ``tol``) are the same set."""
    scores, ref_scores = scores.detach().cpu().double(), ref_scores.detach().cpu().double()
    tol = score_tol(ref_scores, rtol)
    torch.testing.assert_close(scores, ref_scores, rtol=0, atol=tol)
    sign = 1.0 if largest else -1.0
    for q in range(scores.shape[0]):
        kth = ref_scores[q, -1] * sign
        ours = {int(i) for s, i in zip(scores[q], idx[q]) if s * sign > kth + tol}
        theirs = {int(i) for s, i in zip(ref_scores[q], ref_idx[q]) if s * sign > kth + tol}
        assert ours == theirs, f"query {q}: clearly-better neighbours differ: {sorted(ours ^ theirs)}"
