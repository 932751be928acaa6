"""Which gallery items make a retrieval-augmented transfer set (papers/001, section 3.4 and B.5).

Every strategy starts from the k-nearest-neighbour lists of the queries (the few labelled task images) in a gallery
(web images or crops), as :func:`kdforge.ops.knn` returns them: ``neighbors`` LongTensor[Q, K] of gallery ids,
best first, one row per query.

- :func:`query_balanced` (the paper's rule): the smallest k whose union of every query's first k neighbours
  holds at least n distinct ids; the k-th neighbours of randomly chosen queries are then dropped until exactly n
  remain. Every query contributes about equally, which is what makes the set diverse.
- :func:`best_matches` (baseline): gallery ids in increasing order of their distance to the nearest query.
- :func:`random_ids` (baseline): n gallery ids drawn uniformly without replacement.

Each returns a LongTensor[n] of distinct gallery ids in ascending order; the same seed gives the same ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdforge.errors import ShapeError


def _neighbor_lists(neighbors: Any, op: str) -> Tensor:
    """neighbors as a CPU LongTensor[Q, K] of non-negative ids without repeats in a row, or a clear error."""
    if isinstance(neighbors, np.ndarray):
        neighbors = torch.from_numpy(neighbors)
    if not isinstance(neighbors, Tensor):
        kind = type(neighbors).__name__
        raise TypeError(f"{op}: neighbors must be a tensor or numpy array [Q, K] of gallery ids, got {kind}")
    if neighbors.dtype.is_floating_point or neighbors.dtype.is_complex or neighbors.dtype == torch.bool:
        raise TypeError(f"{op}: neighbors must hold integer gallery ids, got {neighbors.dtype}")
    if neighbors.dim() != 2:
        shape = tuple(neighbors.shape)
        raise ShapeError(f"{op}: neighbors must be [Q, K] (one row of gallery ids per query), got shape {shape}")
    neighbors = neighbors.detach().to("cpu", torch.long)
    if neighbors.numel() and int(neighbors.min()) < 0:
        raise ValueError(
            f"{op}: neighbors holds negative ids (min {int(neighbors.min())}); faiss pads with -1 where k exceeds the "
            "gallery: search with k <= gallery size"
        )
    if neighbors.shape[1] > 1:
        ordered = neighbors.sort(dim=1).values
        repeats = (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)
        if bool(repeats.any()):
            row = int(repeats.nonzero()[0, 0])
            raise ValueError(f"{op}: query {row} lists a gallery id more than once; each row must hold distinct ids")
    return neighbors


def _check_n(n: Any, op: str) -> int:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"{op}: n must be a non-negative int (how many gallery ids to select), got {n!r}")
    return int(n)


def _first_columns(neighbors: Tensor) -> tuple[Tensor, Tensor]:
    """(ids, first) for the distinct ids of neighbors: first[i] is the smallest column where ids[i] appears."""
    num_q, k = neighbors.shape
    cols = torch.arange(k).expand(num_q, k).reshape(-1)
    ids, inverse = torch.unique(neighbors.reshape(-1), return_inverse=True)
    first = torch.full((ids.numel(),), k, dtype=torch.long).scatter_reduce(0, inverse, cols, reduce="amin")
    return ids, first


def query_balanced(neighbors: Any, n: int, *, seed: int) -> Tensor:
    """The paper's query-balanced selection of n distinct gallery ids.

    neighbors: LongTensor (or numpy array) [Q, K] of gallery ids, best first per query, distinct within a row.
    Finds the smallest k such that the union of every query's first k neighbours holds at least n distinct ids.
    If it holds more, the k-th neighbour of randomly chosen queries (a seeded permutation of the queries) is
    dropped, one query at a time, until exactly n remain; dropping an id that another query still holds removes
    nothing. Returns LongTensor[n], ascending. Raises ValueError when even all K neighbours hold fewer than n
    distinct ids (search with a larger K).
    """
    op = "query_balanced"
    neighbors = _neighbor_lists(neighbors, op)
    n = _check_n(n, op)
    if n == 0:
        return torch.empty(0, dtype=torch.long)
    ids, first = _first_columns(neighbors)
    if ids.numel() < n:
        raise ValueError(
            f"{op}: the {neighbors.shape[1]} neighbours of {neighbors.shape[0]} queries hold {ids.numel()} distinct "
            f"gallery ids, fewer than n={n}: search more neighbours per query (a larger k) or select fewer"
        )
    # Union of the first k columns = ids whose first column < k; the smallest k with >= n of them:
    k = int(first.sort().values[n - 1]) + 1
    kept = ids[first < k - 1]  # the first k - 1 columns: always in
    new = first == k - 1  # ids that column k - 1 (the k-th neighbour) adds
    excess = int(kept.numel() + new.sum()) - n
    if excess == 0:
        return torch.cat([kept, ids[new]]).sort().values
    # Drop the k-th neighbours of queries in a random order. A new id leaves the union when the last query holding
    # it as its k-th neighbour is dropped: at the largest permutation position among its holders. The first
    # `excess` ids to leave are the ones with the smallest such positions.
    gen = torch.Generator().manual_seed(int(seed))
    position = torch.empty(neighbors.shape[0], dtype=torch.long)
    position[torch.randperm(neighbors.shape[0], generator=gen)] = torch.arange(neighbors.shape[0])
    column = neighbors[:, k - 1].contiguous()
    slot = torch.searchsorted(ids, column)
    holders = new[slot]  # queries whose k-th neighbour is a new id
    leaves_at = torch.full((ids.numel(),), -1, dtype=torch.long)
    leaves_at.scatter_reduce_(0, slot[holders], position[holders], reduce="amax")
    new_ids = ids[new]
    order = leaves_at[new].argsort()  # distinct positions: each query holds one k-th neighbour
    return torch.cat([kept, new_ids[order[excess:]]]).sort().values


def best_matches(neighbors: Any, scores: Any, n: int, *, metric: str = "l2") -> Tensor:
    """Baseline: the n gallery ids nearest to the query set, each id's distance being that to its nearest query.

    neighbors, scores: [Q, K] as :func:`kdforge.ops.knn` returns them (``metric`` "l2": scores are distances,
    smaller is better; "ip": similarities, larger is better). Ties go to the lower gallery id. Returns
    LongTensor[n], ascending. Raises ValueError when the lists hold fewer than n distinct ids.
    """
    op = "best_matches"
    neighbors = _neighbor_lists(neighbors, op)
    n = _check_n(n, op)
    if metric not in ("l2", "ip"):
        raise ValueError(f"{op}: metric must be 'l2' or 'ip' (as given to knn), got {metric!r}")
    scores = torch.as_tensor(scores).detach().to("cpu", torch.float64)
    if scores.shape != neighbors.shape:
        shapes = f"scores {tuple(scores.shape)} and neighbors {tuple(neighbors.shape)}"
        raise ShapeError(f"{op}: {shapes} must share a shape")
    ids, inverse = torch.unique(neighbors.reshape(-1), return_inverse=True)
    if ids.numel() < n:
        raise ValueError(
            f"{op}: the neighbour lists hold {ids.numel()} distinct gallery ids, fewer than n={n}: search more "
            "neighbours per query (a larger k) or select fewer"
        )
    cost = scores.reshape(-1) if metric == "l2" else -scores.reshape(-1)
    best = torch.full((ids.numel(),), float("inf"), dtype=torch.float64)
    best = best.scatter_reduce(0, inverse, cost, reduce="amin")
    order = torch.sort(best, stable=True).indices  # ids ascending, so a stable sort breaks ties by lower id
    return ids[order[:n]].sort().values


def random_ids(num_gallery: int, n: int, *, seed: int) -> Tensor:
    """Baseline: n distinct gallery ids in [0, num_gallery) drawn uniformly. Returns LongTensor[n], ascending."""
    op = "random_ids"
    n = _check_n(n, op)
    if n > num_gallery:
        raise ValueError(f"{op}: cannot draw n={n} distinct ids from a gallery of {num_gallery}")
    gen = torch.Generator().manual_seed(int(seed))
    return torch.randperm(int(num_gallery), generator=gen)[:n].sort().values
