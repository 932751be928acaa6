"""kdforge.retrieval selection rules: query-balanced (papers/001 section 3.4) against a literal step-by-step
implementation of the paper's text, and the best-matches / random baselines against brute force."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kdforge.errors import ShapeError
from kdforge.ops import knn
from kdforge.retrieval import best_matches, query_balanced, random_ids


def _neighbor_lists(gen, num_q, k, num_g):
    """Random [Q, K] lists of distinct ids from a small gallery, so that the queries' lists overlap a lot."""
    return torch.stack([torch.randperm(num_g, generator=gen)[:k] for _ in range(num_q)])


def _literal_query_balanced(neighbors, n, order):
    """The paper's words, step by step: grow k until the union has >= n ids, then drop the k-th neighbour of
    queries taken in ``order`` (the random choice) one at a time until exactly n remain."""
    rows = neighbors.tolist()
    for k in range(1, neighbors.shape[1] + 1):
        if len({i for row in rows for i in row[:k]}) >= n:
            break
    lists = [row[:k] for row in rows]
    for q in order:
        if len({i for lst in lists for i in lst}) == n:
            break
        lists[q] = lists[q][: k - 1]
    return sorted({i for lst in lists for i in lst}), k


def _permutation(num_q, seed):
    return torch.randperm(num_q, generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize("num_q,k,num_g", [(7, 12, 30), (23, 9, 200), (40, 5, 60), (1, 10, 10)])
def test_query_balanced_is_the_papers_rule(gen, num_q, k, num_g):
    neighbors = _neighbor_lists(gen, num_q, k, num_g)
    distinct = neighbors.unique().numel()
    for n in sorted({1, 2, num_q, distinct // 3, distinct // 2, distinct - 1, distinct} - {0}):
        for seed in (0, 1, 2):
            got = query_balanced(neighbors, n, seed=seed)
            expected, k_used = _literal_query_balanced(neighbors, n, _permutation(num_q, seed))
            assert got.tolist() == expected, (n, seed)
            assert got.dtype == torch.long and got.numel() == n
            # Everything comes from the first k columns and every id of the first k - 1 is in.
            assert set(got.tolist()) <= set(neighbors[:, :k_used].reshape(-1).tolist())
            assert set(neighbors[:, : k_used - 1].reshape(-1).tolist()) <= set(got.tolist())


def test_query_balanced_gives_every_query_an_equal_share(gen):
    """Disjoint neighbour lists (no gallery item shared between queries): each query contributes n // Q or
    n // Q + 1 of its own nearest items, whichever queries the seed picks to lose their k-th."""
    num_q, k = 10, 8
    neighbors = torch.arange(num_q * k).reshape(num_q, k)  # query q's neighbours are q*k .. q*k + k - 1
    got = query_balanced(neighbors, 25, seed=3)
    per_query = torch.bincount(got // k, minlength=num_q)
    assert per_query.sum() == 25 and set(per_query.tolist()) == {2, 3}
    for q in range(num_q):  # a query's share is its best-ranked items
        mine = got[got // k == q] - q * k
        assert mine.tolist() == list(range(len(mine)))


def test_query_balanced_seed(gen):
    neighbors = _neighbor_lists(gen, 30, 6, 500)
    a = query_balanced(neighbors, 50, seed=0)
    assert torch.equal(a, query_balanced(neighbors, 50, seed=0))
    others = [query_balanced(neighbors, 50, seed=s) for s in range(1, 6)]
    assert any(not torch.equal(a, b) for b in others)


def test_query_balanced_accepts_numpy_and_zero(gen):
    neighbors = _neighbor_lists(gen, 4, 3, 20)
    assert torch.equal(query_balanced(neighbors.numpy(), 5, seed=1), query_balanced(neighbors, 5, seed=1))
    assert query_balanced(neighbors, 0, seed=1).shape == (0,)


def test_selection_errors(gen):
    neighbors = _neighbor_lists(gen, 3, 4, 50)
    distinct = neighbors.unique().numel()
    with pytest.raises(ValueError, match=f"hold {distinct} distinct gallery ids, fewer than n={distinct + 1}"):
        query_balanced(neighbors, distinct + 1, seed=0)
    with pytest.raises(ValueError, match="faiss pads with -1"):
        query_balanced(torch.tensor([[3, -1]]), 1, seed=0)
    with pytest.raises(ValueError, match="query 1 lists a gallery id more than once"):
        query_balanced(torch.tensor([[1, 2], [4, 4]]), 2, seed=0)
    with pytest.raises(TypeError, match="integer gallery ids"):
        query_balanced(neighbors.float(), 2, seed=0)
    with pytest.raises(ShapeError, match=r"must be \[Q, K\]"):
        query_balanced(neighbors[0], 2, seed=0)
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        query_balanced(neighbors, -1, seed=0)
    with pytest.raises(ValueError, match="fewer than n"):
        best_matches(neighbors, torch.zeros(neighbors.shape), distinct + 1)
    with pytest.raises(ShapeError, match="must share a shape"):
        best_matches(neighbors, torch.zeros(3, 3), 2)
    with pytest.raises(ValueError, match="metric must be"):
        best_matches(neighbors, torch.zeros(neighbors.shape), 2, metric="cos")
    with pytest.raises(ValueError, match="cannot draw n=11"):
        random_ids(10, 11, seed=0)


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_best_matches_is_the_nearest_to_the_query_set(gen, metric):
    """With complete lists (K = G), best matches are the gallery items ranked by their nearest query's score."""
    queries, gallery = torch.randn(6, 8, generator=gen), torch.randn(40, 8, generator=gen)
    scores, neighbors = knn(queries, gallery, 40, metric=metric, backend="reference")
    if metric == "l2":
        best = torch.cdist(gallery.double(), queries.double()).pow(2).min(dim=1).values
        expected = best.argsort()[:15]
    else:
        best = (gallery.double() @ queries.double().T).max(dim=1).values
        expected = best.argsort(descending=True)[:15]
    got = best_matches(neighbors, scores, 15, metric=metric)
    assert got.tolist() == sorted(expected.tolist())


def test_best_matches_breaks_ties_by_lower_id():
    neighbors = torch.tensor([[5, 2, 9], [7, 3, 1]])
    scores = torch.tensor([[0.0, 1.0, 1.0], [0.5, 1.0, 1.0]])
    assert best_matches(neighbors, scores, 4, metric="l2").tolist() == [1, 2, 5, 7]


def test_query_balanced_is_more_diverse_than_best_matches():
    """The paper's motivation (B.5): one query whose cluster sits much closer than the others' takes most of a
    best-matches set; query-balanced takes an equal share near every query."""
    gen = torch.Generator().manual_seed(0)
    num_q, per, dim = 5, 40, 16
    centers = torch.randn(num_q, dim, generator=gen) * 10
    spread = torch.tensor([0.05, 1.0, 1.0, 1.0, 1.0])  # cluster 0 is tight around its query
    gallery = torch.cat([centers[c] + spread[c] * torch.randn(per, dim, generator=gen) for c in range(num_q)])
    scores, neighbors = knn(centers, gallery, 30, metric="l2", backend="reference")
    cluster = lambda ids: torch.bincount(ids // per, minlength=num_q).tolist()  # noqa: E731
    assert cluster(best_matches(neighbors, scores, 50, metric="l2"))[0] >= 30
    assert cluster(query_balanced(neighbors, 50, seed=0)) == [10] * num_q


def test_random_ids():
    got = random_ids(1000, 100, seed=4)
    assert got.numel() == 100 and got.unique().numel() == 100 and 0 <= got.min() and got.max() < 1000
    assert torch.equal(got, random_ids(1000, 100, seed=4))
    assert not torch.equal(got, random_ids(1000, 100, seed=5))
    assert random_ids(5, 5, seed=0).tolist() == [0, 1, 2, 3, 4]
    assert random_ids(np.int64(7), np.int64(0), seed=0).shape == (0,)
