"""kdforge.retrieval de-duplication and leak finding (papers/001, B.3 and B.4) against brute force."""

from __future__ import annotations

import pytest
import torch

from kdforge.errors import ShapeError
from kdforge.retrieval import deduplicate, find_leaks


def _brute_force_keep(x, threshold):
    """Lowest id of each connected component of the pairs with cosine similarity > threshold (full matrix, BFS)."""
    u = torch.nn.functional.normalize(x.double(), dim=1)
    adj = (u @ u.T) > threshold
    seen, keep = set(), []
    for start in range(len(x)):
        if start in seen:
            continue
        keep.append(start)
        stack = [start]
        seen.add(start)
        while stack:
            i = stack.pop()
            for j in adj[i].nonzero().squeeze(1).tolist():
                if j not in seen:
                    seen.add(j)
                    stack.append(j)
    return keep


def _with_duplicates(gen, num, dim, groups):
    """Random embeddings; each group (a list of ids) becomes near-copies of its first id, as a chain: each member
    is a small step from the previous one, so the ends of a long chain can be less similar than the threshold."""
    x = torch.randn(num, dim, generator=gen)
    for group in groups:
        for prev, cur in zip(group, group[1:]):
            x[cur] = x[prev] + 0.08 * x[prev].norm() / dim**0.5 * torch.randn(dim, generator=gen)
    return x * (0.5 + torch.rand(num, 1, generator=gen))  # norms differ: similarity is cosine


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_deduplicate_keeps_one_per_cluster(gen, backend):
    groups = [[3, 17, 40, 41, 42, 43, 44, 45], [5, 9], [60, 2, 33]]
    x = _with_duplicates(gen, 70, 32, groups)
    u = torch.nn.functional.normalize(x, dim=1)
    assert (u[3] @ u[45]) < 0.99 < (u[3] @ u[17])  # the chain's ends alone are not duplicates
    keep = deduplicate(x, threshold=0.99, k=4, backend=backend)
    assert keep.tolist() == _brute_force_keep(x, 0.99)
    dropped = set(range(70)) - set(keep.tolist())
    assert dropped == {17, 40, 41, 42, 43, 44, 45, 9, 60, 33}  # 2 is the lowest id of its group


def test_deduplicate_threshold_and_small_inputs(gen):
    x = _with_duplicates(gen, 30, 16, [[0, 1]])
    assert deduplicate(x, threshold=1.0).tolist() == list(range(30))  # nothing is more similar than 1
    assert deduplicate(x, threshold=-1.0).tolist() == [0]  # everything is
    assert deduplicate(x[:1]).tolist() == [0]
    assert deduplicate(x[:0]).tolist() == []
    with pytest.raises(ValueError, match=r"cosine similarity in \[-1, 1\]"):
        deduplicate(x, threshold=1.5)
    with pytest.raises(ShapeError, match=r"floating tensor \[rows, D\]"):
        deduplicate(x[0])
    with pytest.raises(ValueError, match="k must be an int >= 1, got 0"):
        deduplicate(x, k=0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_find_leaks(gen, backend):
    task = torch.randn(50, 24, generator=gen)
    retrieved = torch.randn(40, 24, generator=gen)
    leaked = {4: 10, 22: 31, 39: 0}  # retrieved row -> task row it copies (slightly altered, rescaled)
    for r, t in leaked.items():
        retrieved[r] = 3.0 * (task[t] + 0.01 * torch.randn(24, generator=gen))
    leaks = find_leaks(retrieved, task, threshold=0.95, n_nearest=5, backend=backend)
    assert leaks.ids.tolist() == sorted(leaked)
    assert leaks.nearest[:, 0].tolist() == [leaked[r] for r in sorted(leaked)]
    assert leaks.nearest.shape == leaks.similarity.shape == (3, 5)
    assert (leaks.similarity[:, 0] > 0.95).all() and (leaks.similarity[:, 1:] < 0.95).all()
    full = torch.nn.functional.normalize(retrieved, dim=1) @ torch.nn.functional.normalize(task, dim=1).T
    assert ((full.max(dim=1).values > 0.95).nonzero().squeeze(1)).tolist() == sorted(leaked)


def test_find_leaks_errors(gen):
    with pytest.raises(ShapeError, match="D=8 but task has D=9"):
        find_leaks(torch.randn(3, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="task holds no embeddings"):
        find_leaks(torch.randn(3, 8), torch.randn(0, 8))
    with pytest.raises(ValueError, match="n_nearest must be an int >= 1"):
        find_leaks(torch.randn(3, 8), torch.randn(2, 8), n_nearest=0)
    task = torch.randn(2, 8, generator=gen)
    leaks = find_leaks(torch.cat([task[1:] * 2, torch.randn(2, 8, generator=gen)]), task, n_nearest=5)
    assert leaks.ids.tolist() == [0] and leaks.nearest.tolist() == [[1, 0]]  # n_nearest capped at the 2 task rows
