"""kdforge.ops.masked_gather / masked_scatter: Triton kernels against the reference, gradients, edge cases."""

from __future__ import annotations

import pytest
import torch
from ops_helpers import DEVICE, gpu_only, randn
from tolerances import close

from kdforge.errors import BackendUnavailable, ShapeError
from kdforge.ops import masked_gather, masked_scatter, reference

B, N, D = 3, 13, 45


def _mask(gen, *shape, p=0.4):
    return (torch.rand(shape, generator=gen) < p).to(DEVICE)


@pytest.mark.parametrize("backend", ["triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gather_rows_in_row_major_order(gen, backend, dtype):
    x = randn(gen, B, N, D, dtype=dtype, requires_grad=True)
    mask = _mask(gen, B, N)
    rows = masked_gather(x, mask, backend=backend)
    flat = torch.nonzero(mask.reshape(-1)).squeeze(1)
    assert rows.shape == (int(mask.sum()), D) and rows.dtype == dtype
    assert torch.equal(rows, x.detach().reshape(-1, D)[flat])  # a copy: bit-exact
    grad_rows = randn(gen, *rows.shape, dtype=dtype)
    (grad,) = torch.autograd.grad(rows, x, grad_rows)
    expected = torch.zeros_like(x).reshape(-1, D)
    expected[flat] = grad_rows
    assert torch.equal(grad, expected.reshape(B, N, D))


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_scatter_replaces_masked_rows_and_leaves_out_alone(gen, backend):
    out = randn(gen, B, N, D, requires_grad=True)
    mask = _mask(gen, B, N)
    rows = randn(gen, int(mask.sum()), D, requires_grad=True)
    before = out.detach().clone()
    new = masked_scatter(rows, mask, out, backend=backend)
    assert torch.equal(out.detach(), before)  # out itself is not modified
    expected = reference.masked_scatter(rows, mask, out)
    assert torch.equal(new, expected)
    assert torch.equal(new[mask], rows.detach()) and torch.equal(new[~mask], before[~mask])
    grad_new = randn(gen, B, N, D)
    g_rows, g_out = torch.autograd.grad(new, (rows, out), grad_new)
    e_rows, e_out = torch.autograd.grad(expected, (rows, out), grad_new)
    assert torch.equal(g_rows, e_rows) and torch.equal(g_out, e_out)


def test_gather_then_scatter_round_trip(gen):
    x = randn(gen, 2, 4, 3, N, D)  # more leading dims than [B, N]
    mask = _mask(gen, 2, 4, 3, N, p=0.6)
    rows = masked_gather(x, mask, backend="triton")
    back = masked_scatter(rows * 2, mask, x, backend="triton")
    assert torch.equal(back, torch.where(mask[..., None], 2 * x, x))  # copies and an exact doubling


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_all_false_and_all_true_masks(gen, backend):
    x = randn(gen, B, N, D, requires_grad=True)
    none = torch.zeros(B, N, dtype=torch.bool, device=DEVICE)
    rows = masked_gather(x, none, backend=backend)
    assert rows.shape == (0, D)
    (grad,) = torch.autograd.grad(rows.sum(), x)
    assert torch.count_nonzero(grad) == 0
    same = masked_scatter(rows.detach(), none, x.detach(), backend=backend)
    assert torch.equal(same, x.detach())
    every = torch.ones(B, N, dtype=torch.bool, device=DEVICE)
    assert torch.equal(masked_gather(x, every, backend=backend), x.detach().reshape(-1, D))


@pytest.mark.parametrize("backend", ["triton", "reference", "ext"])
@pytest.mark.parametrize("shape", [(0, 5, 8), (2, 0, 8), (2, 5, 0)], ids=["B=0", "N=0", "D=0"])
def test_empty_inputs(request, gen, backend, shape):
    """Empty batch, sequence or feature dim: shapes as for any other input, zero-sized gradients, no error."""
    if backend == "ext":
        request.getfixturevalue("require_ext")
    x = randn(gen, *shape, requires_grad=True)
    mask = _mask(gen, *shape[:2])
    rows = masked_gather(x, mask, backend=backend)
    assert rows.shape == (int(mask.sum()), shape[2])
    (grad,) = torch.autograd.grad(rows.sum(), x)
    assert grad.shape == x.shape
    out = masked_scatter(rows.detach(), mask, torch.zeros(shape, device=DEVICE), backend=backend)
    assert out.shape == shape


def test_non_contiguous_inputs(gen):
    base = randn(gen, N, B, 2 * D, requires_grad=True)
    x = base.transpose(0, 1)[..., ::2]  # [B, N, D] with odd strides
    assert not x.is_contiguous()
    mask = _mask(gen, B, N)
    rows = masked_gather(x, mask, backend="triton")
    assert torch.equal(rows, x.detach()[mask])
    rows_nc = randn(gen, D, int(mask.sum())).T  # rows given transposed
    out = randn(gen, N, B, D).transpose(0, 1)
    new = masked_scatter(rows_nc, mask, out, backend="triton")
    assert torch.equal(new, reference.masked_scatter(rows_nc, mask, out))
    grad_rows = randn(gen, *rows.shape)
    (g,) = torch.autograd.grad(rows, base, grad_rows)
    (e,) = torch.autograd.grad(x[mask], base, grad_rows)
    assert torch.equal(g, e)


def test_double_backward_through_triton_ops(gen):
    """The backward of each op is built from the ops themselves, so a second derivative exists and is right."""
    x = randn(gen, B, N, D, requires_grad=True)
    mask = _mask(gen, B, N)
    weight = randn(gen, int(mask.sum()), D, requires_grad=True)

    def loss(gather):
        rows = gather(x, mask)
        (gx,) = torch.autograd.grad((rows * weight).sum(), x, create_graph=True)
        return (gx * gx).sum()

    got = torch.autograd.grad(loss(lambda a, m: masked_gather(a, m, backend="triton")), weight)[0]
    expected = torch.autograd.grad(loss(lambda a, m: a[m]), weight)[0]
    close(got, expected, torch.float32)


def test_argument_errors(gen):
    x = randn(gen, B, N, D)
    mask = _mask(gen, B, N)
    with pytest.raises(TypeError, match="mask must be a bool tensor"):
        masked_gather(x, mask.float())
    with pytest.raises(ShapeError, match=r"mask must be \[3, 13\]"):
        masked_gather(x, mask[:, :-1])
    rows = randn(gen, int(mask.sum()) + 1, D)
    with pytest.raises(ShapeError, match="mask selects"):
        masked_scatter(rows, mask, x)
    with pytest.raises(ShapeError, match="rows must be"):
        masked_scatter(randn(gen, 2, D + 1), mask, x)
    with pytest.raises(TypeError, match="share a dtype"):
        masked_scatter(rows[:-1].double(), mask, x)


def test_ext_backend_unavailable_is_clear(gen, monkeypatch):
    import sys
    import types

    fake = types.SimpleNamespace(available=lambda: False, unavailable_reason=lambda: "no compiler at build time")
    monkeypatch.setitem(sys.modules, "kdforge._ext", fake)
    x = randn(gen, B, N, D)
    mask = _mask(gen, B, N)
    with pytest.raises(BackendUnavailable, match=r"kdforge\._C is not built: no compiler at build time\. Build it with"):
        masked_gather(x, mask, backend="ext")
    with pytest.raises(BackendUnavailable, match="pip install --no-build-isolation -e ."):
        masked_scatter(x[mask], mask, x, backend="ext")


def test_opcheck_custom_ops(gen):
    x = randn(gen, 2, 5, 7, requires_grad=True)
    mask = _mask(gen, 2, 5, p=0.5)
    mask[0, 0] = True
    rows = randn(gen, int(mask.sum()), 7, requires_grad=True)
    # The gather's output size depends on the data; the dynamic-shape AOT test needs static sizes, so it is left out.
    torch.library.opcheck(
        torch.ops.kdforge_triton.masked_gather,
        (x, mask),
        test_utils=("test_schema", "test_autograd_registration", "test_faketensor"),
    )
    torch.library.opcheck(torch.ops.kdforge_triton.masked_merge, (rows, mask, x, [2, 5, 7], torch.float32))
    torch.library.opcheck(torch.ops.kdforge_triton.masked_merge, (None, mask, x, [2, 5, 7], torch.float32))


def test_torch_compile_fullgraph(gen):
    """torch.compile(fullgraph=True) traces gather -> scale -> scatter (a data-dependent row count) and its
    backward through the Triton custom ops, with the eager results."""
    x = randn(gen, 2, 7, 16, requires_grad=True)
    mask = _mask(gen, 2, 7, p=0.5)

    def fn(x, mask):
        return masked_scatter(masked_gather(x, mask, backend="triton") * 2, mask, x, backend="triton")

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    grad_out = randn(gen, 2, 7, 16)
    got = compiled(x, mask)
    expected = fn(x, mask)
    assert torch.equal(got, expected)  # the same copies and doubling as eager: bit-exact
    assert torch.equal(torch.autograd.grad(got, x, grad_out)[0], torch.autograd.grad(expected, x, grad_out)[0])


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_large(gen, dtype):
    x = randn(gen, 64, 257, 768, dtype=dtype, requires_grad=True)
    mask = _mask(gen, 64, 257, p=0.5)
    rows = masked_gather(x, mask, backend="triton")
    assert torch.equal(rows, x.detach()[mask])
    new = masked_scatter(rows.detach() * 2, mask, x.detach(), backend="triton")
    assert torch.equal(new, reference.masked_scatter(rows.detach() * 2, mask, x.detach()))


@pytest.mark.parametrize("p", [0.0, 0.4, 1.0], ids=["none", "some", "all"])
def test_gather_by_host_index_equals_the_masked_gather(gen, p):
    """The engine's path: the rows' flat positions made on the host with the mask (no count on the device)."""
    from kdforge.masking import draw_on_host

    x = randn(gen, B, N, D, requires_grad=True)
    mask = _mask(gen, B, N, p=p)
    index = torch.nonzero(mask.reshape(-1).cpu()).squeeze(1).to(DEVICE)
    rows = masked_gather(x, mask, index=index)
    assert torch.equal(rows, reference.masked_gather(x.detach(), mask))
    grad_rows = randn(gen, *rows.shape)
    (grad,) = torch.autograd.grad(rows, x, grad_rows)
    (expected,) = torch.autograd.grad(reference.masked_gather(x, mask), x, grad_rows)
    assert torch.equal(grad, expected)
    with pytest.raises(ShapeError, match="index must be a LongTensor"):
        masked_gather(x, mask, index=index.int())

    class Half:  # a masker: every other patch of every image
        def __call__(self, b, grid, generator):
            return (torch.arange(grid[0] * grid[1]) % 2 == 0).expand(b, -1).clone()

    drawn, host_index = draw_on_host(Half(), 2, (2, 3), seed=0, device=x.device)
    assert drawn.device == x.device and host_index.tolist() == [0, 2, 4, 6, 8, 10]
