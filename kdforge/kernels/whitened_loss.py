"""Fused whitened smooth-L1 / MSE loss with its student gradient, one pass over the selected rows.

Derivation (papers/004 eq. 1, FD; Proteus' feature and patch losses are the mse / whiten=False case). For one row
with student s and teacher t in R^D:

    mu = mean(t),  var = mean((t - mu)^2)            (biased, as torch.layer_norm)
    t^ = (t - mu) / sqrt(var + eps)                   (whiten=True; t^ = t otherwise)
    d  = s - t^
    smooth_l1:  l(d) = d^2 / (2 beta)  if |d| < beta,  |d| - beta / 2  otherwise   (torch's definition)
                l'(d) = d / beta        if |d| < beta,  sign(d)          otherwise   (beta = 0: L1, l' = sign)
    mse:        l(d) = d^2,   l'(d) = 2 d
    L = c * sum_rows sum_j l(d_j),   c = 1 / (M D) for "mean" (M selected rows), 1 for "sum" / "none".

The teacher is a constant (stop-gradient target), so the LayerNorm Jacobian never enters: dL/ds_j = c * l'(d_j),
which depends only on the row already in registers. The kernel therefore writes the loss of each row and
dL/ds in the same pass; backward only multiplies dL/ds by grad_output (a scalar, or one value per row for
"none"). Everything is accumulated in fp32 whatever the input dtype; the gradient is stored in the student's dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdforge.kernels._common import INTERPRET, autotuned, next_pow2

LOSS_SMOOTH_L1, LOSS_MSE, LOSS_L1 = 0, 1, 2
# The whole row lives in registers (mean, variance and loss need all of it); beyond this D another design
# (two passes over D chunks) would be needed.
MAX_D = 16384


@triton.jit
def _whitened_loss_kernel(
    S,
    T,
    IDX,
    DS,
    ROW_LOSS,
    n_rows,
    D,
    s_stride_r,
    s_stride_d,
    t_stride_r,
    t_stride_d,
    ds_stride_r,
    grad_scale,
    beta,
    eps,
    HAS_INDEX: tl.constexpr,
    WHITEN: tl.constexpr,
    LOSS: tl.constexpr,
    NEED_GRAD: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    r = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    r_ok = r < n_rows
    if HAS_INDEX:
        # Rows are read where they lie: no gathered copy of student or teacher is ever made.
        rows = tl.load(IDX + r, mask=r_ok, other=0).to(tl.int64)
    else:
        rows = r.to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    c_ok = cols < D
    ok = r_ok[:, None] & c_ok[None, :]

    t = tl.load(T + rows[:, None] * t_stride_r + cols[None, :] * t_stride_d, mask=ok, other=0.0).to(tl.float32)
    if WHITEN:
        mean = tl.sum(t, axis=1) / D
        centred = tl.where(ok, t - mean[:, None], 0.0)
        var = tl.sum(centred * centred, axis=1) / D
        t = centred * (1.0 / tl.sqrt(var + eps))[:, None]
    s = tl.load(S + rows[:, None] * s_stride_r + cols[None, :] * s_stride_d, mask=ok, other=0.0).to(tl.float32)
    d = s - t  # 0 in padded lanes, whose loss and gradient are then 0 too
    if LOSS == 0:  # smooth-L1
        ad = tl.abs(d)
        quad = ad < beta
        elem = tl.where(quad, 0.5 * d * d / beta, ad - 0.5 * beta)
        grad = tl.where(quad, d / beta, tl.where(d > 0, 1.0, -1.0))
    elif LOSS == 1:  # mse
        elem = d * d
        grad = 2.0 * d
    else:  # L1 (smooth-L1 with beta == 0, as torch)
        elem = tl.abs(d)
        grad = tl.where(d > 0, 1.0, tl.where(d < 0, -1.0, 0.0))
    tl.store(ROW_LOSS + r, tl.sum(elem, axis=1), mask=r_ok)
    if NEED_GRAD:
        g = (grad * grad_scale).to(DS.dtype.element_ty)
        tl.store(DS + rows[:, None] * ds_stride_r + cols[None, :], g, mask=ok)


def _prune(configs, named_args, **kwargs):
    # Register tile of BLOCK_R rows x BLOCK_D columns: 1K..16K fp32 values per program (narrow rows: as many rows
    # as the largest BLOCK_R); 16 warps only for rows of 4K+ elements.
    block_d = kwargs.get("BLOCK_D", named_args.get("BLOCK_D"))
    most_rows = max(c.kwargs["BLOCK_R"] for c in configs)
    kept = [
        c
        for c in configs
        if c.kwargs["BLOCK_R"] * block_d <= 16384
        and (c.kwargs["BLOCK_R"] * block_d >= 1024 or c.kwargs["BLOCK_R"] == most_rows)
        and (c.num_warps < 16 or block_d >= 4096)
    ]
    return kept or [min(configs, key=lambda c: c.kwargs["BLOCK_R"])]


_CONFIGS = [triton.Config({"BLOCK_R": br}, num_warps=nw) for br in (1, 2, 4, 8, 16) for nw in (4, 8)] + [
    # Rows of 8K-16K elements: 16 warps keep the row in registers without spilling (sm_90 build, BLOCK_R 1-2).
    triton.Config({"BLOCK_R": br}, num_warps=16)
    for br in (1, 2)
]
_whitened_loss_tuned = autotuned(
    _whitened_loss_kernel,
    _CONFIGS,
    key=["D", "HAS_INDEX", "WHITEN", "LOSS", "NEED_GRAD"],
    prune_configs_by={"early_config_prune": _prune},
)


def whitened_loss_fwd(
    student: torch.Tensor,
    teacher: torch.Tensor,
    index: torch.Tensor | None,
    *,
    loss: str,
    beta: float,
    whiten: bool,
    eps: float,
    reduction: str,
    need_grad: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and dLoss/dstudent for student, teacher: Tensor[R, D] (any strides), index: LongTensor[M] or None.

    Returns (loss, grad): loss is a float32 scalar ("mean", "sum") or Tensor[M] / Tensor[R] of per-row sums
    ("none"); grad is Tensor[R, D] in the student's dtype, zero on unselected rows, already multiplied by the
    "mean" factor 1 / (M D), or an empty tensor when ``need_grad`` is False.
    """
    n_total, dim = student.shape
    if dim > MAX_D:
        raise ValueError(f"whitened_loss triton kernel holds a row in registers; D={dim} > {MAX_D}")
    n_sel = index.numel() if index is not None else n_total
    code = LOSS_MSE if loss == "mse" else (LOSS_L1 if beta == 0 else LOSS_SMOOTH_L1)
    grad_scale = 1.0 / (n_sel * dim) if (reduction == "mean" and n_sel > 0) else 1.0
    row_loss = torch.empty(n_sel, dtype=torch.float32, device=student.device)
    if need_grad:
        # Unselected rows get no loss, hence a zero gradient; selected rows are overwritten by the kernel.
        alloc = torch.zeros if index is not None else torch.empty
        grad = alloc((n_total, dim), dtype=student.dtype, device=student.device)
    else:
        grad = torch.empty(0, dtype=student.dtype, device=student.device)
    if n_sel > 0:
        idx = index if index is not None else row_loss  # dummy pointer when HAS_INDEX is False
        args = (
            student,
            teacher,
            idx,
            grad,
            row_loss,
            n_sel,
            dim,
            student.stride(0),
            student.stride(1),
            teacher.stride(0),
            teacher.stride(1),
            grad.stride(0) if need_grad else 0,
            grad_scale,
            float(beta),
            float(eps),
        )
        meta = dict(HAS_INDEX=index is not None, WHITEN=bool(whiten), LOSS=code, NEED_GRAD=bool(need_grad))
        block_d = next_pow2(dim, 16)
        if _whitened_loss_tuned is None or INTERPRET:
            block_r = max(1, min(16, 4096 // block_d))
            grid = (triton.cdiv(n_sel, block_r),)
            _whitened_loss_kernel[grid](*args, **meta, BLOCK_R=block_r, BLOCK_D=block_d)
        else:
            grid = lambda m: (triton.cdiv(n_sel, m["BLOCK_R"]),)  # noqa: E731 - triton's grid idiom
            _whitened_loss_tuned[grid](*args, **meta, BLOCK_D=block_d)
    if reduction == "none":
        return row_loss, grad
    total = row_loss.sum()
    if reduction == "mean":
        total = total / (n_sel * dim) if n_sel > 0 else total  # empty selection: 0, not NaN
    return total, grad
