"""kdforge._C knn (CPU kernel): exact neighbours against a float64 brute force and faiss-cpu, ties to the lower
gallery index, chunking, dtypes, numpy / memmap galleries, bad input and opcheck."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ext_helpers import assert_same_neighbours
from reference64 import knn as ref_knn

from kdforge import _ext


def _integer_data(gen, q, g, d, low=-3, high=4):
    """Small integers: every dot product and distance is exact in float32, so ties are exact ties."""
    queries = torch.randint(low, high, (q, d), generator=gen).float()
    gallery = torch.randint(low, high, (g, d), generator=gen).float()
    return queries, gallery


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("chunk_size", [None, 1, 7, 64, 1000])
def test_exact_with_ties_to_lower_index(gen, metric, chunk_size):
    """Duplicated gallery rows and integer data give many exact ties: the lower index must come first."""
    queries, gallery = _integer_data(gen, 13, 301, 9)
    gallery[150:200] = gallery[:50]  # duplicates at higher indices
    k = 37
    scores, idx = _ext.knn(queries, gallery, k, metric=metric, chunk_size=chunk_size)
    ref_scores, ref_idx = ref_knn(queries, gallery, k, metric)
    assert scores.dtype == torch.float32 and idx.dtype == torch.int64 and idx.shape == (13, k)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores.double(), ref_scores)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_random_data_and_k_equal_to_g(gen, metric):
    queries = torch.randn(21, 45, generator=gen)
    gallery = torch.randn(233, 45, generator=gen)
    for k in (1, 10, 233):
        scores, idx = _ext.knn(queries, gallery, k, metric=metric, chunk_size=50)
        ref_scores, ref_idx = ref_knn(queries, gallery, k, metric)
        assert_same_neighbours(scores, idx, ref_scores, ref_idx, rtol=1e-5, largest=metric == "ip")
    assert torch.equal(torch.sort(idx, dim=1).values, torch.arange(233).expand(21, -1))  # k = G: all of them


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("chunk_size", [None, 100])
def test_rising_scores_refill_the_candidate_pool(gen, metric, chunk_size):
    """Scores that rise along the gallery admit most items, so each query's candidate pool (2k + 16) is cut back
    to its best k dozens of times; equal scores in threes (and small integer noise) make every cut settle ties."""
    n_q, n_g, k = 11, 999, 10
    queries = torch.cat([torch.randint(1, 4, (n_q, 1), generator=gen), torch.randint(-1, 2, (n_q, 1), generator=gen)], 1)
    steps = torch.arange(n_g) // 3
    # ip: q.g grows with the first column; l2: the first column walks towards the queries (|q0| <= 3).
    first = steps if metric == "ip" else steps.max() - steps
    gallery = torch.stack([first, torch.randint(-1, 2, (n_g,), generator=gen)], 1)
    queries, gallery = queries.float(), gallery.float()
    scores, idx = _ext.knn(queries, gallery, k, metric=metric, chunk_size=chunk_size)
    ref_scores, ref_idx = ref_knn(queries, gallery, k, metric)
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores.double(), ref_scores)


def test_more_queries_than_the_candidate_pools_hold(gen):
    """With k = 2000 the candidate pools (2k + 16 entries of 16 bytes per query, 64 MiB in all) hold 1024 queries,
    so 1100 queries are searched in two passes over the gallery; the second starts from empty pools."""
    queries, gallery = _integer_data(gen, 1100, 2100, 3)
    k = 2000
    scores, idx = _ext.knn(queries, gallery, k, metric="l2", chunk_size=700)
    ref_scores, ref_idx = ref_knn(queries, gallery, k, "l2")
    assert torch.equal(idx, ref_idx)
    assert torch.equal(scores.double(), ref_scores)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_dtypes(gen, dtype):
    queries, gallery = _integer_data(gen, 7, 150, 11)  # exact in every dtype
    scores, idx = _ext.knn(queries.to(dtype), gallery.to(dtype), 12, metric="l2", chunk_size=40)
    ref_scores, ref_idx = ref_knn(queries, gallery, 12, "l2")
    assert scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(idx, ref_idx) and torch.equal(scores.double(), ref_scores)
    # A float32 query against a half gallery: the gallery chunks are widened to float32.
    scores, idx = _ext.knn(queries, gallery.to(dtype), 12, metric="ip")
    assert torch.equal(idx, ref_knn(queries, gallery, 12, "ip")[1])


def test_non_contiguous_gallery_and_queries(gen):
    queries, gallery = _integer_data(gen, 9, 120, 16)
    g_t = gallery.T.contiguous().T  # column-major
    q_s = torch.stack([queries, queries], dim=2).reshape(9, 32)[:, ::2]  # stride 2 on D
    assert not g_t.is_contiguous() and not q_s.is_contiguous()
    assert torch.equal(q_s, queries)
    scores, idx = _ext.knn(q_s, g_t, 15, metric="ip", chunk_size=33)
    ref_scores, ref_idx = ref_knn(queries, gallery, 15, "ip")
    assert torch.equal(idx, ref_idx) and torch.equal(scores.double(), ref_scores)


def test_numpy_and_memmap_gallery(gen, tmp_path):
    queries, gallery = _integer_data(gen, 5, 90, 8)
    path = tmp_path / "gallery.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(90, 8))
    mm[:] = gallery.numpy()
    mm.flush()
    read_only = np.memmap(path, dtype=np.float32, mode="r", shape=(90, 8))
    ref_scores, ref_idx = ref_knn(queries, gallery, 6, "l2")
    for g in (gallery.numpy(), read_only):
        scores, idx = _ext.knn(queries, g, 6, metric="l2", chunk_size=25)
        assert torch.equal(idx, ref_idx) and torch.equal(scores.double(), ref_scores)


def test_nan_scores_rank_last(gen):
    queries, gallery = _integer_data(gen, 4, 30, 5)
    gallery[3] = float("nan")
    scores, idx = _ext.knn(queries, gallery, 30, metric="ip", chunk_size=8)
    assert torch.all(idx[:, -1] == 3)  # every real score beats NaN
    clean = torch.cat([gallery[:3], gallery[4:]])
    ref_scores, ref_idx = ref_knn(queries, clean, 29, "ip")
    assert torch.equal(idx[:, :29], ref_idx + (ref_idx >= 3).long())
    assert torch.equal(scores[:, :29].double(), ref_scores)


def test_empty_queries():
    scores, idx = _ext.knn(torch.empty(0, 4), torch.randn(10, 4), 3)
    assert scores.shape == (0, 3) and idx.shape == (0, 3)


def test_same_neighbours_as_faiss(gen):
    faiss = pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")
    queries = torch.randn(31, 48, generator=gen)
    gallery = torch.randn(3001, 48, generator=gen)
    index = faiss.IndexFlatIP(48)
    index.add(gallery.numpy())
    f_scores, f_idx = index.search(queries.numpy(), 25)
    scores, idx = _ext.knn(queries, gallery, 25, metric="ip", chunk_size=512)
    assert_same_neighbours(scores, idx, torch.from_numpy(f_scores), torch.from_numpy(f_idx), rtol=1e-5)
    l2 = faiss.IndexFlatL2(48)
    l2.add(gallery.numpy())
    f_scores, f_idx = l2.search(queries.numpy(), 25)
    scores, idx = _ext.knn(queries, gallery, 25, metric="l2")
    assert_same_neighbours(scores, idx, torch.from_numpy(f_scores), torch.from_numpy(f_idx), rtol=1e-5,
                           largest=False)


def test_opcheck(gen):
    queries, gallery = torch.randn(6, 10, generator=gen), torch.randn(40, 10, generator=gen)
    op = torch.ops.kdforge.knn.default
    torch.library.opcheck(op, (queries, gallery, 5, "ip", None))
    torch.library.opcheck(op, (queries, gallery, 40, "l2", 16))


@pytest.mark.parametrize(
    "args, message",
    [
        ((torch.randn(3, 4), torch.randn(10, 4), 11, "ip", None), "knn: k must be in [1, G] where G = 10 gallery rows, got k = 11"),
        ((torch.randn(3, 4), torch.randn(10, 4), 0, "ip", None), "got k = 0"),
        ((torch.randn(3, 4), torch.randn(10, 5), 2, "ip", None), "knn: gallery must be [G, D] with D = 4 like queries, got [10, 5]"),
        ((torch.randn(3, 4), torch.randn(10, 4), 2, "cos", None), 'knn: metric must be "ip"'),
        ((torch.randn(3, 4), torch.randn(10, 4), 2, "ip", 0), "knn: chunk_size must be >= 1 or None, got 0"),
        ((torch.randn(4), torch.randn(10, 4), 2, "ip", None), "knn: queries must be [Q, D], got [4]"),
    ],
)
def test_bad_input_messages(args, message):
    with pytest.raises(RuntimeError) as err:
        torch.ops.kdforge.knn(*args)
    assert message in str(err.value)
