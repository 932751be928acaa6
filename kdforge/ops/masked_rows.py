"""kdforge.ops.masked_gather / masked_scatter: checks, dispatch, autograd (kernels in kdforge/kernels/masked_rows.py).

Triton backend: two custom ops, ``kdforge_triton::masked_gather`` (x, mask) -> rows and
``kdforge_triton::masked_merge`` (rows?, mask, out?, shape, dtype) -> new, where a missing rows/out stands for
zeros. Their backwards are each other: d x = merge(d rows, mask, zeros); d rows = gather(d new, mask),
d out = merge(zeros, mask, d new). Both have fake implementations (the gather's row count is data-dependent).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdforge.errors import ShapeError
from kdforge.ops import _checks, _dispatch, reference


@torch.library.custom_op("kdforge_triton::masked_gather", mutates_args=())
def _gather_triton(x: Tensor, mask: Tensor) -> Tensor:
    """x: Tensor[..., D], mask: BoolTensor[...] -> Tensor[M, D]."""
    from kdforge.kernels._common import device_guard
    from kdforge.kernels.masked_rows import gather_rows

    dim = x.shape[-1]
    with device_guard(x):
        return gather_rows(x.reshape(mask.numel(), dim), mask.reshape(-1))  # explicit rows: D may be 0


@_gather_triton.register_fake
def _(x, mask):
    rows = torch.library.get_ctx().new_dynamic_size()
    return x.new_empty((rows, x.shape[-1]))


@torch.library.custom_op("kdforge_triton::masked_merge", mutates_args=())
def _merge_triton(
    rows: Optional[Tensor], mask: Tensor, out: Optional[Tensor], shape: list[int], dtype: torch.dtype
) -> Tensor:
    """new = out (zeros if None) with its masked rows replaced by rows (zeros if None); new: Tensor[shape]."""
    from kdforge.kernels._common import device_guard
    from kdforge.kernels.masked_rows import merge_rows

    dim = shape[-1]
    with device_guard(mask):
        new = merge_rows(
            rows,
            mask.reshape(-1),
            out.reshape(mask.numel(), dim) if out is not None else None,
            dim=dim,
            dtype=dtype,
        )
    return new.reshape(shape)


@_merge_triton.register_fake
def _(rows, mask, out, shape, dtype):
    return mask.new_empty(shape, dtype=dtype)


def _gather_setup(ctx, inputs, output):
    x, mask = inputs
    ctx.x_shape = list(x.shape)
    ctx.x_dtype = x.dtype
    ctx.save_for_backward(mask)


def _gather_backward(ctx, grad_rows):
    (mask,) = ctx.saved_tensors
    grad_x = torch.ops.kdforge_triton.masked_merge(grad_rows, mask, None, ctx.x_shape, ctx.x_dtype)
    return grad_x, None


def _merge_setup(ctx, inputs, output):
    rows, mask, out, shape, dtype = inputs
    ctx.has_rows = rows is not None
    ctx.has_out = out is not None
    ctx.shape = list(shape)
    ctx.rows_dtype = rows.dtype if rows is not None else dtype
    ctx.out_dtype = out.dtype if out is not None else dtype
    ctx.save_for_backward(mask)


def _merge_backward(ctx, grad_new):
    (mask,) = ctx.saved_tensors
    grad_rows = grad_out = None
    if ctx.has_rows and ctx.needs_input_grad[0]:
        grad_rows = torch.ops.kdforge_triton.masked_gather(grad_new, mask).to(ctx.rows_dtype)
    if ctx.has_out and ctx.needs_input_grad[2]:
        # The replaced rows of out do not reach the result: their gradient is zero.
        grad_out = torch.ops.kdforge_triton.masked_merge(None, mask, grad_new, ctx.shape, ctx.out_dtype)
    return grad_rows, None, grad_out, None, None


_gather_triton.register_autograd(_gather_backward, setup_context=_gather_setup)
_merge_triton.register_autograd(_merge_backward, setup_context=_merge_setup)


def masked_gather(x: Tensor, mask: Tensor, *, backend: str = "auto", index: Tensor | None = None) -> Tensor:
    """The rows of x: Tensor[B, N, D] where mask: BoolTensor[B, N] is true, in row-major order -> Tensor[M, D].

    Any number of leading dims works (mask has x's shape without the last dim). Differentiable in x. M is
    data-dependent: the CUDA backends synchronise once to learn it, unless the caller passes ``index``, the flat
    positions of the true entries (``mask.reshape(-1).nonzero()``, LongTensor[M] on x's device, made on the host
    where the mask was drawn: :func:`kdforge.masking.draw_on_host`): then the rows are one index_select, with no
    synchronisation and a shape known in advance (a graph without breaks under torch.compile). ``backend``:
    "auto" | "reference" | "triton" | "ext" (not used with ``index``).
    """
    op = "masked_gather"
    _checks.tensor(op, "x", x)
    if x.dim() < 2:
        raise ShapeError(f"{op}: x must be [B, N, D] (any leading dims, then D), got shape {tuple(x.shape)}")
    mask = _checks.bool_mask(op, mask, tuple(x.shape[:-1]), "x")
    device = _checks.same_device(op, x=x, mask=mask)
    if index is not None:
        _checks.tensor(op, "index", index)
        if index.dim() != 1 or index.dtype != torch.long or index.device != x.device:
            raise ShapeError(f"{op}: index must be a LongTensor[M] on {x.device} (the flat positions of the mask's "
                             f"true entries), got {index.dtype} {tuple(index.shape)} on {index.device}")
        return x.reshape(-1, x.shape[-1]).index_select(0, index)
    chosen = _dispatch.resolve(op, backend, device)
    if chosen == "reference":
        return reference.masked_gather(x, mask)
    if chosen == "ext":
        return _dispatch.ext_for_call().masked_gather(x, mask)
    return torch.ops.kdforge_triton.masked_gather(x, mask)


def masked_scatter(rows: Tensor, mask: Tensor, out: Tensor, *, backend: str = "auto") -> Tensor:
    """A new tensor equal to out: Tensor[B, N, D] with the rows where mask: BoolTensor[B, N] is true replaced by
    rows: Tensor[M, D], in row-major order (the inverse of :func:`masked_gather`). ``out`` is not modified.

    M must equal mask.sum() (checked, one synchronisation, except under torch.compile). Differentiable in rows
    and out. ``backend``: "auto" | "reference" | "triton" | "ext".
    """
    op = "masked_scatter"
    _checks.tensor(op, "rows", rows)
    _checks.tensor(op, "out", out)
    if out.dim() < 2:
        raise ShapeError(f"{op}: out must be [B, N, D] (any leading dims, then D), got shape {tuple(out.shape)}")
    if rows.dim() != 2 or rows.shape[1] != out.shape[-1]:
        raise ShapeError(
            f"{op}: rows must be [M, D] with D = out.shape[-1] = {out.shape[-1]}, got shape {tuple(rows.shape)}"
        )
    if rows.dtype != out.dtype:
        raise TypeError(f"{op}: rows ({rows.dtype}) and out ({out.dtype}) must share a dtype; cast rows with .to(out.dtype)")
    mask = _checks.bool_mask(op, mask, tuple(out.shape[:-1]), "out")
    device = _checks.same_device(op, rows=rows, mask=mask, out=out)
    if not _checks.is_compiling():
        count = int(mask.sum())
        if count != rows.shape[0]:
            raise ShapeError(f"{op}: mask selects {count} rows but rows has {rows.shape[0]}; they must match")
    chosen = _dispatch.resolve(op, backend, device)
    if chosen == "reference":
        return reference.masked_scatter(rows, mask, out)
    if chosen == "ext":
        return _dispatch.ext_for_call().masked_scatter(rows, mask, out)
    return torch.ops.kdforge_triton.masked_merge(rows, mask, out, list(out.shape), out.dtype)
