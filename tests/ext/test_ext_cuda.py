"""kdforge._C CUDA kernels against the float64 references (and the CPU kernels): run on a GPU machine only.

Every test is marked ``gpu`` and skipped, with the reason printed, where the CUDA kernels were not compiled in or
no GPU is visible.
"""

from __future__ import annotations

import pytest
import torch
from ext_helpers import assert_same_neighbours
from reference64 import knn as ref_knn
from reference64 import whitened_loss as ref_whitened_loss
from tolerances import close

from kdforge import _ext

pytestmark = pytest.mark.gpu
CUDA = torch.device("cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("loss", ["smooth_l1", "mse"])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_whitened_loss(gen, dtype, loss, reduction):
    student = torch.randn(3, 41, 45, generator=gen).to(dtype)
    teacher = (torch.randn(3, 41, 45, generator=gen) * 2 + 3).to(dtype)
    s = student.to(CUDA).requires_grad_()
    out = _ext.whitened_loss(s, teacher.to(CUDA), loss=loss, beta=0.7, reduction=reduction)
    grad_out = torch.rand(out.shape, generator=gen, dtype=out.dtype) + 0.5
    (grad,) = torch.autograd.grad(out, s, grad_out.to(CUDA))
    ref, ref_grad = ref_whitened_loss(student, teacher, loss=loss, beta=0.7, reduction=reduction)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.dtype == acc and grad.dtype == dtype
    close(out, ref, acc, factor=4)
    weight = grad_out.double()[..., None] if reduction == "none" else grad_out.double()
    close(grad, ref_grad * weight, dtype)


def test_whitened_loss_index_and_empty(gen):
    student = torch.randn(5, 7, 33, generator=gen)
    teacher = torch.randn(5, 7, 33, generator=gen)
    index = torch.tensor([0, 34, 34, 12])
    s = student.to(CUDA).requires_grad_()
    out = _ext.whitened_loss(s, teacher.to(CUDA), index=index.to(CUDA))
    out.backward(torch.tensor(2.5, device=CUDA))
    ref, ref_grad = ref_whitened_loss(student, teacher, index=index)
    close(out, ref, torch.float32, factor=4)
    close(s.grad, 2.5 * ref_grad, torch.float32)
    empty = _ext.whitened_loss(s, teacher.to(CUDA), index=torch.empty(0, dtype=torch.long, device=CUDA))
    assert empty.item() == 0.0


def test_masked_rows(gen):
    for dtype in (torch.float32, torch.bfloat16, torch.int64, torch.bool):
        x = (torch.randn(3, 37, 29, generator=gen) * 9).to(dtype)
        mask = torch.rand(3, 37, generator=gen) < 0.4
        assert torch.equal(_ext.masked_gather(x.to(CUDA), mask.to(CUDA)).cpu(), x[mask])
        rows = (torch.randn(int(mask.sum()), 29, generator=gen) * 9).to(dtype)
        expected = x.clone()
        expected[mask] = rows
        assert torch.equal(_ext.masked_scatter(rows.to(CUDA), mask.to(CUDA), x.to(CUDA)).cpu(), expected)
    sliced = torch.randn(2, 9, 6, device=CUDA)[:, 1:]
    m = torch.rand(2, 8, generator=gen).to(CUDA) < 0.5
    assert torch.equal(_ext.masked_gather(sliced, m), sliced[m])
    none = torch.zeros(2, 8, dtype=torch.bool, device=CUDA)
    assert _ext.masked_gather(sliced, none).shape == (0, 6)


def test_masked_rows_gradients(gen):
    x = torch.randn(2, 5, 3, dtype=torch.float64, device=CUDA, requires_grad=True)
    out = torch.randn(2, 5, 3, dtype=torch.float64, device=CUDA, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool, device=CUDA)
    rows = torch.randn(5, 3, dtype=torch.float64, device=CUDA, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _ext.masked_gather(t, mask), (x,))
    assert torch.autograd.gradcheck(lambda r, o: _ext.masked_scatter(r, mask, o), (rows, out))


@pytest.mark.parametrize("metric", ["ip", "l2"])
@pytest.mark.parametrize("gallery_on_cpu", [False, True])
@pytest.mark.parametrize("chunk_size", [None, 1, 100])
def test_knn_exact_with_ties(gen, metric, gallery_on_cpu, chunk_size):
    queries = torch.randint(-3, 4, (13, 9), generator=gen).float()
    gallery = torch.randint(-3, 4, (1301, 9), generator=gen).float()
    gallery[700:900] = gallery[:200]
    g = gallery if gallery_on_cpu else gallery.to(CUDA)
    scores, idx = _ext.knn(queries.to(CUDA), g, 37, metric=metric, chunk_size=chunk_size)
    ref_scores, ref_idx = ref_knn(queries, gallery, 37, metric)
    assert scores.device.type == "cuda" and scores.dtype == torch.float32
    assert torch.equal(idx.cpu(), ref_idx)
    assert torch.equal(scores.cpu().double(), ref_scores)


@pytest.mark.parametrize("k", [1, 100, 1000, 2048])
def test_knn_random_against_cpu_kernel(gen, k):
    queries = torch.randn(64, 96, generator=gen)
    gallery = torch.randn(20011, 96, generator=gen)
    scores, idx = _ext.knn(queries.to(CUDA), gallery.to(CUDA), k, metric="ip", chunk_size=4096)
    cpu_scores, cpu_idx = _ext.knn(queries, gallery, k, metric="ip")
    assert_same_neighbours(scores, idx.cpu(), cpu_scores, cpu_idx, rtol=2e-5)


def test_knn_bad_devices_and_k():
    with pytest.raises(RuntimeError, match="knn: queries must be on the GPU when the gallery is"):
        torch.ops.kdforge.knn(torch.randn(3, 4), torch.randn(10, 4, device=CUDA), 2, "ip", None)
    with pytest.raises(RuntimeError, match=r"knn \(CUDA kernel\): k must be <= 2048"):
        torch.ops.kdforge.knn(torch.randn(3, 4, device=CUDA), torch.randn(3000, 4, device=CUDA), 2049, "ip", None)


def test_opcheck_cuda(gen):
    s = torch.randn(2, 5, 11, device=CUDA, requires_grad=True)
    t = torch.randn(2, 5, 11, device=CUDA)
    torch.library.opcheck(torch.ops.kdforge.whitened_loss.default, (s, t, None, "smooth_l1", 2.0, True, 1e-5, "mean"))
    x = torch.randn(2, 7, 5, device=CUDA, requires_grad=True)
    mask = torch.rand(2, 7, device=CUDA) < 0.5
    torch.library.opcheck(torch.ops.kdforge.masked_gather.default, (x, mask))
    rows = torch.randn(int(mask.sum()), 5, device=CUDA, requires_grad=True)
    torch.library.opcheck(torch.ops.kdforge.masked_scatter.default, (rows, mask, x.detach().requires_grad_()))
    q, g = torch.randn(6, 10, device=CUDA), torch.randn(40, 10, device=CUDA)
    torch.library.opcheck(torch.ops.kdforge.knn.default, (q, g, 5, "l2", 16))
