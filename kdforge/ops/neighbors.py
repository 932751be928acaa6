"""kdforge.ops.knn: checks, dispatch and chunk streaming (kernel and copy pipeline in kdforge/kernels/knn.py).

Triton backend: the custom op ``kdforge_triton::knn_keys`` (queries, gallery chunk, k, metric, index offset) ->
packed keys of the chunk's best k per query; the wrapper merges chunks and decodes keys into (scores, indices).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdforge.errors import ShapeError
from kdforge.ops import _checks, _dispatch, reference

METRICS = ("ip", "l2")
# Gallery bytes per streamed chunk (x2 pinned + x2 device buffers in flight) and score-block budget.
STREAM_CHUNK_BYTES = 256 << 20
KEYS_BUDGET_BYTES = 1 << 30


@torch.library.custom_op("kdforge_triton::knn_keys", mutates_args=())
def _knn_keys(queries: Tensor, gallery: Tensor, k: int, metric: str, index_offset: int) -> Tensor:
    """queries: Tensor[Q, D], gallery: Tensor[C, D] -> LongTensor[Q, min(k, C)] packed keys, best first."""
    from kdforge.kernels._common import device_guard
    from kdforge.kernels.knn import chunk_keys

    with device_guard(queries):
        return chunk_keys(queries, gallery, k, metric, index_offset)


@_knn_keys.register_fake
def _(queries, gallery, k, metric, index_offset):
    return queries.new_empty((queries.shape[0], min(k, gallery.shape[0])), dtype=torch.long)


def _gallery_info(op: str, gallery: Any) -> tuple[int, int, Any, torch.device | None]:
    """(rows, dim, dtype, device or None for numpy) of a tensor or numpy gallery."""
    if isinstance(gallery, Tensor):
        if gallery.dim() != 2:
            raise ShapeError(f"{op}: gallery must be [G, D], got shape {tuple(gallery.shape)}")
        _checks.floating(op, "gallery", gallery)
        return gallery.shape[0], gallery.shape[1], gallery.dtype, gallery.device
    import numpy as np

    if not isinstance(gallery, np.ndarray):
        raise TypeError(
            f"{op}: gallery must be a torch.Tensor or a numpy array / np.memmap [G, D], got {type(gallery).__name__}"
        )
    if gallery.ndim != 2:
        raise ShapeError(f"{op}: gallery must be [G, D], got shape {gallery.shape}")
    if gallery.dtype not in (np.float16, np.float32, np.float64):
        raise TypeError(f"{op}: a numpy gallery must be float16, float32 or float64, got {gallery.dtype}")
    return gallery.shape[0], gallery.shape[1], gallery.dtype, None


def knn(
    queries: Tensor,
    gallery: Any,
    k: int,
    *,
    metric: str = "ip",
    chunk_size: int | None = None,
    backend: str = "auto",
) -> tuple[Tensor, Tensor]:
    """Exact k nearest gallery rows of every query, without ever forming the [Q, G] score matrix.

    queries: Tensor[Q, D] (float16 / bfloat16 / float32; float64 on "reference"); the search runs on its device.
    gallery: Tensor[G, D] on that device, or a CPU tensor / numpy array / np.memmap [G, D] that is streamed to
    it in chunks (on CUDA with pinned buffers and a side copy stream, overlapping the search); each chunk is cast
    to the queries' dtype. metric "ip": largest inner product first; "l2": smallest squared Euclidean distance
    first, reported as the squared distance. 1 <= k <= G (and <= 1024 on the triton backend).
    ``chunk_size``: gallery rows per chunk (default: a memory budget). Equal scores are ordered by the lower
    gallery index; a NaN score (a NaN in the query or the gallery row) ranks last and is reported as -inf (ip) or
    +inf (l2). Returns (scores Tensor[Q, k] float32, indices LongTensor[Q, k]), best first.
    ``backend``: "auto" | "reference" | "triton" | "ext".
    """
    op = "knn"
    _checks.tensor(op, "queries", queries)
    _checks.floating(op, "queries", queries)
    if queries.dim() != 2:
        raise ShapeError(f"{op}: queries must be [Q, D], got shape {tuple(queries.shape)}")
    n_g, dim, _g_dtype, g_device = _gallery_info(op, gallery)
    if dim != queries.shape[1]:
        raise ShapeError(f"{op}: gallery rows have D={dim} but queries have D={queries.shape[1]}; they must match")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n_g:
        raise ValueError(f"{op}: k must be an int in [1, G={n_g}], got {k!r}")
    _checks.choice(op, "metric", metric, METRICS)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"{op}: chunk_size must be a positive int (gallery rows per chunk) or None, got {chunk_size!r}")
    device = queries.device
    if g_device is not None and g_device != device and g_device.type != "cpu":
        raise ShapeError(
            f"{op}: gallery is on {g_device} but queries are on {device}; the search runs on the queries' device, "
            "so put the gallery there or on the CPU (it is then streamed)"
        )

    chosen = _dispatch.resolve(op, backend, device)
    if chosen == "reference":
        return reference.knn(queries, gallery, k, metric=metric, chunk_size=chunk_size)
    if chosen == "ext":
        return _dispatch.ext_for_call().knn(queries, gallery, k, metric=metric, chunk_size=chunk_size)

    from kdforge.kernels import knn as kernels
    from kdforge.kernels._common import device_guard

    if k > kernels.MAX_K:
        raise ValueError(f"{op}: the triton backend takes k <= {kernels.MAX_K}, got k={k}; use backend='reference'")
    if n_g > kernels.INDEX_LIMIT:
        raise ShapeError(f"{op}: the triton backend indexes galleries below {kernels.INDEX_LIMIT} rows, got {n_g}")
    if queries.dtype == torch.float64:
        raise TypeError(f"{op}: the triton backend takes float16/bfloat16/float32 queries; cast with .float()")
    resident = g_device == device
    n_q = queries.shape[0]
    if chunk_size is None:
        if k > kernels.MAX_FUSED_K:
            # Keys of a whole chunk are materialised for k > MAX_FUSED_K: bound that [Q, chunk] block.
            chunk_size = max(k, KEYS_BUDGET_BYTES // (8 * max(n_q, 1)))
        elif resident:
            chunk_size = 1 << 22
        else:
            chunk_size = max(k, STREAM_CHUNK_BYTES // (dim * queries.element_size()))
    with device_guard(queries):  # the copy stream and events belong to the queries' GPU
        if resident:
            chunks = ((s, gallery[s : s + chunk_size].to(queries.dtype)) for s in range(0, n_g, chunk_size))
        else:
            chunks = kernels.stream_chunks(gallery, chunk_size, device, queries.dtype)
        keys = None
        for offset, chunk in chunks:
            new = torch.ops.kdforge_triton.knn_keys(queries, chunk, k, metric, offset)
            keys = kernels.merge_keys(keys, new, k)
        q_sq = queries.float().square().sum(dim=1) if metric == "l2" else None
        return kernels.decode_keys(keys, metric, q_sq)
