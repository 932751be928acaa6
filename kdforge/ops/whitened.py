"""kdforge.ops.whitened_loss: argument checks, backend dispatch and autograd; the math is in the backends.

Triton backend: the custom op ``kdforge_triton::whitened_loss`` returns the loss and dLoss/dstudent from one pass
(kdforge/kernels/whitened_loss.py); its registered backward only scales that gradient by grad_output, in place
in eager mode so that the step holds one [R, D] buffer, not two. It has a
fake (meta) implementation, so torch.compile traces through it and ``torch.library.opcheck`` can test it.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kdforge.errors import ShapeError
from kdforge.ops import _checks, _dispatch, reference

LOSSES = ("smooth_l1", "mse")
REDUCTIONS = ("mean", "sum", "none")


@torch.library.custom_op("kdforge_triton::whitened_loss", mutates_args=())
def _whitened_loss_triton(
    student: Tensor,
    teacher: Tensor,
    index: Optional[Tensor],
    loss: str,
    beta: float,
    whiten: bool,
    eps: float,
    reduction: str,
    need_grad: bool,
) -> tuple[Tensor, Tensor]:
    """student, teacher: Tensor[R, D]; index: LongTensor[M] or None -> (loss, dloss/dstudent Tensor[R, D] or [0])."""
    from kdforge.kernels._common import device_guard
    from kdforge.kernels.whitened_loss import whitened_loss_fwd

    with device_guard(student):
        return whitened_loss_fwd(
            student, teacher, index, loss=loss, beta=beta, whiten=whiten, eps=eps, reduction=reduction,
            need_grad=need_grad,
        )  # fmt: skip


@_whitened_loss_triton.register_fake
def _(student, teacher, index, loss, beta, whiten, eps, reduction, need_grad):
    rows = index.shape[0] if index is not None else student.shape[0]
    out_shape = (rows,) if reduction == "none" else ()
    out = student.new_empty(out_shape, dtype=torch.float32)
    grad = student.new_empty(student.shape) if need_grad else student.new_empty((0,))
    return out, grad


def _setup_context(ctx, inputs, output):
    student, _teacher, index, _loss, _beta, _whiten, _eps, reduction, _need_grad = inputs
    ctx.reduction = reduction
    ctx.rows = student.shape[0]
    ctx.mark_non_differentiable(output[1])
    ctx.save_for_backward(output[1], index)


def _backward(ctx, grad_loss, _grad_of_grad):
    dstudent, index = ctx.saved_tensors
    if ctx.reduction == "none":
        # One grad_output per selected row; unselected rows have a zero gradient already.
        if index is not None:
            weight = grad_loss.new_zeros(ctx.rows).index_copy(0, index, grad_loss)
        else:
            weight = grad_loss
        scale = weight.reshape(-1, 1)
    else:
        scale = grad_loss
    if type(dstudent) is torch.Tensor and not torch.compiler.is_compiling():
        # Eager: scale the saved dS in place and hand that buffer over, so no second [R, D] tensor is made and
        # autograd moves it into .grad. A second backward through the same retained graph then stops at autograd's
        # saved-tensor version check (an error, never a gradient scaled twice); backend="reference" supports it.
        return dstudent.mul_(scale), None, None, None, None, None, None, None, None
    # Traced (torch.compile / AOTAutograd: fake or functional tensors): out of place, as functional graphs need.
    return (dstudent * scale).to(dstudent.dtype), None, None, None, None, None, None, None, None


_whitened_loss_triton.register_autograd(_backward, setup_context=_setup_context)


def whitened_loss(
    student: Tensor,
    teacher: Tensor,
    *,
    loss: str = "smooth_l1",
    beta: float = 2.0,
    whiten: bool = True,
    eps: float = 1e-5,
    index: Tensor | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> Tensor:
    """Distillation loss between student features and (whitened) teacher features, papers/004 eq. 1.

    student, teacher: Tensor[..., D] of one shape (float16 / bfloat16 / float32 / float64; their dtypes may
    differ). With ``whiten`` each teacher row is normalised by a LayerNorm without affine (biased variance, ``eps``
    inside the square root). ``loss``: "smooth_l1" (torch's definition, threshold ``beta``; beta 0 is L1) or "mse".
    ``index``: LongTensor[M] of distinct flat row positions (rows of ``student.reshape(-1, D)``); the loss is
    restricted to those rows, which are read in place (never gathered into a copy). ``reduction``: "mean" over all
    M*D selected elements (0, not NaN, when M is 0), "sum", or "none" -> per-row loss summed over D:
    Tensor[...] without ``index``, Tensor[M] (in index order) with it.

    Differentiable in ``student`` only; the teacher is a target and gets no gradient. The result is float32
    (float64 for float64 inputs on the reference backend). ``backend``: "auto" | "reference" | "triton" | "ext"
    (see :func:`kdforge.ops.available_backends`).
    """
    op = "whitened_loss"
    _checks.tensor(op, "student", student)
    _checks.tensor(op, "teacher", teacher)
    if student.dim() < 1 or student.shape[-1] < 1:
        raise ShapeError(f"{op}: student must be [..., D] with D >= 1, got shape {tuple(student.shape)}")
    if teacher.shape != student.shape:
        raise ShapeError(
            f"{op}: teacher must be [..., D] like student, got student {tuple(student.shape)} and teacher "
            f"{tuple(teacher.shape)}; project the student to the teacher's width first"
        )
    _checks.floating(op, "student", student)
    _checks.floating(op, "teacher", teacher)
    device = _checks.same_device(op, student=student, teacher=teacher)
    _checks.choice(op, "loss", loss, LOSSES)
    _checks.choice(op, "reduction", reduction, REDUCTIONS)
    if not beta >= 0:
        raise ValueError(f"{op}: beta must be >= 0 (smooth-L1 threshold), got {beta}")
    if not eps > 0:
        raise ValueError(f"{op}: eps must be > 0 (it keeps a constant teacher row finite), got {eps}")
    dim = student.shape[-1]
    rows = student.numel() // dim
    if index is not None:
        index = _checks.row_index(op, index, rows, device)

    chosen = _dispatch.resolve(op, backend, device)
    kwargs = dict(loss=loss, beta=float(beta), whiten=bool(whiten), eps=float(eps), index=index, reduction=reduction)
    if chosen == "reference":
        return reference.whitened_loss(student, teacher, **kwargs)
    if chosen == "ext":
        return _dispatch.ext_for_call().whitened_loss(student, teacher, **kwargs)
    from kdforge.kernels.whitened_loss import MAX_D

    if dim > MAX_D:
        if backend == "auto":
            return reference.whitened_loss(student, teacher, **kwargs)
        raise ShapeError(f"{op}: the triton kernel supports D <= {MAX_D}, got D={dim}; use backend='reference'")
    need_grad = torch.is_grad_enabled() and student.requires_grad
    out, _ = torch.ops.kdforge_triton.whitened_loss(
        student.reshape(rows, dim),
        teacher.detach().reshape(rows, dim),
        index,
        loss,
        float(beta),
        bool(whiten),
        float(eps),
        reduction,
        need_grad,
    )
    if reduction == "none" and index is None:
        out = out.reshape(student.shape[:-1])
    return out
