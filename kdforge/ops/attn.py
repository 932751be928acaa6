"""kdforge.ops.attention: checks, dispatch and autograd (flash kernels in kdforge/kernels/attention.py).

Triton backend: ``kdforge_triton::attention_fwd`` (q, k, v, bias?, scale) -> (out, lse) and
``kdforge_triton::attention_bwd`` -> (dq, dk, dv, dbias); the forward op's registered backward calls the
backward op, and both have fake implementations for torch.compile.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from kdforge.errors import BackendUnavailable, ShapeError
from kdforge.ops import _checks, _dispatch, reference

MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 128


def _bias4(bias: Optional[Tensor]) -> Optional[Tensor]:
    return None if bias is None else bias.reshape((1,) * (4 - bias.dim()) + tuple(bias.shape))


@torch.library.custom_op("kdforge_triton::attention_fwd", mutates_args=())
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> tuple[Tensor, Tensor]:
    """q, k, v: Tensor[B, H, N, d]; bias broadcastable to [B, H, N, N] -> (out [B, H, N, d], lse [B, H, N] fp32)."""
    from kdforge.kernels._common import device_guard
    from kdforge.kernels.attention import attention_fwd

    with device_guard(q):
        return attention_fwd(q, k, v, _bias4(bias), scale)


@_attention_fwd.register_fake
def _(q, k, v, bias, scale):
    B, H, N, d = q.shape
    return q.new_empty((B, H, N, d)), q.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("kdforge_triton::attention_bwd", mutates_args=())
def _attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    bias: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    scale: float,
    need_dbias: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients (dq, dk, dv, dbias) of attention_fwd; dbias has bias's shape (empty [0] when not needed)."""
    from kdforge.kernels._common import device_guard
    from kdforge.kernels.attention import attention_bwd

    with device_guard(q):
        dq, dk, dv, dbias = attention_bwd(
            grad_out, q, k, v, _bias4(bias), out, lse, scale, need_dbias and bias is not None
        )
    if dbias is None:
        dbias = q.new_empty((0,))
    else:
        dbias = dbias.reshape(bias.shape)
    return dq, dk, dv, dbias


@_attention_bwd.register_fake
def _(grad_out, q, k, v, bias, out, lse, scale, need_dbias):
    dbias = bias.new_empty(bias.shape) if (need_dbias and bias is not None) else q.new_empty((0,))
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), dbias


def _fwd_setup(ctx, inputs, output):
    q, k, v, bias, scale = inputs
    out, lse = output
    ctx.scale = scale
    ctx.has_bias = bias is not None
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, bias, out, lse)


def _fwd_backward(ctx, grad_out, _grad_lse):
    q, k, v, bias, out, lse = ctx.saved_tensors
    need_dbias = ctx.has_bias and ctx.needs_input_grad[3]
    dq, dk, dv, dbias = torch.ops.kdforge_triton.attention_bwd(
        grad_out, q, k, v, bias, out, lse, ctx.scale, need_dbias
    )
    return dq, dk, dv, (dbias if need_dbias else None), None


_attention_fwd.register_autograd(_fwd_backward, setup_context=_fwd_setup)


def _xformers(q: Tensor, k: Tensor, v: Tensor, bias: Optional[Tensor], scale: float) -> Tensor:
    import xformers.ops as xops

    B, H, N, d = q.shape
    attn_bias = None
    if bias is not None:
        # xformers wants [B, H, N, N]-shaped (expand is fine) bias in the inputs' dtype.
        attn_bias = bias.to(q.dtype).expand(B, H, N, N)
    # xformers' layout is [B, N, H, d].
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=attn_bias, scale=scale
    )
    return out.transpose(1, 2)


def auto_backend(device: torch.device, dtype: torch.dtype, head_dim: int, *, has_bias: bool) -> str:
    """The backend ``attention(..., backend="auto")`` runs for inputs of ``dtype`` and ``head_dim`` on ``device``:
    "triton" or "sdpa".

    Without a bias, SDPA dispatches to FlashAttention-2 / cuDNN kernels that outrun kdforge's Triton kernel, so
    "auto" takes SDPA. With a bias (a relative position bias) SDPA must use its masked (memory-efficient or math)
    kernels; there kdforge's kernel wins, in float16/bfloat16 on CUDA, for head dims 16..128, where Triton can be
    imported. In float32 the kernel's exact products (no silent TF32) run on CUDA cores, far from tensor-core
    speed, so SDPA stays the choice; backend="triton" still runs the kernel (IEEE fp32).
    """
    if (has_bias and _dispatch.resolve("attention", "auto", device) == "triton"
            and dtype in (torch.float16, torch.bfloat16) and MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM):
        return "triton"
    return "sdpa"


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    bias: Tensor | None = None,
    scale: float | None = None,
    backend: str = "auto",
) -> Tensor:
    """softmax(q k^T * scale + bias) v without materialising the [N, N] scores (flash-style online softmax).

    q, k, v: Tensor[B, H, N, d] of one dtype (float16 / bfloat16 / float32; float64 on "reference" and "sdpa"),
    any N; the triton backend takes head dims 16..128. ``bias``: additive, broadcastable to [B, H, N, N] (a
    relative position bias shared by the batch is [H, N, N]); it receives a gradient when it requires one.
    ``scale`` defaults to d ** -0.5. Returns Tensor[B, H, N, d] in q's dtype. A query whose every key is masked
    (bias -inf on its whole row) attends to nothing: output 0 and no gradient, on every backend but "xformers"
    (whose convention is its own), where a plain softmax would give NaN.

    ``backend``: "auto" | "triton" | "sdpa" (torch.nn.functional.scaled_dot_product_attention with
    attn_mask=bias) | "xformers" (memory_efficient_attention, where installed) | "reference" (materialises the
    scores) | "ext" (refused: there is no compiled attention). "auto" is SDPA (its flash / cuDNN / memory-efficient
    kernels) when there is no bias, and kdforge's Triton kernel only with a bias in float16/bfloat16 on CUDA (head
    dims 16..128), where SDPA falls back to its slower masked kernels; see :func:`auto_backend`.
    """
    op = "attention"
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(op, name, t)
        _checks.floating(op, name, t)
        if t.dim() != 4:
            raise ShapeError(f"{op}: {name} must be [B, H, N, d], got shape {tuple(t.shape)}")
    if k.shape != q.shape or v.shape != q.shape:
        raise ShapeError(
            f"{op}: q, k and v must share one shape [B, H, N, d], got q {tuple(q.shape)}, k {tuple(k.shape)}, "
            f"v {tuple(v.shape)}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"{op}: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}; cast them first")
    B, H, N, d = q.shape
    if d == 0:
        raise ShapeError(f"{op}: the head dim d (last dim of q, k, v) must be >= 1, got shape {tuple(q.shape)}")
    if bias is not None:
        _checks.tensor(op, "bias", bias)
        _checks.floating(op, "bias", bias)
        if bias.dim() > 4:
            raise ShapeError(f"{op}: bias must broadcast to [B, H, N, N] = {[B, H, N, N]}, got {list(bias.shape)}")
        try:
            ok = torch.broadcast_shapes(tuple(bias.shape), (B, H, N, N)) == (B, H, N, N)
        except RuntimeError:
            ok = False
        if not ok:
            raise ShapeError(
                f"{op}: bias must broadcast to [B, H, N, N] = {[B, H, N, N]} (e.g. a shared relative position bias "
                f"[H, N, N]), got {list(bias.shape)}"
            )
    device = _checks.same_device(op, q=q, k=k, v=v, bias=bias)
    scale = float(d**-0.5 if scale is None else scale)

    chosen = auto_backend(device, q.dtype, d, has_bias=bias is not None) if backend == "auto" else \
        _dispatch.resolve(op, backend, device)
    if q.numel() == 0:
        # Nothing to attend (B, H or N is 0): every backend's answer is the reference's, whose graph also reaches
        # bias (zero gradients rather than None, which SDPA gives for empty inputs).
        chosen = "reference"
    if chosen == "triton" and not (MIN_HEAD_DIM <= d <= MAX_HEAD_DIM and q.dtype != torch.float64):
        raise BackendUnavailable(
            f"{op}: the triton kernel takes head dims {MIN_HEAD_DIM}..{MAX_HEAD_DIM} in float16/bfloat16/float32, "
            f"got d={d} in {q.dtype}; use backend='sdpa' or 'reference'"
        )
    if chosen == "reference":
        return reference.attention(q, k, v, bias=bias, scale=scale)
    if chosen == "sdpa":
        mask = None if bias is None else bias.to(q.dtype)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    if chosen == "xformers":
        return _xformers(q, k, v, bias, scale)
    out, _lse = torch.ops.kdforge_triton.attention_fwd(q, k, v, bias, scale)
    return out
