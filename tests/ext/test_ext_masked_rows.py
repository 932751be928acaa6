"""kdforge._C masked_gather / masked_scatter (CPU kernels): values against boolean indexing, gradients, edge
cases, bad input and opcheck."""

from __future__ import annotations

import pytest
import torch

from kdforge import _ext

B, N, D = 3, 37, 29  # irregular


def _mask(gen, p=0.4, shape=(B, N)):
    return torch.rand(shape, generator=gen) < p


DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.uint8, torch.bool]


def _data(gen, shape, dtype):
    x = torch.randn(shape, generator=gen) * 50
    return x > 0 if dtype == torch.bool else x.to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_matches_boolean_indexing(gen, dtype):
    x, mask = _data(gen, (B, N, D), dtype), _mask(gen)
    out = _ext.masked_gather(x, mask)
    assert out.dtype == dtype and out.shape == (int(mask.sum()), D)
    assert torch.equal(out, x[mask])  # a copy: exact


@pytest.mark.parametrize("dtype", DTYPES)
def test_scatter_matches_index_put_and_leaves_out_alone(gen, dtype):
    out, mask = _data(gen, (B, N, D), dtype), _mask(gen)
    rows = _data(gen, (int(mask.sum()), D), dtype)
    before = out.clone()
    result = _ext.masked_scatter(rows, mask, out)
    expected = out.clone()
    expected[mask] = rows
    assert torch.equal(result, expected)
    assert torch.equal(out, before)  # a new tensor
    assert result.data_ptr() != out.data_ptr()


@pytest.mark.parametrize("fill", [False, True])
def test_all_false_and_all_true_masks(gen, fill):
    x = torch.randn(B, N, D, generator=gen, requires_grad=True)
    mask = torch.full((B, N), fill)
    rows = _ext.masked_gather(x, mask)
    assert rows.shape == ((B * N, D) if fill else (0, D))
    assert torch.equal(rows, x.detach()[mask])
    rows.sum().backward()
    assert torch.equal(x.grad, torch.full_like(x, 1.0 if fill else 0.0))
    out = torch.randn(B, N, D, generator=gen)
    new = torch.randn(int(mask.sum()), D, generator=gen)
    assert torch.equal(_ext.masked_scatter(new, mask, out), new.reshape(B, N, D) if fill else out)


def test_non_contiguous_inputs(gen):
    """A [B, N, D] slice with a unit stride on D is read in place; other layouts are copied first."""
    base = torch.randn(B, N + 1, D, generator=gen)
    x = base[:, 1:]  # drops a CLS token: strides ((N+1) D, D, 1)
    xt = torch.randn(B, D, N, generator=gen).transpose(1, 2)  # stride 1 is not on D
    mask = _mask(gen)
    for t in (x, xt):
        assert not t.is_contiguous()
        assert torch.equal(_ext.masked_gather(t, mask), t[mask])
        rows = torch.randn(int(mask.sum()), D, generator=gen)
        expected = t.clone()
        expected[mask] = rows
        assert torch.equal(_ext.masked_scatter(rows, mask, t), expected)
    rows_t = torch.randn(D, int(mask.sum()), generator=gen).T  # non-contiguous rows
    expected = x.clone()
    expected[mask] = rows_t
    assert torch.equal(_ext.masked_scatter(rows_t, mask, x), expected)


def test_leading_dims_other_than_two(gen):
    """[..., D] with any leading shape: the mask has x.shape[:-1] (flattened row-major order)."""
    x = torch.randn(2, 3, 5, 7, generator=gen)
    mask = torch.rand(2, 3, 5, generator=gen) < 0.5
    assert torch.equal(_ext.masked_gather(x, mask), x[mask])
    x2, m2 = torch.randn(11, 7, generator=gen), torch.rand(11, generator=gen) < 0.5
    assert torch.equal(_ext.masked_gather(x2, m2), x2[m2])
    rows = torch.randn(int(mask.sum()), 7, generator=gen)
    expected = x.clone()
    expected[mask] = rows
    assert torch.equal(_ext.masked_scatter(rows, mask, x), expected)


def test_gradients_with_grad_output_not_one(gen):
    x = torch.randn(B, N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    out = torch.randn(B, N, D, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = _mask(gen)
    rows = torch.randn(int(mask.sum()), D, generator=gen, dtype=torch.float64, requires_grad=True)
    g_rows = torch.randn(int(mask.sum()), D, generator=gen, dtype=torch.float64)
    (gx,) = torch.autograd.grad(_ext.masked_gather(x, mask), x, g_rows)
    expected = torch.zeros_like(x)
    expected[mask] = g_rows
    assert torch.equal(gx, expected)

    g_out = torch.randn(B, N, D, generator=gen, dtype=torch.float64)
    grad_rows, grad_out = torch.autograd.grad(_ext.masked_scatter(rows, mask, out), (rows, out), g_out)
    assert torch.equal(grad_rows, g_out[mask])
    expected_out = g_out.clone()
    expected_out[mask] = 0
    assert torch.equal(grad_out, expected_out)


def test_gradcheck_and_double_backward(gen):
    x = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    out = torch.randn(2, 5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 1, 0, 1]], dtype=torch.bool)
    rows = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: _ext.masked_gather(t, mask), (x,))
    assert torch.autograd.gradgradcheck(lambda t: _ext.masked_gather(t, mask), (x,))
    assert torch.autograd.gradcheck(lambda r, o: _ext.masked_scatter(r, mask, o), (rows, out))
    assert torch.autograd.gradgradcheck(lambda r, o: _ext.masked_scatter(r, mask, o), (rows, out))


def test_opcheck(gen):
    x = torch.randn(2, 7, 5, generator=gen, requires_grad=True)
    mask = torch.rand(2, 7, generator=gen) < 0.5
    rows = torch.randn(int(mask.sum()), 5, generator=gen, requires_grad=True)
    out = torch.randn(2, 7, 5, generator=gen, requires_grad=True)
    torch.library.opcheck(torch.ops.kdforge.masked_gather.default, (x, mask))
    torch.library.opcheck(torch.ops.kdforge.masked_scatter.default, (rows, mask, out))


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: torch.ops.kdforge.masked_gather(torch.randn(2, 3, 4), torch.ones(2, 3)),
         "masked_gather: mask must be a bool tensor [B, N], got Float"),
        (lambda: torch.ops.kdforge.masked_gather(torch.randn(2, 3, 4), torch.ones(3, 2, dtype=torch.bool)),
         "masked_gather: mask must be [B, N] = [2, 3] to match the rows' tensor, got [3, 2]"),
        (lambda: torch.ops.kdforge.masked_gather(torch.randn(2, 3), torch.ones(2, 3, dtype=torch.bool)),
         "masked_gather: x must be [B, N, D], got [2, 3]"),
        (lambda: torch.ops.kdforge.masked_scatter(torch.randn(2, 4), torch.ones(2, 3, dtype=torch.bool),
                                                  torch.randn(2, 3, 4)),
         "masked_scatter: rows must have one row per true mask entry (mask has 6 true), got 2 rows"),
        (lambda: torch.ops.kdforge.masked_scatter(torch.randn(6, 5), torch.ones(2, 3, dtype=torch.bool),
                                                  torch.randn(2, 3, 4)),
         "masked_scatter: rows must be [M, D] with D = 4 like out, got [6, 5]"),
        (lambda: torch.ops.kdforge.masked_scatter(torch.randn(6, 4, dtype=torch.float64),
                                                  torch.ones(2, 3, dtype=torch.bool), torch.randn(2, 3, 4)),
         "masked_scatter: rows must have out's dtype Float, got Double"),
    ],
)
def test_bad_input_messages(call, message):
    with pytest.raises(RuntimeError) as err:
        call()
    assert message in str(err.value)
