"""Row gather / scatter by a boolean mask: pure data movement, one read and one write per element.

gather:  rows[p] = x[r_p]                where r_0 < r_1 < ... are the flat rows with mask true (row-major order)
merge:   new[r]  = rows[pos[r]] if mask[r] else out[r],   pos = cumsum(mask) - 1

The merge writes every row of ``new`` exactly once and reads ``out`` only where the mask is false, so
masked_scatter costs one pass instead of clone + index_put (two passes over ``out``). Its backward passes reuse
the same kernels: d rows = gather(d new), d out = merge(rows=None -> zeros, out=d new); the gather's backward is
merge(rows=d rows, out=None -> zeros).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdforge.kernels._common import INTERPRET, autotuned, next_pow2


@triton.jit
def _gather_rows_kernel(
    X,
    IDX,
    OUT,
    n_rows,
    D,
    x_stride_r,
    x_stride_d,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < n_rows
    ok = r_ok[:, None] & (c < D)[None, :]
    src = tl.load(IDX + r, mask=r_ok, other=0).to(tl.int64)
    vals = tl.load(X + src[:, None] * x_stride_r + c[None, :] * x_stride_d, mask=ok)
    tl.store(OUT + r.to(tl.int64)[:, None] * D + c[None, :], vals, mask=ok)


@triton.jit
def _merge_rows_kernel(
    ROWS,
    MASK,
    POS,
    OUT,
    NEW,
    n_rows,
    D,
    rows_stride_r,
    rows_stride_d,
    out_stride_r,
    out_stride_d,
    HAS_ROWS: tl.constexpr,
    HAS_OUT: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_r = tl.program_id(0)
    pid_d = tl.program_id(1)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    c = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    r_ok = r < n_rows
    c_ok = (c < D)[None, :]
    m8 = tl.load(MASK + r, mask=r_ok, other=0)
    picked = m8 != 0
    r64 = r.to(tl.int64)
    vals = tl.zeros((BLOCK_R, BLOCK_D), dtype=NEW.dtype.element_ty)
    if HAS_ROWS:
        p = tl.load(POS + r, mask=r_ok & picked, other=0).to(tl.int64)
        from_rows = tl.load(
            ROWS + p[:, None] * rows_stride_r + c[None, :] * rows_stride_d, mask=(r_ok & picked)[:, None] & c_ok
        )
        vals = tl.where(picked[:, None], from_rows, vals)
    if HAS_OUT:
        keep = r_ok & (m8 == 0)
        from_out = tl.load(OUT + r64[:, None] * out_stride_r + c[None, :] * out_stride_d, mask=keep[:, None] & c_ok)
        vals = tl.where(picked[:, None], vals, from_out)
    tl.store(NEW + r64[:, None] * D + c[None, :], vals, mask=r_ok[:, None] & c_ok)


def _prune(configs, named_args, **kwargs):
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    kept = [c for c in configs if c.kwargs["BLOCK_R"] * block_d <= 16384]
    return kept or configs[:1]


_CONFIGS = [triton.Config({"BLOCK_R": br}, num_warps=nw) for br in (4, 8, 16, 32) for nw in (4, 8)]
_gather_tuned = autotuned(
    _gather_rows_kernel, _CONFIGS, key=["D"], prune_configs_by={"early_config_prune": _prune}
)
_merge_tuned = autotuned(
    _merge_rows_kernel, _CONFIGS, key=["D", "HAS_ROWS", "HAS_OUT"], prune_configs_by={"early_config_prune": _prune}
)


def _block_d(dim: int) -> int:
    # Columns per program: whole rows up to 1024 wide (one 128-bit access per thread and row), tiles beyond.
    return min(next_pow2(dim, 16), 1024)


def _launch(plain, tuned, n_rows: int, dim: int, args: tuple, meta: dict) -> None:
    block_d = _block_d(dim)
    if tuned is None or INTERPRET:
        block_r = max(1, min(32, 4096 // block_d))
        plain[(triton.cdiv(n_rows, block_r), triton.cdiv(dim, block_d))](*args, **meta, BLOCK_R=block_r, BLOCK_D=block_d)
    else:
        grid = lambda m: (triton.cdiv(n_rows, m["BLOCK_R"]), triton.cdiv(dim, block_d))  # noqa: E731
        tuned[grid](*args, **meta, BLOCK_D=block_d)


def gather_rows(x2d: torch.Tensor, flat_mask: torch.Tensor) -> torch.Tensor:
    """x2d: Tensor[R, D] (any strides), flat_mask: BoolTensor[R] -> contiguous Tensor[M, D] of the true rows."""
    idx = flat_mask.nonzero().squeeze(1)  # ascending: row-major order; one host sync to learn M
    n_sel, dim = idx.numel(), x2d.shape[1]
    out = torch.empty((n_sel, dim), dtype=x2d.dtype, device=x2d.device)
    if n_sel > 0 and dim > 0:
        _launch(_gather_rows_kernel, _gather_tuned, n_sel, dim, (x2d, idx, out, n_sel, dim, x2d.stride(0), x2d.stride(1)), {})
    return out


def merge_rows(
    rows: torch.Tensor | None,
    flat_mask: torch.Tensor,
    out2d: torch.Tensor | None,
    *,
    dim: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """new[r] = rows[pos(r)] where flat_mask[r] else out2d[r]; ``None`` stands for zeros. Returns Tensor[R, D].

    rows: Tensor[M, D] with M = flat_mask.sum(); out2d: Tensor[R, D]; either may have any strides.
    """
    n_rows = flat_mask.numel()
    device = flat_mask.device
    new = torch.empty((n_rows, dim), dtype=dtype, device=device)
    if n_rows == 0 or dim == 0:
        return new
    mask_u8 = flat_mask.contiguous().view(torch.uint8)
    pos = (torch.cumsum(flat_mask, 0, dtype=torch.int32) - 1) if rows is not None else mask_u8
    dummy = new
    args = (
        rows if rows is not None else dummy,
        mask_u8,
        pos,
        out2d if out2d is not None else dummy,
        new,
        n_rows,
        dim,
        rows.stride(0) if rows is not None else 0,
        rows.stride(1) if rows is not None else 0,
        out2d.stride(0) if out2d is not None else 0,
        out2d.stride(1) if out2d is not None else 0,
    )
    meta = {"HAS_ROWS": rows is not None, "HAS_OUT": out2d is not None}
    _launch(_merge_rows_kernel, _merge_tuned, n_rows, dim, args, meta)
    return new
