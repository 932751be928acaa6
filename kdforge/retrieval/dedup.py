"""Cleaning a retrieved set (papers/001, B.3 and B.4): near-duplicates within it, leaks from the task's own data.

Both work on image embeddings compared by cosine similarity, searched with :func:`kdforge.ops.knn` (exact, never a
full similarity matrix), so they scale to retrieved sets of millions.

- :func:`deduplicate`: pairs more similar than ``threshold`` (the paper: 0.99) are duplicates; duplicates are
  clustered (connected components of the duplicate pairs) and one item per cluster, the lowest id, is kept.
- :func:`find_leaks`: retrieved items more similar than ``threshold`` (the paper: 0.95) to any image of the task
  data set (train, val and test) are possible leaks; their nearest task images are returned for inspection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdforge.errors import ShapeError


def _unit_rows(x: Tensor, name: str, op: str) -> Tensor:
    if not isinstance(x, Tensor) or x.dim() != 2 or not x.dtype.is_floating_point:
        got = f"{x.dtype} {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ShapeError(f"{op}: {name} must be a floating tensor [rows, D] of embeddings, got {got}")
    return torch.nn.functional.normalize(x.detach().float(), dim=1)


def _check_threshold(threshold: float, op: str) -> float:
    if not -1.0 <= float(threshold) <= 1.0:
        raise ValueError(f"{op}: threshold is a cosine similarity in [-1, 1], got {threshold}")
    return float(threshold)


def _check_count(value: int, name: str, op: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{op}: {name} must be an int >= 1, got {value!r}")


def _components(num: int, src: Tensor, dst: Tensor) -> Tensor:
    """Component label (its lowest member) of each of ``num`` nodes joined by the undirected edges src-dst."""
    labels = torch.arange(num, device=src.device)
    while True:  # min-label propagation; converges in at most the longest shortest path of a component
        low = torch.minimum(labels[src], labels[dst])
        new = labels.scatter_reduce(0, src, low, reduce="amin").scatter_reduce(0, dst, low, reduce="amin")
        new = new[new]  # pointer jumping: follow labels to their own labels
        if torch.equal(new, labels):
            return labels
        labels = new


def duplicate_clusters(
    embeddings: Tensor, *, threshold: float = 0.99, k: int = 16, backend: str = "auto", op: str = "duplicate_clusters"
) -> Tensor:
    """The cluster of each item, LongTensor[R]: the lowest id of its cluster of near-duplicates (its own id when it
    has none).

    embeddings: Tensor[R, D] (any norms: compared by cosine similarity). Two items whose similarity exceeds
    ``threshold`` are duplicates; clusters are the connected components of those pairs, found from each item's
    ``k`` most similar items (a cluster larger than k + 1 is still joined through its chains).
    """
    x = _unit_rows(embeddings, "embeddings", op)
    threshold = _check_threshold(threshold, op)
    _check_count(k, "k", op)
    num = x.shape[0]
    if num < 2:
        return torch.arange(num, device=x.device)
    from kdforge.ops import knn

    scores, neighbors = knn(x, x, min(k + 1, num), metric="ip", backend=backend)  # +1: each item finds itself
    rows = torch.arange(num, device=x.device)[:, None].expand_as(neighbors)
    dup = (scores > threshold) & (neighbors != rows)
    return _components(num, rows[dup], neighbors[dup])


def deduplicate(embeddings: Tensor, *, threshold: float = 0.99, k: int = 16, backend: str = "auto") -> Tensor:
    """Ids to keep, LongTensor[M] ascending: one (the lowest id) per cluster of near-duplicates
    (:func:`duplicate_clusters`)."""
    labels = duplicate_clusters(embeddings, threshold=threshold, k=k, backend=backend, op="deduplicate")
    return (labels == torch.arange(labels.numel(), device=labels.device)).nonzero().squeeze(1)


@dataclass
class Leaks:
    """Retrieved items that may be task images.

    ids: LongTensor[L], the retrieved rows whose similarity to some task image exceeds the threshold, ascending.
    similarity: Tensor[L, n_nearest], their similarities to their nearest task images, best first.
    nearest: LongTensor[L, n_nearest], those task images' rows (for a visual check, as the paper does).
    """

    ids: Tensor
    similarity: Tensor
    nearest: Tensor


def find_leaks(
    retrieved: Tensor, task: Tensor, *, threshold: float = 0.95, n_nearest: int = 5, backend: str = "auto"
) -> Leaks:
    """Possible leaks of the task data set into the retrieved set (papers/001, B.4).

    retrieved: Tensor[R, D] embeddings of the retrieved items' original images; task: Tensor[T, D] embeddings of
    every image of the task data set (all splits), from the same encoder. An item is a possible leak when its
    cosine similarity to some task image exceeds ``threshold``.
    """
    op = "find_leaks"
    r = _unit_rows(retrieved, "retrieved", op)
    t = _unit_rows(task, "task", op)
    threshold = _check_threshold(threshold, op)
    _check_count(n_nearest, "n_nearest", op)
    if r.shape[1] != t.shape[1]:
        raise ShapeError(f"{op}: retrieved has D={r.shape[1]} but task has D={t.shape[1]}: embed both with one encoder")
    if t.shape[0] == 0:
        raise ValueError(f"{op}: task holds no embeddings; pass every image of the task data set")
    from kdforge.ops import knn

    n_nearest = min(n_nearest, t.shape[0])
    scores, nearest = knn(r, t, n_nearest, metric="ip", backend=backend)
    leak = scores[:, 0] > threshold
    return Leaks(ids=leak.nonzero().squeeze(1), similarity=scores[leak], nearest=nearest[leak])
