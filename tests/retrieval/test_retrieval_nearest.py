"""kdforge.retrieval.nearest over sharded float16 memmaps: the knn backend against kdforge.ops.knn on the
concatenated gallery (ties across shards included), faiss flat / IVF / IVF-PQ against it, and the argument checks."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch

from kdforge.errors import KdforgeError, ShapeError
from kdforge.ops import knn
from kdforge.retrieval import search
from kdforge.retrieval.nearest import default_nlist, default_pq_m


def _shards(tmp_path, arrays):
    """Each array written as a float16 .npy and opened back as a read-only memmap, as a gallery's shards are."""
    out = []
    for n, a in enumerate(arrays):
        path = tmp_path / f"shard{n}.npy"
        m = np.lib.format.open_memmap(path, mode="w+", dtype=np.float16, shape=a.shape)
        m[:] = a
        m.flush()
        del m
        out.append(np.load(path, mmap_mode="r"))
    return out


def _random_shards(tmp_path, gen, sizes, dim):
    return _shards(tmp_path, [torch.randn(n, dim, generator=gen).numpy() for n in sizes])


def _assert_close_scores(scores, expected, rel=1e-5):
    atol = rel * max(float(expected.abs().max()), 1.0)
    torch.testing.assert_close(scores, expected.float(), atol=atol, rtol=0)


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("k", [1, 9, 60])
def test_knn_backend_equals_knn_on_the_concatenated_gallery(tmp_path, gen, metric, k):
    shards = _random_shards(tmp_path, gen, [37, 0, 120, 5, 64], 16)  # k=60 exceeds some shards, not all
    queries = torch.randn(7, 16, generator=gen)
    scores, ids = search(queries, shards, k, metric=metric, knn_backend="reference")
    exp_s, exp_i = knn(queries, np.concatenate(shards), k, metric=metric, backend="reference")
    assert scores.dtype == torch.float32 and ids.dtype == torch.long and scores.shape == ids.shape == (7, k)
    assert scores.device.type == ids.device.type == "cpu"
    assert torch.equal(ids, exp_i)
    _assert_close_scores(scores, exp_s)


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ties_across_shards_go_to_the_lower_global_id(tmp_path, gen, metric):
    # Small integers: every score is exact, so equal rows score exactly alike in every shard and every chunk.
    a = torch.randint(-2, 3, (12, 4), generator=gen).float()
    b = torch.randint(-2, 3, (20, 4), generator=gen).float()
    b[[3, 11, 19]] = a[[0, 5, 11]]  # rows of shard 0 planted again in shard 2
    b[7] = b[3]  # and twice within it
    shards = _shards(tmp_path, [a.numpy(), np.zeros((0, 4), np.float32), b.numpy()])
    queries = torch.cat([a[[0, 5]], torch.randint(-2, 3, (4, 4), generator=gen).float()])
    gallery = torch.cat([a, b]).double()
    q = queries.double()
    full = q @ gallery.T if metric == "ip" else -((q[:, None] - gallery[None]) ** 2).sum(-1)
    expected = [sorted(range(32), key=lambda j, r=r: (-full[r, j].item(), j)) for r in range(len(q))]
    for k in (3, 32):
        _, ids = search(queries, shards, k, metric=metric, knn_backend="reference")
        assert ids.tolist() == [row[:k] for row in expected]
    _, ids = search(queries[:1], shards, 4, metric=metric, knn_backend="reference")
    assert ids.tolist() == [[0, 12 + 3, 12 + 7, expected[0][3]]]  # query = row 0: itself first, then its copies


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_faiss_flat_and_exhaustive_ivf_equal_the_knn_backend(tmp_path, gen, metric, monkeypatch):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")
    # the search module, to add shards in small chunks
    monkeypatch.setattr(sys.modules["kdforge.retrieval.nearest"], "ADD_CHUNK_ROWS", 256)  # shards added in chunks
    shards = _random_shards(tmp_path, gen, [500, 0, 1300, 700], 32)
    queries = torch.randn(12, 32, generator=gen)
    exp_s, exp_i = search(queries, shards, 10, metric=metric, knn_backend="reference")
    scores, ids = search(queries, shards, 10, metric=metric, backend="faiss", device="cpu")
    assert scores.dtype == torch.float32 and ids.dtype == torch.long and scores.shape == (12, 10)
    assert torch.equal(ids, exp_i)
    _assert_close_scores(scores, exp_s)
    scores, ids = search(queries, shards, 10, metric=metric, backend="faiss", index="ivf", nlist=8, nprobe=8)
    assert torch.equal(ids, exp_i)  # every list probed: exact again
    _assert_close_scores(scores, exp_s)


def test_faiss_ivfpq_recall_on_clustered_data(tmp_path, gen):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")
    centres = 3 * torch.randn(40, 32, generator=gen)
    labels = torch.randint(0, 40, (3000,), generator=gen)
    rows = centres[labels] + torch.randn(3000, 32, generator=gen)
    shards = _shards(tmp_path, [rows[:1000].numpy(), rows[1000:2400].numpy(), rows[2400:].numpy()])
    queries = centres[:20] + torch.randn(20, 32, generator=gen)
    _, exact = search(queries, shards, 10, metric="l2", knn_backend="reference")
    _, ids = search(queries, shards, 10, metric="l2", backend="faiss", index="ivfpq", nlist=16, nprobe=4, seed=3)
    assert bool((((ids >= 0) & (ids < 3000)) | (ids == -1)).all())
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(ids.tolist(), exact.tolist())])
    print(f"recall@10={recall:.3f}")
    assert recall > 0.5, recall
    _, again = search(queries, shards, 10, metric="l2", backend="faiss", index="ivfpq", nlist=16, nprobe=4, seed=3)
    assert torch.equal(again, ids)  # seeded: the same index, the same answer


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_unfilled_places_of_an_ivf_probe_are_minus_one(tmp_path, gen, metric):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")
    shards = _random_shards(tmp_path, gen, [150, 150], 8)
    queries = torch.randn(5, 8, generator=gen)
    scores, ids = search(queries, shards, 40, metric=metric, backend="faiss", index="ivf", nlist=60, nprobe=1)
    missing = ids == -1
    assert bool(missing.any()) and bool((ids[~missing] >= 0).all())  # ~5 rows per list: one probe finds < 40
    assert bool((scores[missing] == (-torch.inf if metric == "ip" else torch.inf)).all())
    assert bool(scores[~missing].isfinite().all())
    for row in missing:  # the found ones first
        assert not bool((row[:-1] & ~row[1:]).any())


def test_defaults_of_the_ivf_and_pq_sizes():
    assert default_nlist(1) == 1 and default_nlist(10_000) == 400 and default_nlist(3) == 3
    assert [default_pq_m(d) for d in (768, 512, 128, 96, 64, 7, 1)] == [64, 64, 64, 48, 32, 1, 1]


def test_argument_errors(tmp_path, gen, monkeypatch):
    shards = _random_shards(tmp_path, gen, [5, 0, 6], 8)
    queries = torch.randn(3, 8, generator=gen)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 11\]"):
        search(queries, shards, 12)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, 11\]"):
        search(queries, shards, 0)
    with pytest.raises(ShapeError, match="shard 0 has D=8 but the queries have D=6"):
        search(queries[:, :6], shards, 2)
    with pytest.raises(ShapeError, match="shard 1 has D=4 but the queries have D=8"):
        search(queries, [shards[0], np.zeros((3, 4), np.float16)], 2)
    with pytest.raises(ValueError, match="backend must be one of 'knn', 'faiss', got 'annoy'"):
        search(queries, shards, 2, backend="annoy")
    with pytest.raises(ValueError, match="index must be one of 'flat', 'ivf', 'ivfpq', got 'hnsw'"):
        search(queries, shards, 2, backend="faiss", index="hnsw")
    with pytest.raises(ValueError, match="metric must be one of 'ip', 'l2', got 'cos'"):
        search(queries, shards, 2, metric="cos")
    with pytest.raises(ValueError, match="pass backend='faiss'"):
        search(queries, shards, 2, index="ivf")
    with pytest.raises(ValueError, match="gallery is empty"):
        search(queries, [shards[1]], 1)
    with pytest.raises(TypeError, match="wrap a single gallery as"):
        search(queries, shards[0], 1)
    with pytest.raises(ValueError, match="needs at least that many gallery rows"):
        search(queries, shards, 2, backend="faiss", index="ivfpq")
    with pytest.raises(ValueError, match="pq_m=3 must divide D=8"):
        search(queries, shards, 2, backend="faiss", index="ivfpq", pq_m=3)
    monkeypatch.setitem(sys.modules, "faiss", None)  # import faiss now fails, as where it is not installed
    with pytest.raises(KdforgeError, match="pip install faiss-cpu"):
        search(queries, shards, 2, backend="faiss")
