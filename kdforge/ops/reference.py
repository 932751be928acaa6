"""Pure-PyTorch references of every kdforge op: the ground truth for tests and benchmarks, and the CPU fallback.

Each function has the semantics of the public op of the same name in :mod:`kdforge.ops` (same arguments, same
results up to floating-point rounding) but no ``backend`` argument and no argument checks beyond what torch does;
call the public op for clear error messages. Gradients come from torch autograd, so every reference is also the
independent check of the analytic gradients inside the kernels. Arithmetic is float32 for float16/bfloat16/float32
inputs and float64 for float64 inputs (so ``torch.autograd.gradcheck`` can run on them).
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["whitened_loss", "masked_gather", "masked_scatter", "attention", "knn", "compute_dtype"]


def compute_dtype(*tensors: Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32: the accumulation type of every op."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


# ---------------------------------------------------------------------------------------------------------------
# whitened_loss
# ---------------------------------------------------------------------------------------------------------------


def whitened_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    loss: str = "smooth_l1",
    beta: float = 2.0,
    whiten: bool = True,
    eps: float = 1e-5,
    index: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Loss between ``student`` and the (optionally whitened) ``teacher``; papers/004 eq. 1 with ``whiten=True``.

    student, teacher: Tensor[..., D]. The teacher is detached, then (``whiten``) normalised per row by a LayerNorm
    without affine (biased variance, ``eps`` inside the square root). ``loss``: "smooth_l1" (torch's definition with
    ``beta``; beta 0 is L1) or "mse". ``index``: LongTensor[M] of flat row positions (rows of
    ``student.reshape(-1, D)``) to which the loss is restricted. ``reduction``: "mean" over all selected elements
    (0 when nothing is selected), "sum", or "none" -> per-row loss summed over D: Tensor[...] without ``index``,
    Tensor[M] with it. The result is float32 (float64 for float64 inputs).
    """
    dim = student.shape[-1]
    acc = compute_dtype(student, teacher)
    s = student.reshape(-1, dim)
    t = teacher.detach().reshape(-1, dim)
    if index is not None:
        s = s.index_select(0, index)
        t = t.index_select(0, index)
    s = s.to(acc)
    t = t.to(acc)
    target = F.layer_norm(t, (dim,), eps=eps) if whiten else t
    if loss == "smooth_l1":
        elementwise = F.smooth_l1_loss(s, target, reduction="none", beta=beta)
    elif loss == "mse":
        elementwise = F.mse_loss(s, target, reduction="none")
    else:
        raise ValueError(f"loss must be 'smooth_l1' or 'mse', got {loss!r}")
    if reduction == "none":
        per_row = elementwise.sum(dim=-1)
        return per_row if index is not None else per_row.reshape(student.shape[:-1])
    if reduction == "sum":
        return elementwise.sum()
    if reduction == "mean":
        # An empty selection (e.g. a batch with no masked patch) contributes 0, not NaN.
        return elementwise.sum() / max(elementwise.numel(), 1)
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


# ---------------------------------------------------------------------------------------------------------------
# masked_gather / masked_scatter
# ---------------------------------------------------------------------------------------------------------------


def masked_gather(x: Tensor, mask: Tensor) -> Tensor:
    """Rows of x: Tensor[B, N, D] where mask: BoolTensor[B, N] is true, row-major order -> Tensor[M, D]."""
    return x[mask]


def masked_scatter(rows: Tensor, mask: Tensor, out: Tensor) -> Tensor:
    """A new tensor equal to out: Tensor[B, N, D] with its masked rows replaced by rows: Tensor[M, D] in row-major
    order (the inverse of :func:`masked_gather`); ``out`` itself is not modified."""
    return out.index_put((mask,), rows)


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------


def attention(q: Tensor, k: Tensor, v: Tensor, *, bias: Tensor | None = None, scale: float | None = None) -> Tensor:
    """softmax(q k^T * scale + bias) v for q, k, v: Tensor[B, H, N, d]; bias broadcastable to [B, H, N, N].

    ``scale`` defaults to d ** -0.5. Materialises the [B, H, N, N] scores (small inputs only). The result has q's
    dtype; the arithmetic is float32 (float64 for float64 inputs). A query whose every key is masked out (bias
    -inf on its whole row) attends to nothing: its output is 0 and it passes no gradient (as torch SDPA does),
    where a plain softmax would give NaN.
    """
    acc = compute_dtype(q, k, v)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q.to(acc), k.to(acc).transpose(-2, -1)) * scale
    if bias is not None:
        scores = scores + bias.to(acc)
    dead = scores.isneginf().all(dim=-1, keepdim=True)  # fully masked rows, [..., N, 1]
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1).masked_fill(dead, 0.0)
    return torch.matmul(probs, v.to(acc)).to(q.dtype)


# ---------------------------------------------------------------------------------------------------------------
# knn
# ---------------------------------------------------------------------------------------------------------------


def _best_k(scores: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k largest entries of each row of scores: Tensor[Q, C], sorted best first, ties to the lower column.

    torch.topk gives the right k-th value but no order among equal values, so the boundary is settled explicitly:
    everything strictly above the k-th value, then the lowest-indexed entries equal to it.
    """
    kth = torch.topk(scores, k, dim=1).values[:, -1:]
    above = scores > kth
    tied = scores == kth
    needed = k - above.sum(dim=1, keepdim=True)
    take = above | (tied & (tied.cumsum(dim=1) <= needed))
    cols = take.nonzero()[:, 1].reshape(scores.shape[0], k)  # ascending columns in each row
    picked = scores.gather(1, cols)
    order = torch.sort(picked, dim=1, descending=True, stable=True).indices  # stable: lower column first on ties
    return picked.gather(1, order), cols.gather(1, order)


def gallery_rows(gallery: Any) -> int:
    """Number of rows of a gallery given as a tensor or a numpy array / memmap."""
    return int(gallery.shape[0])


def gallery_chunk(gallery: Any, start: int, stop: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """Rows [start, stop) of a tensor or numpy gallery, on ``device`` in ``dtype``."""
    if isinstance(gallery, Tensor):
        chunk = gallery[start:stop]
    else:
        import numpy as np  # numpy galleries only; torch itself does not need it here

        chunk = torch.from_numpy(np.array(gallery[start:stop]))  # a writable copy of the rows
    return chunk.to(device=device, dtype=dtype)


def default_chunk_rows(num_queries: int, num_gallery: int, k: int, budget_elems: int = 1 << 24) -> int:
    """Gallery rows per chunk so that one [Q, chunk] score block holds about ``budget_elems`` values."""
    return max(k, min(num_gallery, budget_elems // max(num_queries, 1)))


def knn(
    queries: Tensor,
    gallery: Any,
    k: int,
    *,
    metric: str = "ip",
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Exact k nearest gallery rows of each query, streamed over gallery chunks (no [Q, G] matrix at once).

    queries: Tensor[Q, D]; gallery: Tensor[G, D] or a numpy array / memmap [G, D] (copied chunk by chunk to the
    queries' device). metric "ip": largest inner product first; "l2": smallest squared Euclidean distance first
    (the squared distance is reported). A NaN score (a NaN in the query or gallery row) counts as the worst score:
    it ranks last and is reported as -inf (ip) or +inf (l2). Returns (scores Tensor[Q, k] float32 (float64 for float64 queries),
    indices LongTensor[Q, k]), best first; equal scores are ordered by the lower gallery index.
    """
    if metric not in ("ip", "l2"):
        raise ValueError(f"metric must be 'ip' or 'l2', got {metric!r}")
    num_q, num_g = queries.shape[0], gallery_rows(gallery)
    acc = compute_dtype(queries)
    q = queries.to(acc)
    q_sq = (q * q).sum(dim=1, keepdim=True)
    chunk = chunk_size or default_chunk_rows(num_q, num_g, k)
    best_s = q.new_empty(num_q, 0)
    best_i = torch.empty(num_q, 0, dtype=torch.long, device=q.device)
    for start in range(0, num_g, chunk):
        stop = min(start + chunk, num_g)
        g = gallery_chunk(gallery, start, stop, q.device, acc)
        dots = q @ g.T
        # l2 ranks by the negated squared distance so that "larger is better" holds for both metrics.
        scores = dots if metric == "ip" else -((q_sq + (g * g).sum(dim=1)[None, :] - 2 * dots).clamp_min(0))
        scores = scores.masked_fill(scores.isnan(), -math.inf)  # a NaN score (NaN in a row) ranks last
        s, i = _best_k(scores, min(k, stop - start))
        # Running entries come from earlier chunks (lower indices) and each part is ordered (score desc, index
        # asc), so a stable sort of [running, new] keeps ties ordered by index.
        cand_s = torch.cat([best_s, s], dim=1)
        cand_i = torch.cat([best_i, i + start], dim=1)
        order = torch.sort(cand_s, dim=1, descending=True, stable=True).indices[:, :k]
        best_s, best_i = cand_s.gather(1, order), cand_i.gather(1, order)
    return (best_s if metric == "ip" else -best_s), best_i
