"""kdforge.ops.knn: exact search against faiss (IndexFlatIP / IndexFlatL2), tie order, streamed galleries.

The fused kernel's running top-k sorts in the interpreter are slow, so interpreter shapes stay tiny (Q <= 16,
G a few hundred); the goal-scale checks are the GPU tests.
"""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch
from ops_helpers import DEVICE, gpu_only, randn
from tolerances import close, score_tol

from kdforge.errors import BackendUnavailable, ShapeError
from kdforge.ops import knn, reference

BACKENDS = ["triton", "reference"]


def assert_same_up_to_ties(scores, indices, exp_scores, exp_indices, rtol):
    """Scores agree within ``rtol`` times the largest expected |score|; where the index lists differ, the items there
    are ties within that tolerance: swapped with an equal-scored item of the expected list, or across the k-th place
    with an item scoring like the last."""
    scores, exp_scores = torch.as_tensor(scores).double().cpu(), torch.as_tensor(exp_scores).double().cpu()
    indices, exp_indices = torch.as_tensor(indices).cpu(), torch.as_tensor(exp_indices).cpu()
    assert scores.shape == exp_scores.shape and indices.shape == exp_indices.shape
    atol = score_tol(exp_scores, rtol)
    torch.testing.assert_close(scores, exp_scores, atol=atol, rtol=0)
    for r, c in (indices != exp_indices).nonzero().tolist():
        hit = (exp_indices[r] == indices[r, c]).nonzero()
        other = exp_scores[r, hit[0, 0]] if len(hit) else exp_scores[r, -1]
        assert abs(other - scores[r, c]) <= 2 * atol, (r, c, indices[r, c].item(), scores[r, c].item(), other.item())


def _faiss(queries, gallery, k, metric):
    index = faiss.IndexFlatIP(gallery.shape[1]) if metric == "ip" else faiss.IndexFlatL2(gallery.shape[1])
    index.add(np.ascontiguousarray(gallery.detach().float().cpu().numpy()))
    return index.search(np.ascontiguousarray(queries.detach().float().cpu().numpy()), k)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_matches_faiss(gen, backend, metric):
    queries, gallery = randn(gen, 9, 24), randn(gen, 100, 24)
    scores, indices = knn(queries, gallery, 5, metric=metric, chunk_size=60, backend=backend)
    assert scores.dtype == torch.float32 and indices.dtype == torch.long and scores.shape == (9, 5)
    f_scores, f_indices = _faiss(queries, gallery, 5, metric)
    assert_same_up_to_ties(scores, indices, f_scores, f_indices, rtol=1e-5)


def _brute_force_order(queries, gallery, k, metric):
    """Python-sorted (best score, then lower index) on exactly representable integer data."""
    q, g = queries.double().cpu(), gallery.double().cpu()
    s = q @ g.T if metric == "ip" else -((q[:, None, :] - g[None]) ** 2).sum(-1)
    return torch.tensor([sorted(range(g.shape[0]), key=lambda j: (-s[r, j].item(), j))[:k] for r in range(q.shape[0])])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_ties_go_to_the_lower_index(gen, backend, metric):
    """Small-integer vectors: many exactly equal scores, inside and across chunk (and kernel slice) borders."""
    queries = torch.randint(-2, 3, (7, 6), generator=gen).float().to(DEVICE)
    gallery = torch.randint(-2, 3, (70, 6), generator=gen).float().to(DEVICE)
    gallery[30:45] = gallery[10]  # the same row repeated: identical scores for every query
    scores, indices = knn(queries, gallery, 12, metric=metric, chunk_size=33, backend=backend)
    expected = _brute_force_order(queries, gallery, 12, metric)
    assert torch.equal(indices.cpu(), expected)


def test_zero_scores_of_both_signs_tie(gen):
    """+0.0 and -0.0 inner products are equal scores: the lower index must come first."""
    queries = torch.tensor([[1.0, 0.0]], device=DEVICE)
    gallery = torch.tensor([[0.0, 5.0], [-0.0, -3.0], [-1.0, 0.0], [0.0, 1.0]], device=DEVICE)
    for backend in BACKENDS:
        scores, indices = knn(queries, gallery, 3, backend=backend)
        assert indices.tolist() == [[0, 1, 3]], backend


@pytest.mark.parametrize("backend", BACKENDS)
def test_numpy_memmap_gallery(gen, backend, tmp_path):
    gallery = randn(gen, 130, 16, device="cpu")
    path = tmp_path / "gallery.f32"
    mm = np.memmap(path, dtype=np.float32, mode="w+", shape=(130, 16))
    mm[:] = gallery.numpy()
    mm.flush()
    mm = np.memmap(path, dtype=np.float32, mode="r", shape=(130, 16))
    queries = randn(gen, 6, 16)
    got = knn(queries, mm, 4, metric="l2", chunk_size=50, backend=backend)
    expected = reference.knn(queries, gallery.to(DEVICE), 4, metric="l2")
    assert_same_up_to_ties(*got, *expected, rtol=1e-5)


def test_large_k_path(gen):
    """k > 256 leaves the register-resident top-k: keys of each chunk are materialised and top-k'ed."""
    queries, gallery = randn(gen, 5, 8), randn(gen, 300, 8)
    got = knn(queries, gallery, 260, metric="l2", chunk_size=170, backend="triton")
    f_scores, f_indices = _faiss(queries, gallery, 260, "l2")
    assert_same_up_to_ties(*got, f_scores, f_indices, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_grid(gen, dtype):
    queries, gallery = randn(gen, 6, 40, dtype=dtype), randn(gen, 40, 40, dtype=dtype)
    for metric in ("ip", "l2"):
        got = knn(queries, gallery, 4, metric=metric, backend="triton")
        # Same rounded inputs, fp32 products on both sides.
        expected = reference.knn(queries.float(), gallery.float(), 4, metric=metric)
        assert_same_up_to_ties(*got, *expected, rtol=1e-4)


def test_reference_streams_chunks_never_the_whole_gallery(gen, monkeypatch):
    queries, gallery = randn(gen, 4, 8), randn(gen, 103, 8)
    seen = []
    original = reference.gallery_chunk

    def spy(g, start, stop, device, dtype):
        seen.append(stop - start)
        return original(g, start, stop, device, dtype)

    monkeypatch.setattr(reference, "gallery_chunk", spy)
    results = [reference.knn(queries, gallery, 6, metric="l2", chunk_size=c) for c in (1, 7, 103)]
    assert max(seen[:103]) == 1 and max(seen[103:118]) == 7 and seen[-1] == 103
    for s, i in results[1:]:
        assert torch.equal(i, results[0][1])
        close(s, results[0][0], torch.float32)


@pytest.mark.parametrize("backend", BACKENDS + ["ext"])
@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_nan_rows_rank_last(request, gen, backend, metric):
    """A gallery row holding a NaN (a corrupt embedding) scores as the worst possible (-inf ip / +inf l2): it
    never displaces a real neighbour, and where k reaches it, the NaN rows come last in index order."""
    if backend == "ext":
        request.getfixturevalue("require_ext")
    queries, gallery = randn(gen, 5, 8), randn(gen, 30, 8)
    bad = [0, 7, 19]
    gallery[bad, 3] = float("nan")
    good = torch.tensor([i for i in range(30) if i not in bad])
    exp_s, exp_i = _faiss(queries, gallery[good.to(gallery.device)], 27, metric)
    scores, indices = knn(queries, gallery, 30, metric=metric, backend=backend)
    assert_same_up_to_ties(scores[:, :27], indices[:, :27], exp_s, good[torch.as_tensor(exp_i)], rtol=1e-5)
    assert indices[:, 27:].tolist() == [bad] * 5
    worst = float("-inf") if metric == "ip" else float("inf")
    assert (scores[:, 27:] == worst).all()
    _, top3 = knn(queries, gallery, 3, metric=metric, backend=backend)
    assert torch.equal(top3.cpu(), indices[:, :3].cpu())


@pytest.mark.parametrize("backend", BACKENDS + ["ext"])
@pytest.mark.parametrize("where", ["device", "memmap"])
def test_no_queries(request, gen, backend, where, tmp_path):
    """Q = 0: empty [0, k] answers in the promised dtypes, without reading the gallery."""
    if backend == "ext":
        request.getfixturevalue("require_ext")
    gallery = randn(gen, 40, 8)
    if where == "memmap":
        mm = np.lib.format.open_memmap(tmp_path / "g.npy", mode="w+", dtype=np.float32, shape=(40, 8))
        mm[:] = gallery.cpu().numpy()
        gallery = mm
    scores, indices = knn(randn(gen, 0, 8), gallery, 5, backend=backend)
    assert scores.shape == (0, 5) and indices.shape == (0, 5)
    assert scores.dtype == torch.float32 and indices.dtype == torch.int64


def test_argument_errors(gen):
    queries, gallery = randn(gen, 3, 8), randn(gen, 10, 8)
    with pytest.raises(ValueError, match=r"k must be an int in \[1, G=10\]"):
        knn(queries, gallery, 11)
    with pytest.raises(ValueError, match="k must be"):
        knn(queries, gallery, 0)
    with pytest.raises(ShapeError, match="D=9 but queries have D=8"):
        knn(queries, randn(gen, 10, 9), 3)
    with pytest.raises(ValueError, match="metric must be one of"):
        knn(queries, gallery, 3, metric="cosine")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        knn(queries, gallery, 3, chunk_size=0)
    with pytest.raises(TypeError, match="numpy array"):
        knn(queries, gallery.tolist(), 3)
    with pytest.raises(ValueError, match="k <= 1024"):
        knn(queries, randn(gen, 1100, 8), 1025, backend="triton")


@pytest.mark.parametrize("metric", ["ip", "l2"])
def test_torch_compile_fullgraph(gen, metric):
    """torch.compile(fullgraph=True) traces the Triton knn custom op; the answer is the eager one."""
    queries, gallery = randn(gen, 5, 16), randn(gen, 40, 16)
    search = lambda q, g: knn(q, g, 4, metric=metric, backend="triton")  # noqa: E731
    compiled = torch.compile(search, fullgraph=True, backend="aot_eager")
    scores, indices = compiled(queries, gallery)
    exp_scores, exp_indices = knn(queries, gallery, 4, metric=metric, backend="reference")
    assert torch.equal(indices, exp_indices)
    close(scores, exp_scores, torch.float32)


def test_ext_backend_unavailable_is_clear(gen, monkeypatch):
    import sys
    import types

    fake = types.SimpleNamespace(available=lambda: False, unavailable_reason=lambda: "built without CUDA")
    monkeypatch.setitem(sys.modules, "kdforge._ext", fake)
    with pytest.raises(BackendUnavailable, match=r"kdforge\._C is not built: built without CUDA\. Build it with"):
        knn(randn(gen, 3, 8), randn(gen, 10, 8), 2, backend="ext")


def test_opcheck_custom_op(gen):
    queries, gallery = randn(gen, 4, 16), randn(gen, 16, 16)
    torch.library.opcheck(torch.ops.kdforge_triton.knn_keys, (queries, gallery, 3, "l2", 100))


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("k", [1, 100, 256, 1024])
@pytest.mark.parametrize("where", ["device", "cpu_tensor", "memmap"])
def test_gpu_search(gen, k, where, tmp_path):
    Q, G, D = 1000, 200_000, 128
    queries = randn(gen, Q, D, dtype=torch.float16)
    gallery_cpu = randn(gen, G, D, dtype=torch.float16, device="cpu")
    if where == "device":
        gallery = gallery_cpu.to(DEVICE)
    elif where == "cpu_tensor":
        gallery = gallery_cpu
    else:
        gallery = np.memmap(tmp_path / "g.f16", dtype=np.float16, mode="w+", shape=(G, D))
        gallery[:] = gallery_cpu.numpy()
    for metric in ("ip", "l2"):
        got = knn(queries, gallery, k, metric=metric, chunk_size=70_000, backend="triton")
        expected = reference.knn(queries.float(), gallery_cpu.to(DEVICE).float(), k, metric=metric)
        assert_same_up_to_ties(*got, *expected, rtol=2e-4)
