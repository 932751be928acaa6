"""Nearest gallery items of a set of queries, over a gallery stored as several shards (papers/001's retrieval).

A gallery too large for one file is stored as shards: ``.npy`` files opened as read-only memmaps of shape
[rows_i, D] (float16, as :func:`kdforge.retrieval.embed_store` writes them, or float32). The global id of a row is
the number of rows of all earlier shards plus its row within its shard. :func:`search` returns the k best global
ids of every query, with one contract for both backends: (scores float32 [Q, k], ids int64 [Q, k]) on the CPU,
best first; metric "ip" ranks by largest inner product, "l2" by smallest squared Euclidean distance (reported as
the squared distance).

- backend "knn" (default, exact): :func:`kdforge.ops.knn` searches each shard in turn (streaming its memmap to the
  queries' device chunk by chunk) and its best k are merged into the running best k. Nothing larger than one
  gallery chunk plus the [Q, 2k] candidates is held at once: no [Q, G] score matrix, no copy of a shard. The
  result equals :func:`kdforge.ops.knn` on the concatenated gallery, ties (equal scores) included: they go to the
  lower global id, and a NaN row ranks last (reported as -inf for "ip", +inf for "l2").
- backend "faiss": a faiss index is built over all shards (added one chunk at a time, converted to float32 as
  faiss needs) and searched, on the GPUs when faiss sees any (``faiss.get_num_gpus() > 0``, a faiss-gpu install)
  unless ``device`` is "cpu". ``index`` picks the kind:

  - "flat" (IndexFlatIP / IndexFlatL2): exact, but it holds the whole gallery in memory as float32: 4 * D bytes per
    vector (3 KiB at D = 768: 3 GiB per million rows), twice the float16 shards. Scores match the knn backend;
    the order of equal scores may differ from its lower-id rule.
  - "ivf" (IndexIVFFlat): the gallery is split into ``nlist`` k-means lists and a query scans only its ``nprobe``
    nearest lists: much faster on large galleries, approximate, with the same 4 * D bytes per vector (+ 8 for the
    id). nprobe = nlist scans everything and is exact again.
  - "ivfpq" (IndexIVFPQ): as "ivf", but each vector is stored as ``pq_m`` one-byte product-quantizer codes: pq_m
    bytes + 8 bytes of id per vector (72 bytes at the default pq_m = 64, against 3 KiB for flat at D = 768). The
    one to use for galleries beyond memory; scores are approximate (computed from the codes) and so is the order.

  Switch from "flat" (or "knn") to "ivf" when exact search is too slow for the number of queries, and to "ivfpq"
  when 4 * D bytes per vector do not fit in (GPU) memory. The knn backend never holds the gallery, so it has no
  memory limit; it is only as fast as one exact pass over it.

Approximate indexes can find fewer than k items for a query (its probed lists hold fewer than k rows): the
missing places are reported with id -1 and score -inf ("ip") / +inf ("l2"), without an error. Drop them (or probe
more lists) before passing the ids to :mod:`kdforge.retrieval.selection`, which rejects negative ids.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdforge.errors import BackendUnavailable, ShapeError

__all__ = ["default_nlist", "default_pq_m", "search"]

BACKENDS = ("knn", "faiss")
INDEXES = ("flat", "ivf", "ivfpq")
METRICS = ("ip", "l2")
# Gallery rows converted to float32 and added to a faiss index at a time (16 MiB at D = 64, 192 MiB at D = 768).
ADD_CHUNK_ROWS = 65536
# Product-quantizer codes: 8 bits per sub-quantizer (one byte; 256 centroids, so at least 256 training rows).
PQ_BITS = 8
# faiss GPU indexes select at most this many neighbours (and probe at most this many lists): beyond, search on CPU.
FAISS_GPU_MAX_K = 2048


def _choice(op: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def _int_at_least(op: str, name: str, value: Any, low: int, meaning: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
        raise ValueError(f"{op}: {name} must be an int >= {low} ({meaning}), got {value!r}")
    return int(value)


def _check_shards(op: str, shards: Any, dim: int) -> list[int]:
    """Rows of every shard, after checking each is a floating [rows, dim] array (or tensor)."""
    if isinstance(shards, (np.ndarray, Tensor)) or not isinstance(shards, Sequence):
        raise TypeError(
            f"{op}: shards must be a list of [rows, D] arrays (np.load(path, mmap_mode='r') per shard), got "
            f"{type(shards).__name__}; wrap a single gallery as [gallery]"
        )
    rows = []
    for n, shard in enumerate(shards):
        if isinstance(shard, Tensor):
            shape, floating = tuple(shard.shape), shard.dtype.is_floating_point
        elif isinstance(shard, np.ndarray):
            shape, floating = shard.shape, shard.dtype in (np.float16, np.float32, np.float64)
        else:
            raise TypeError(f"{op}: shard {n} must be a numpy array / np.memmap [rows, D], got {type(shard).__name__}")
        if len(shape) != 2:
            raise ShapeError(f"{op}: shard {n} must be [rows, D], got shape {shape}")
        if not floating:
            raise TypeError(f"{op}: shard {n} must hold float16 or float32 embeddings, got {shard.dtype}")
        if shape[1] != dim:
            raise ShapeError(
                f"{op}: shard {n} has D={shape[1]} but the queries have D={dim}; every shard and the queries must "
                "come from one encoder"
            )
        rows.append(int(shape[0]))
    return rows


def default_nlist(total: int) -> int:
    """IVF lists for a gallery of ``total`` rows: about 4 * sqrt(total), at least 1, at most total."""
    return max(1, min(total, round(4 * math.sqrt(total))))


def default_pq_m(dim: int) -> int:
    """Product-quantizer sub-quantizers (code bytes per vector) for D = ``dim``: the largest divisor of D that is
    at most min(64, D // 2), so each sub-quantizer covers at least 2 dimensions and a code is at most 64 bytes
    (D = 768, 512, 256, 128 -> 64; D = 96 -> 48; D = 64 -> 32); 1 for D = 1."""
    cap = max(1, min(64, dim // 2))
    return max(m for m in range(1, cap + 1) if dim % m == 0)


def search(
    queries: Tensor,
    shards: Sequence[Any],
    k: int,
    *,
    metric: str = "ip",
    backend: str = "knn",
    index: str = "flat",
    nlist: int = 0,
    nprobe: int = 16,
    pq_m: int = 0,
    seed: int = 0,
    knn_backend: str = "auto",
    device: Any = None,
) -> tuple[Tensor, Tensor]:
    """The k best gallery items of every query over a sharded gallery (see the module docstring for the backends).

    queries: Tensor[Q, D] (float32). shards: [rows_i, D] numpy arrays / memmaps (float16 or float32), in global id
    order; empty shards are allowed. 1 <= k <= total rows. metric: "ip" | "l2". Returns (scores Tensor[Q, k]
    float32, ids LongTensor[Q, k] of global gallery ids), best first, on the CPU.

    backend "knn" (exact): ``knn_backend`` is passed to :func:`kdforge.ops.knn`; the search runs on ``device``
    (default: the queries' device). Equal scores go to the lower global id.

    backend "faiss": ``index`` "flat" | "ivf" | "ivfpq". IVF indexes use ``nlist`` k-means lists (0: about
    4 * sqrt(total rows), see :func:`default_nlist`) trained on ``min(total, 256 * nlist)`` rows drawn at random
    (seeded by ``seed``, which also seeds the k-means; "ivfpq" draws at least ``min(total, 39 * 256)`` so its 8-bit
    codebooks are trained on enough rows), and scan ``nprobe`` lists per query. "ivfpq" stores ``pq_m`` bytes per
    vector (0: :func:`default_pq_m`; it must divide D) and needs at least 256 gallery rows. faiss uses its GPUs
    (all of them, or the one of ``device="cuda:N"``) when it sees any, unless ``device`` is "cpu" or k > 2048.
    Places an approximate index could not fill hold id -1 and score -inf ("ip") / +inf ("l2").
    """
    op = "search"
    if not isinstance(queries, Tensor):
        raise TypeError(f"{op}: queries must be a torch.Tensor [Q, D], got {type(queries).__name__}")
    if queries.dim() != 2 or not queries.dtype.is_floating_point:
        raise ShapeError(f"{op}: queries must be a floating tensor [Q, D], got {queries.dtype} {tuple(queries.shape)}")
    _choice(op, "backend", backend, BACKENDS)
    _choice(op, "index", index, INDEXES)
    _choice(op, "metric", metric, METRICS)
    rows = _check_shards(op, shards, queries.shape[1])
    total = sum(rows)
    if total == 0:
        raise ValueError(f"{op}: the gallery is empty (all {len(rows)} shards have 0 rows); nothing to search")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= total:
        raise ValueError(
            f"{op}: k must be an int in [1, {total}] (the gallery's total rows over {len(rows)} shards), got {k!r}"
        )
    k = int(k)
    if backend == "knn":
        if index != "flat":
            raise ValueError(
                f"{op}: index={index!r} is a faiss index; the knn backend is always exact (flat): pass backend='faiss' "
                "to use it"
            )
        return _search_knn(queries, shards, rows, k, metric, knn_backend, device)
    nlist = _int_at_least(op, "nlist", nlist, 0, "IVF lists; 0 picks about 4 * sqrt(rows)")
    nprobe = _int_at_least(op, "nprobe", nprobe, 1, "IVF lists scanned per query")
    pq_m = _int_at_least(op, "pq_m", pq_m, 0, "product-quantizer bytes per vector; 0 picks a divisor of D")
    seed = _int_at_least(op, "seed", seed, 0, "seeds the IVF training sample")
    if index != "flat":
        if nlist > total:
            raise ValueError(f"{op}: nlist={nlist} exceeds the gallery's {total} rows; pass nlist <= {total} (or 0)")
        nlist = nlist or default_nlist(total)
    if index == "ivfpq":
        dim = queries.shape[1]
        pq_m = pq_m or default_pq_m(dim)
        if dim % pq_m:
            raise ValueError(f"{op}: pq_m={pq_m} must divide D={dim}; pass a divisor of D or 0 for the default")
        if total < 1 << PQ_BITS:
            raise ValueError(
                f"{op}: index='ivfpq' trains {1 << PQ_BITS} centroids per sub-quantizer and needs at least that many "
                f"gallery rows, got {total}; use index='flat' (or 'ivf') for a gallery this small"
            )
    return _search_faiss(queries, shards, rows, k, metric, index, nlist, nprobe, pq_m, seed, device)


def _search_knn(
    queries: Tensor, shards: Sequence[Any], rows: list[int], k: int, metric: str, knn_backend: str, device: Any
) -> tuple[Tensor, Tensor]:
    from kdforge.ops import knn

    q = queries if device is None else queries.to(device)
    best_s: Tensor | None = None
    best_i: Tensor | None = None
    offset = 0
    for shard, n in zip(shards, rows):
        if n:
            s, i = knn(q, shard, min(k, n), metric=metric, backend=knn_backend)
            s, i = s.float(), i + offset
            if best_s is None or best_i is None:
                best_s, best_i = s, i
            else:
                # Running entries come from earlier shards (lower global ids) and each part is ordered (best score,
                # then lower id), so a stable sort of [running, new] keeps ties ordered by global id.
                cand_s, cand_i = torch.cat([best_s, s], dim=1), torch.cat([best_i, i], dim=1)
                order = torch.sort(cand_s, dim=1, descending=metric == "ip", stable=True).indices[:, :k]
                best_s, best_i = cand_s.gather(1, order), cand_i.gather(1, order)
        offset += n
    assert best_s is not None and best_i is not None  # total >= k >= 1 rows were searched
    return best_s.cpu(), best_i.cpu()


def _import_faiss() -> Any:
    try:
        import faiss
    except ImportError as exc:
        raise BackendUnavailable(
            f"search: backend='faiss' needs faiss, which cannot be imported ({exc}); install it with "
            "`pip install faiss-cpu` (or faiss-gpu), or use backend='knn' (exact, no extra package)"
        ) from None
    return faiss


def _rows_float32(shard: Any, start: int, stop: int) -> np.ndarray:
    """Rows [start, stop) of a shard as a C-contiguous float32 array (only those rows are read from a memmap)."""
    if isinstance(shard, Tensor):
        return shard[start:stop].detach().to("cpu", torch.float32).contiguous().numpy()
    return np.ascontiguousarray(shard[start:stop], dtype=np.float32)


def _training_rows(shards: Sequence[Any], rows: list[int], count: int, seed: int) -> np.ndarray:
    """``count`` distinct gallery rows drawn uniformly (seeded), in global id order, as float32 [count, D]."""
    total = sum(rows)
    picked = np.sort(np.random.default_rng(seed).choice(total, size=count, replace=False))
    parts, offset = [], 0
    for shard, n in zip(shards, rows):
        local = picked[(picked >= offset) & (picked < offset + n)] - offset
        if local.size:
            if isinstance(shard, Tensor):
                parts.append(shard[torch.from_numpy(local)].detach().to("cpu", torch.float32).numpy())
            else:
                parts.append(np.asarray(shard[local], dtype=np.float32))  # reads only the picked rows of a memmap
        offset += n
    return np.ascontiguousarray(np.concatenate(parts))


def _faiss_device(device: Any) -> tuple[str, int | None]:
    """("cpu", None), ("all", None) or ("one", gpu number) from the ``device`` argument."""
    if device is None:
        return "all", None
    dev = torch.device(device)
    if dev.type == "cpu":
        return "cpu", None
    return ("one", dev.index) if dev.index is not None else ("all", None)


def _search_faiss(
    queries: Tensor,
    shards: Sequence[Any],
    rows: list[int],
    k: int,
    metric: str,
    index: str,
    nlist: int,
    nprobe: int,
    pq_m: int,
    seed: int,
    device: Any,
) -> tuple[Tensor, Tensor]:
    faiss = _import_faiss()
    dim, total = queries.shape[1], sum(rows)
    faiss_metric = faiss.METRIC_INNER_PRODUCT if metric == "ip" else faiss.METRIC_L2
    if index == "flat":
        built = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
    else:
        quantizer = faiss.IndexFlatIP(dim) if metric == "ip" else faiss.IndexFlatL2(dim)
        if index == "ivf":
            built = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss_metric)
            count = min(total, 256 * nlist)
        else:
            built = faiss.IndexIVFPQ(quantizer, dim, nlist, pq_m, PQ_BITS, faiss_metric)
            count = min(total, max(256 * nlist, 39 << PQ_BITS))
            built.pq.cp.seed = seed
        built.cp.seed = seed  # faiss's Python constructor keeps a reference to the quantizer
        built.train(_training_rows(shards, rows, count, seed))
        built.nprobe = min(nprobe, nlist)
    for shard, n in zip(shards, rows):
        for start in range(0, n, ADD_CHUNK_ROWS):
            built.add(_rows_float32(shard, start, min(start + ADD_CHUNK_ROWS, n)))

    where, gpu = _faiss_device(device)
    if where != "cpu" and k <= FAISS_GPU_MAX_K and faiss.get_num_gpus() > 0:
        options = faiss.GpuMultipleClonerOptions() if gpu is None else faiss.GpuClonerOptions()
        if index == "ivfpq":
            options.useFloat16 = True  # float16 lookup tables: needed by GPU IVF-PQ for large codes (pq_m >= 56)
        if gpu is None:
            built = faiss.index_cpu_to_all_gpus(built, co=options)
        else:
            resources = faiss.StandardGpuResources()
            built = faiss.index_cpu_to_gpu(resources, gpu, built, options)  # faiss keeps resources referenced
    q = np.ascontiguousarray(queries.detach().to("cpu", torch.float32).numpy())
    scores, ids = built.search(q, k)
    scores, ids = torch.from_numpy(scores).float(), torch.from_numpy(ids).long()
    missing = ids < 0
    if bool(missing.any()):
        scores = scores.masked_fill(missing, -math.inf if metric == "ip" else math.inf)
        ids = ids.masked_fill(missing, -1)
    return scores, ids
