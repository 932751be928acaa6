"""Exact k-nearest-neighbour search: fused distance and running top-k over gallery tiles, never a [Q, G] matrix.

Scores. ip: s = q . g (larger is better). l2: ||q - g||^2 = ||q||^2 + ||g||^2 - 2 q . g; ||q||^2 is the same for
every gallery row of a query, so the kernel ranks by s = 2 q . g - ||g||^2 (larger is better, ||g||^2 accumulated
from the same gallery tiles the dot product reads) and the launcher reports ||q||^2 - s, clamped at 0.

Packed keys. Each (score, gallery index) pair becomes one int64 whose signed order is "better score, then lower
index": the fp32 bits of s mapped to an order-preserving int32 (negative floats have their magnitude bits
flipped; -0.0 is folded into +0.0 and NaN into -inf first), in the high word, and 0xFFFFFFFF - index in the low
word. A top-k of keys is then a top-k of scores with ties going to the lower index, with no separate index
bookkeeping.

Running top-k (k <= 256). Each program owns BLOCK_Q queries and a slice of the gallery, and keeps its best
K = next_pow2(k) keys sorted ascending in registers. For each gallery tile of K columns: the tile's keys are
sorted descending, and max(best_ascending, tile_descending) elementwise is exactly the K largest of the union
(one bitonic half-cleaner step); a re-sort restores the order. A tile none of whose keys beats a query's current
K-th best (the usual case once the list has filled) is skipped without sorting. Slices are merged on the host
with torch.topk over (slices x K) keys per query.

k > 256: the list no longer fits in registers; the kernel then writes the keys of a gallery chunk and the host
takes torch.topk of them (the chunk is sized so that [Q, chunk] keys stay within a memory budget).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import triton
import triton.language as tl

from kdforge.kernels._common import INTERPRET, dot_precision, next_pow2, upcast_dot

MAX_FUSED_K = 256
MAX_K = 1024
INDEX_LIMIT = (1 << 32) - 1  # gallery indices live in the low 32 bits of a key


@triton.jit
def _knn_kernel(
    Qp, G, OUT,
    n_q, n_g, D,
    sq_r, sq_d, sg_r, sg_d, so_r,
    index_offset, slice_len,
    METRIC_L2: tl.constexpr,
    FUSED_TOPK: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_q = tl.program_id(0)
    pid_s = tl.program_id(1)
    offs_q = pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)
    q_ok = offs_q < n_q
    q_rows = Qp + offs_q.to(tl.int64)[:, None] * sq_r
    lo = pid_s * slice_len
    hi = tl.minimum(lo + slice_len, n_g)
    # INT64_MIN (below every real key) built by a shift: a literal -2**63 is typed by its magnitude, as uint64.
    key_min = tl.full([BLOCK_Q, BLOCK_G], 1, tl.int64) << 63
    best = key_min
    for start in range(lo, hi, BLOCK_G):
        offs_g = start + tl.arange(0, BLOCK_G)
        g_ok = offs_g < hi
        g_cols = G + offs_g.to(tl.int64)[None, :] * sg_r
        acc = tl.zeros([BLOCK_Q, BLOCK_G], tl.float32)
        g_sq = tl.zeros([BLOCK_G], tl.float32)
        for d0 in range(0, D, BLOCK_D):
            offs_d = d0 + tl.arange(0, BLOCK_D)
            d_ok = offs_d < D
            q = tl.load(q_rows + offs_d[None, :] * sq_d, mask=q_ok[:, None] & d_ok[None, :], other=0.0)
            g = tl.load(g_cols + offs_d[:, None] * sg_d, mask=d_ok[:, None] & g_ok[None, :], other=0.0)
            if UPCAST:
                q = q.to(tl.float32)
                g = g.to(tl.float32)
            acc = tl.dot(q, g, acc, input_precision=DOT_PREC)
            if METRIC_L2:
                gf = g.to(tl.float32)
                g_sq += tl.sum(gf * gf, 0)
        if METRIC_L2:
            score = 2.0 * acc - g_sq[None, :]
        else:
            score = acc
        score = tl.where(score == 0.0, 0.0, score)  # -0.0 and +0.0 must pack to one key
        score = tl.where(score != score, float("-inf"), score)  # NaN ranks last, as -inf
        bits = score.to(tl.int32, bitcast=True)
        ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        gidx = offs_g.to(tl.int64) + index_offset
        key = (ordered.to(tl.int64) << 32) | (4294967295 - gidx)
        key = tl.where(g_ok[None, :], key, key_min)
        if FUSED_TOPK:
            worst = tl.min(best, 1)
            top = tl.max(key, 1)
            if tl.max((top > worst).to(tl.int32), 0) > 0:
                tile_desc = tl.sort(key, dim=1, descending=True)
                best = tl.sort(tl.maximum(best, tile_desc), dim=1)
        else:
            out_ptr = OUT + offs_q.to(tl.int64)[:, None] * so_r + offs_g[None, :]
            tl.store(out_ptr, key, mask=q_ok[:, None] & g_ok[None, :])
    if FUSED_TOPK:
        cols = pid_s * BLOCK_G + tl.arange(0, BLOCK_G)
        tl.store(OUT + offs_q.to(tl.int64)[:, None] * so_r + cols[None, :], best, mask=q_ok[:, None])


def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4


def chunk_keys(queries: torch.Tensor, gallery: torch.Tensor, k: int, metric: str, index_offset: int) -> torch.Tensor:
    """Best min(k, G) packed keys of each query over gallery: Tensor[G, D] (any strides), best first.

    queries: Tensor[Q, D] on the gallery's device, same dtype. Gallery row i has global index index_offset + i.
    Returns LongTensor[Q, min(k, G)].
    """
    n_q, dim = queries.shape
    n_g = gallery.shape[0]
    k_eff = min(k, n_g)
    if n_q == 0 or n_g == 0:
        return torch.empty((n_q, k_eff), dtype=torch.long, device=queries.device)
    fused = k <= MAX_FUSED_K
    block_d = 32 if INTERPRET else min(64, next_pow2(dim, 16))
    # Tiles sized from sm_90 builds (ptxas, no spills at 8 warps): [64 queries x 128 gallery] for k <= 128,
    # [16 x 256] for k <= 256 (the running list is BLOCK_Q x BLOCK_G int64 in registers), [64 x 128] unfused.
    if INTERPRET:
        block_q = 16
    else:
        block_q = 64 if (not fused or k <= 128) else 16
    n_qb = triton.cdiv(n_q, block_q)
    if fused:
        block_g = next_pow2(k, 16)
        # Enough programs to fill the GPU twice over, but slices long enough (>= 8 tiles) that most tiles are
        # skipped once each running list has filled.
        want = triton.cdiv(2 * _num_sms(queries.device), n_qb)
        n_slices = max(1, min(want, triton.cdiv(n_g, 8 * block_g)))
        slice_len = triton.cdiv(triton.cdiv(n_g, n_slices), block_g) * block_g
        n_slices = triton.cdiv(n_g, slice_len)
        out = torch.empty((n_q, n_slices * block_g), dtype=torch.long, device=queries.device)
    else:
        block_g = 128 if not INTERPRET else 32
        slice_len = block_g  # one tile per program: the keys are written out, nothing is carried
        n_slices = triton.cdiv(n_g, block_g)
        out = torch.empty((n_q, n_g), dtype=torch.long, device=queries.device)
    num_warps = 8
    _knn_kernel[(n_qb, n_slices)](
        queries, gallery, out,
        n_q, n_g, dim,
        queries.stride(0), queries.stride(1), gallery.stride(0), gallery.stride(1), out.stride(0),
        index_offset, slice_len,
        METRIC_L2=metric == "l2", FUSED_TOPK=fused, DOT_PREC=dot_precision(queries), UPCAST=upcast_dot(queries),
        BLOCK_Q=block_q, BLOCK_G=block_g, BLOCK_D=block_d,
        num_warps=num_warps,
    )  # fmt: skip
    return torch.topk(out, k_eff, dim=1, sorted=True).values


def merge_keys(running: torch.Tensor | None, new: torch.Tensor, k: int) -> torch.Tensor:
    """The best k of two key sets per query (LongTensor[Q, *]), best first."""
    if running is None:
        return new
    both = torch.cat([running, new], dim=1)
    return torch.topk(both, min(k, both.shape[1]), dim=1, sorted=True).values


def decode_keys(keys: torch.Tensor, metric: str, q_sq: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed keys -> (scores float32, indices int64); l2 scores become squared distances ||q||^2 - s >= 0."""
    ordered = (keys >> 32).to(torch.int32)
    bits = ordered ^ ((ordered >> 31) & 0x7FFFFFFF)
    scores = bits.view(torch.float32)
    indices = INDEX_LIMIT - (keys & INDEX_LIMIT)
    if metric == "l2":
        scores = (q_sq[:, None] - scores).clamp_min(0.0)
    return scores, indices


def stream_chunks(gallery: Any, chunk_rows: int, device: torch.device, dtype: torch.dtype) -> Iterator[tuple[int, torch.Tensor]]:
    """Yield (offset, chunk Tensor[rows, D] on ``device`` in ``dtype``) over a gallery kept off the device.

    gallery: a CPU tensor or a numpy array / memmap [G, D]. On CUDA the copies overlap the search: two pinned host
    buffers and two device buffers alternate; chunk i+1 is read into pinned memory by the CPU and copied by a
    side stream while the GPU searches chunk i. The compute stream waits for a chunk's copy event before using it,
    and a device buffer is only overwritten after the compute stream has passed the event recorded when the
    consumer finished launching work on it (the generator resumes right after that).
    """
    import numpy as np  # galleries given as numpy arrays or memmaps

    n_g = int(gallery.shape[0])
    is_numpy = not isinstance(gallery, torch.Tensor)
    if device.type != "cuda":
        for start in range(0, n_g, chunk_rows):
            stop = min(start + chunk_rows, n_g)
            part = gallery[start:stop]
            part = torch.from_numpy(np.array(part)) if is_numpy else part  # np.array: a writable copy
            yield start, part.to(device=device, dtype=dtype)
        return

    dim = int(gallery.shape[1])
    host_dtype = torch.from_numpy(np.empty(0, dtype=gallery.dtype)).dtype if is_numpy else gallery.dtype
    rows = min(chunk_rows, n_g)
    pinned = [torch.empty((rows, dim), dtype=host_dtype, pin_memory=True) for _ in range(2)]
    staged = [torch.empty((rows, dim), dtype=host_dtype, device=device) for _ in range(2)]
    copy_stream = torch.cuda.Stream(device=device)
    compute = torch.cuda.current_stream(device)
    copied: list[torch.cuda.Event | None] = [None, None]
    consumed: list[torch.cuda.Event | None] = [None, None]
    for i, start in enumerate(range(0, n_g, rows)):
        slot = i % 2
        stop = min(start + rows, n_g)
        n = stop - start
        if copied[slot] is not None:
            copied[slot].synchronize()  # the previous copy out of this pinned buffer has finished
        if is_numpy:
            np.copyto(pinned[slot][:n].numpy(), gallery[start:stop], casting="no")
        else:
            pinned[slot][:n].copy_(gallery[start:stop])
        with torch.cuda.stream(copy_stream):
            if consumed[slot] is not None:
                copy_stream.wait_event(consumed[slot])  # the search of chunk i-2 no longer reads this buffer
            staged[slot][:n].copy_(pinned[slot][:n], non_blocking=True)
            copied[slot] = torch.cuda.Event()
            copied[slot].record(copy_stream)
        compute.wait_event(copied[slot])
        chunk = staged[slot][:n]
        yield start, (chunk if chunk.dtype == dtype else chunk.to(dtype))
        consumed[slot] = torch.cuda.Event()
        consumed[slot].record(compute)
