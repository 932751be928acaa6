"""Flash-style attention with an additive bias and its gradient (forward, backward for q, k, v and bias).

Forward, per query block (online softmax; never materialises the [N, N] scores):

    S = scale * Q K^T + bias,   P = softmax_rows(S),   O = P V
    running max m, running sum l: for each key block,  m' = max(m, rowmax(S_blk)),
    l' = l * exp(m - m') + rowsum(exp(S_blk - m')),  acc' = acc * exp(m - m') + exp(S_blk - m') V_blk
    O = acc / l,  and the row log-sum-exp  lse = m + log(l)  is kept for the backward pass.
    A row whose keys are all masked (-inf bias) has l = 0: O = 0 and lse = +inf, so it gets no gradient either.

Scores are handled in base 2 (S * log2(e), exp2) as the hardware's exp2 is the fast path; lse is stored in that
unit.

Backward (FlashAttention-2): with P recomputed from lse,  dV = P^T dO,  dP = dO V^T,
    dS = P o (dP - delta),  delta = rowsum(dP o P) = rowsum(dO o O)   (softmax Jacobian, o = elementwise)
    dQ = scale * dS K,   dK = scale * dS^T Q,   dbias = dS summed over the dimensions the bias was broadcast on.
One program per key block accumulates dK, dV (and writes dbias, each (query, key) pair is visited exactly once
there: plain stores for a full [B, H, N, N] bias, fp32 atomic adds where it is broadcast, e.g. a relative position
bias [H, N, N] shared by the batch); one program per query block accumulates dQ.
All accumulation is fp32; P and dS are cast to the input dtype only as tl.dot operands (as FlashAttention does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdforge.kernels._common import INTERPRET, dot_precision, next_pow2, upcast_dot

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 128


@triton.jit
def _load_tile(base, offs_r, offs_c, stride_r, stride_c, r_ok, c_ok, UPCAST: tl.constexpr):
    """Tile[rows, cols] at base + r * stride_r + c * stride_c, zero where r_ok or c_ok is false; fp32 if UPCAST."""
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    tile = tl.load(ptrs, mask=r_ok[:, None] & c_ok[None, :], other=0.0)
    if UPCAST:
        tile = tile.to(tl.float32)
    return tile


@triton.jit
def _score_tile(
    q, kt, bias_base, offs_m, offs_n, m_ok, n_ok, sbm, sbn, qk_scale, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr
):
    """Scores in base 2, Tensor[BLOCK_M, BLOCK_N] fp32: q kt * qk_scale (qk_scale = scale * log2(e)), plus the bias
    tile times log2(e) (0 outside m_ok x n_ok). q: [BLOCK_M, d], kt: [d, BLOCK_N]."""
    s = tl.dot(q, kt, input_precision=DOT_PREC) * qk_scale
    if HAS_BIAS:
        s += _load_tile(bias_base, offs_m, offs_n, sbm, sbn, m_ok, n_ok, True) * 1.4426950408889634  # fp32 bias
    return s


@triton.jit
def _probs_tile(
    q, k, lse, bias_base, offs_m, offs_n, m_ok, n_ok, sbm, sbn, qk_scale, HAS_BIAS: tl.constexpr, DOT_PREC: tl.constexpr
):
    """P recomputed from the forward's row log-sum-exp (base 2): exp2(S - lse), 0 outside m_ok x n_ok.
    k: [BLOCK_N, d]."""
    mn_ok = m_ok[:, None] & n_ok[None, :]
    s = _score_tile(q, tl.trans(k), bias_base, offs_m, offs_n, m_ok, n_ok, sbm, sbn, qk_scale, HAS_BIAS, DOT_PREC)
    return tl.where(mn_ok, tl.exp2(s - lse[:, None]), 0.0)


@triton.jit
def _softmax_grad(p, do, v, delta, DOT_PREC: tl.constexpr):
    """dS = P o (dO V^T - delta), fp32 [BLOCK_M, BLOCK_N]; v: [BLOCK_N, d], delta: [BLOCK_M] = rowsum(dO o O)."""
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    return p * (dp - delta[:, None])


@triton.jit
def _attn_fwd_kernel(
    Q, K, V, BIAS, O, LSE,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbm, sbn,
    H, N, D_HEAD, qk_scale,
    HAS_BIAS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D_HEAD
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, m_ok, d_ok, UPCAST)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    bias_base = BIAS + b * sbb + h * sbh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        kt = _load_tile(k_base, offs_d, offs_n, skd, skn, d_ok, n_ok, UPCAST)  # K^T tile [d, BLOCK_N]
        s = _score_tile(q, kt, bias_base, offs_m, offs_n, m_ok, n_ok, sbm, sbn, qk_scale, HAS_BIAS, DOT_PREC)
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row whose scores so far are all -inf (a bias mask) keeps a finite reference point: no NaN from inf-inf.
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_ref)
        p = tl.exp2(s - m_ref[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, offs_d, svn, svd, n_ok, d_ok, UPCAST)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
        m_i = m_new
    # l_i >= 1 unless every key of the row is masked (-inf): such a row attends to nothing, its output is 0, and
    # its lse is +inf so that the backward pass recomputes P = exp2(S - lse) = 0 for it (no gradient, no NaN).
    dead = l_i == 0.0
    out = acc / tl.where(dead, 1.0, l_i)[:, None]
    o_off = pid_bh.to(tl.int64) * N * D_HEAD + offs_m[:, None] * D_HEAD + offs_d[None, :]
    tl.store(O + o_off, out.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    lse = tl.where(dead, float("inf"), m_i + tl.log2(tl.where(dead, 1.0, l_i)))
    tl.store(LSE + pid_bh.to(tl.int64) * N + offs_m, lse, mask=m_ok)


@triton.jit
def _attn_bwd_delta_kernel(O, DO, DELTA, sdob, sdoh, sdon, sdod, H, N, D_HEAD, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_m < N)[:, None] & (offs_d < D_HEAD)[None, :]
    o = tl.load(O + pid_bh.to(tl.int64) * N * D_HEAD + offs_m[:, None] * D_HEAD + offs_d[None, :], mask=ok, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * N + offs_m, delta, mask=offs_m < N)


@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DK, DV, DBIAS,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbm, sbn,
    sdob, sdoh, sdon, sdod,
    sgb, sgh, sgm, sgn,
    H, N, D_HEAD, qk_scale, sm_scale,
    HAS_BIAS: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    DBIAS_ATOMIC: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < N
    d_ok = offs_d < D_HEAD
    kv_ok = n_ok[:, None] & d_ok[None, :]
    k = _load_tile(K + b * skb + h * skh, offs_n, offs_d, skn, skd, n_ok, d_ok, UPCAST)
    v = _load_tile(V + b * svb + h * svh, offs_n, offs_d, svn, svd, n_ok, d_ok, UPCAST)
    q_base = Q + b * sqb + h * sqh
    do_base = DO + b * sdob + h * sdoh
    bias_base = BIAS + b * sbb + h * sbh
    dbias_base = DBIAS + b * sgb + h * sgh
    row_base = pid_bh.to(tl.int64) * N

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for start_m in range(0, N, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_ok = offs_m < N
        q = _load_tile(q_base, offs_m, offs_d, sqn, sqd, m_ok, d_ok, UPCAST)
        do = _load_tile(do_base, offs_m, offs_d, sdon, sdod, m_ok, d_ok, UPCAST)
        lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
        mn_ok = m_ok[:, None] & n_ok[None, :]
        p = _probs_tile(q, k, lse, bias_base, offs_m, offs_n, m_ok, n_ok, sbm, sbn, qk_scale, HAS_BIAS, DOT_PREC)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
        ds = _softmax_grad(p, do, v, delta, DOT_PREC)
        if NEED_DBIAS:
            g_ptr = dbias_base + offs_m[:, None] * sgm + offs_n[None, :] * sgn
            if DBIAS_ATOMIC:
                tl.atomic_add(g_ptr, ds, mask=mn_ok, sem="relaxed")  # a pure sum: no ordering needed
            else:
                tl.store(g_ptr, ds.to(DBIAS.dtype.element_ty), mask=mn_ok)
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    out_off = pid_bh.to(tl.int64) * N * D_HEAD + offs_n[:, None] * D_HEAD + offs_d[None, :]
    tl.store(DK + out_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=kv_ok)
    tl.store(DV + out_off, dv.to(DV.dtype.element_ty), mask=kv_ok)


@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, BIAS, DO, LSE, DELTA, DQ,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sbb, sbh, sbm, sbn,
    sdob, sdoh, sdon, sdod,
    H, N, D_HEAD, qk_scale, sm_scale,
    HAS_BIAS: tl.constexpr,
    DOT_PREC: tl.constexpr,
    UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < N
    d_ok = offs_d < D_HEAD
    qd_ok = m_ok[:, None] & d_ok[None, :]
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, offs_d, sqn, sqd, m_ok, d_ok, UPCAST)
    do = _load_tile(DO + b * sdob + h * sdoh, offs_m, offs_d, sdon, sdod, m_ok, d_ok, UPCAST)
    row_base = pid_bh.to(tl.int64) * N
    lse = tl.load(LSE + row_base + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=m_ok, other=0.0)
    k_base = K + b * skb + h * skh
    v_base = V + b * svb + h * svh
    bias_base = BIAS + b * sbb + h * sbh

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for start_n in range(0, N, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        k = _load_tile(k_base, offs_n, offs_d, skn, skd, n_ok, d_ok, UPCAST)
        v = _load_tile(v_base, offs_n, offs_d, svn, svd, n_ok, d_ok, UPCAST)
        p = _probs_tile(q, k, lse, bias_base, offs_m, offs_n, m_ok, n_ok, sbm, sbn, qk_scale, HAS_BIAS, DOT_PREC)
        ds = _softmax_grad(p, do, v, delta, DOT_PREC)
        dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    tl.store(DQ + pid_bh.to(tl.int64) * N * D_HEAD + offs_m[:, None] * D_HEAD + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty), mask=qd_ok)


def _fwd_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
        for bm, bn, nw, ns in [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (64, 32, 4, 4), (128, 32, 4, 4)]
    ]


def _bwd_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=nw, num_stages=ns)
        for bm, bn, nw, ns in [(32, 64, 4, 3), (64, 64, 4, 3), (64, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 2)]
    ]


if not INTERPRET:
    _fwd_tuned = triton.autotune(_fwd_configs(), key=["N", "D_HEAD", "HAS_BIAS"])(_attn_fwd_kernel)
    # Autotuning re-runs the kernel: the atomically accumulated dbias buffer must restart from zero each time.
    _dkdv_tuned = triton.autotune(
        _bwd_configs(), key=["N", "D_HEAD", "HAS_BIAS", "NEED_DBIAS", "DBIAS_ATOMIC"], reset_to_zero=["DBIAS"]
    )(_attn_bwd_dkdv_kernel)
    _dq_tuned = triton.autotune(_bwd_configs(), key=["N", "D_HEAD", "HAS_BIAS"])(_attn_bwd_dq_kernel)
else:
    _fwd_tuned = _dkdv_tuned = _dq_tuned = None

# Interpreter: one small fixed tile (the arithmetic is the same in every config).
_INTERP_META = {"BLOCK_M": 16, "BLOCK_N": 16}


def _bias_strides(bias4: torch.Tensor | None, shape: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    if bias4 is None:
        return (0, 0, 0, 0)
    return tuple(bias4.expand(shape).stride())  # 0 on every broadcast dimension


def attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias4: torch.Tensor | None, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """q, k, v: Tensor[B, H, N, d] (any strides), bias4: Tensor broadcastable to [B, H, N, N] with 4 dims, or None.

    Returns (out Tensor[B, H, N, d] contiguous in q's dtype, lse Tensor[B, H, N] float32, base 2).
    """
    B, H, N, d = q.shape
    out = torch.empty((B, H, N, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    args = (
        q, k, v, bias4 if bias4 is not None else lse, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *_bias_strides(bias4, (B, H, N, N)),
        H, N, d, scale * LOG2E,
    )  # fmt: skip
    meta = dict(HAS_BIAS=bias4 is not None, DOT_PREC=dot_precision(q), UPCAST=upcast_dot(q), BLOCK_D=next_pow2(d, 16))
    if _fwd_tuned is None:
        _attn_fwd_kernel[(triton.cdiv(N, 16), B * H)](*args, **meta, **_INTERP_META)
    else:
        _fwd_tuned[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)](*args, **meta)
    return out, lse


def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias4: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    scale: float,
    need_dbias: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients (dq, dk, dv contiguous in the inputs' dtypes; dbias shaped like bias4, or None)."""
    B, H, N, d = q.shape
    dq = torch.empty((B, H, N, d), dtype=q.dtype, device=q.device)
    dk = torch.empty((B, H, N, d), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, N, d), dtype=v.dtype, device=q.device)
    dbias = None
    if need_dbias and bias4 is not None:
        broadcast = any(bs == 1 and fs > 1 for bs, fs in zip(bias4.shape, (B, H, N, N)))
        # Broadcast dims receive sums from several programs (fp32 atomics); a full bias is written once per pair.
        dbias = torch.zeros(bias4.shape, dtype=torch.float32, device=q.device) if broadcast else torch.empty(
            bias4.shape, dtype=bias4.dtype, device=q.device
        )
        dbias_strides = tuple(dbias.expand((B, H, N, N)).stride())
    else:
        broadcast = False
        dbias_strides = (0, 0, 0, 0)
    if dq.numel() == 0:
        return dq, dk, dv, (dbias.to(bias4.dtype) if dbias is not None else None)
    delta = torch.empty((B, H, N), dtype=torch.float32, device=q.device)
    block_d = next_pow2(d, 16)
    _attn_bwd_delta_kernel[(triton.cdiv(N, 64), B * H)](
        out, grad_out, delta, *grad_out.stride(), H, N, d, BLOCK_M=64, BLOCK_D=block_d
    )
    bias_arg = bias4 if bias4 is not None else lse
    bias_strides = _bias_strides(bias4, (B, H, N, N))
    # scratch pointer when there is no dbias: never written (NEED_DBIAS False), safe to zero when autotuning
    dbias_arg = dbias if dbias is not None else torch.zeros(1, dtype=torch.float32, device=q.device)
    common = dict(HAS_BIAS=bias4 is not None, DOT_PREC=dot_precision(q), UPCAST=upcast_dot(q), BLOCK_D=block_d)
    dkdv_args = (
        q, k, v, bias_arg, grad_out, lse, delta, dk, dv, dbias_arg,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *grad_out.stride(), *dbias_strides,
        H, N, d, scale * LOG2E, scale,
    )  # fmt: skip
    dkdv_meta = dict(common, NEED_DBIAS=dbias is not None, DBIAS_ATOMIC=broadcast)
    dq_args = (
        q, k, v, bias_arg, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *grad_out.stride(),
        H, N, d, scale * LOG2E, scale,
    )  # fmt: skip
    if _dkdv_tuned is None:
        _attn_bwd_dkdv_kernel[(triton.cdiv(N, 16), B * H)](*dkdv_args, **dkdv_meta, **_INTERP_META)
        _attn_bwd_dq_kernel[(triton.cdiv(N, 16), B * H)](*dq_args, **common, **_INTERP_META)
    else:
        _dkdv_tuned[lambda m: (triton.cdiv(N, m["BLOCK_N"]), B * H)](*dkdv_args, **dkdv_meta)
        _dq_tuned[lambda m: (triton.cdiv(N, m["BLOCK_M"]), B * H)](*dq_args, **common)
    if dbias is not None and dbias.dtype != bias4.dtype:
        dbias = dbias.to(bias4.dtype)
    return dq, dk, dv, dbias
