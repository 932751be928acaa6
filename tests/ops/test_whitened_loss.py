"""kdforge.ops.whitened_loss: the Triton kernel against the reference, the paper's equation, and the edge cases.

Without a GPU the Triton kernel runs in the CPU interpreter (fp32 math) at irregular tiny shapes (37 rows, D 45).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from ops_helpers import DEVICE, ON_GPU, gpu_only, randn
from tolerances import close

from kdforge.errors import BackendUnavailable, ShapeError
from kdforge.ops import _dispatch, reference, whitened_loss

ROWS, DIM = 37, 45


def _inputs(gen, dtype=torch.float32, rows=ROWS, dim=DIM):
    student = randn(gen, rows, dim, dtype=dtype, requires_grad=True)
    # Teacher features far from whitened (mean 3, std 2) so that whitening matters.
    teacher = randn(gen, rows, dim, dtype=dtype, scale=2.0, shift=3.0)
    return student, teacher


def _index(gen, rows, count):
    return torch.randperm(rows, generator=gen)[:count].to(DEVICE)


def _value_and_grad(fn, student, gen):
    out = fn()
    grad_out = randn(gen, *out.shape, dtype=out.dtype, scale=1.5, shift=0.5)  # grad_output != 1
    (grad,) = torch.autograd.grad(out, student, grad_out)
    return out, grad, grad_out


@pytest.mark.parametrize("loss", ["smooth_l1", "mse"])
@pytest.mark.parametrize("whiten", [True, False])
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("with_index", [False, True])
def test_triton_matches_reference(gen, loss, whiten, reduction, with_index):
    student, teacher = _inputs(gen)
    index = _index(gen, ROWS, 11) if with_index else None
    kw = dict(loss=loss, whiten=whiten, reduction=reduction, index=index, beta=0.7)
    out, grad, grad_out = _value_and_grad(lambda: whitened_loss(student, teacher, backend="triton", **kw), student, gen)
    ref = reference.whitened_loss(student, teacher, **kw)
    (ref_grad,) = torch.autograd.grad(ref, student, grad_out)
    expected_shape = ((11,) if with_index else (ROWS,)) if reduction == "none" else ()
    assert out.shape == ref.shape == expected_shape
    assert out.dtype == torch.float32
    close(out, ref, torch.float32, factor=4)
    close(grad, ref_grad, torch.float32)
    if with_index:  # rows outside the index get exactly no gradient
        outside = torch.ones(ROWS, dtype=torch.bool, device=DEVICE)
        outside[index] = False
        assert torch.count_nonzero(grad[outside]) == 0


def test_leading_dims_and_index_into_flat_rows(gen):
    """[B, N, D] inputs: index addresses rows of x.reshape(-1, D); 'none' keeps the leading shape."""
    student = randn(gen, 3, 13, DIM, requires_grad=True)
    teacher = randn(gen, 3, 13, DIM, shift=1.0)
    per_row = whitened_loss(student, teacher, reduction="none", backend="triton")
    assert per_row.shape == (3, 13)
    close(per_row, reference.whitened_loss(student, teacher, reduction="none"), torch.float32, factor=4)
    index = _index(gen, 39, 7)
    picked = whitened_loss(student, teacher, index=index, reduction="none", backend="triton")
    close(picked, per_row.reshape(-1)[index], torch.float32, factor=4)


def _paper_eq1_float64(student, teacher, beta, eps):
    """papers/004 eq. 1 written out: LayerNorm without affine on the teacher, then smooth-L1 with beta, mean."""
    target = F.layer_norm(teacher.double(), (teacher.shape[-1],), weight=None, bias=None, eps=eps)
    return F.smooth_l1_loss(student.double(), target, beta=beta, reduction="mean")


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_matches_fd_paper_equation(gen, backend):
    student, teacher = _inputs(gen)
    expected = _paper_eq1_float64(student, teacher, beta=2.0, eps=1e-5)
    (expected_grad,) = torch.autograd.grad(expected, student)
    # Defaults are FD's: smooth_l1, beta 2.0, whiten, eps 1e-5, mean.
    out = whitened_loss(student, teacher, backend=backend)
    (grad,) = torch.autograd.grad(out, student)
    close(out, expected, torch.float32, factor=4)
    close(grad, expected_grad, torch.float32)


def test_reference_gradcheck_float64(gen):
    student = randn(gen, 5, 7, dtype=torch.float64, requires_grad=True)
    teacher = randn(gen, 5, 7, dtype=torch.float64, shift=1.0)
    index = torch.tensor([4, 0, 2], device=DEVICE)
    for loss in ("smooth_l1", "mse"):
        for reduction in ("mean", "none"):
            # beta 0.5 puts elements on both sides of the smooth-L1 knee (gradcheck avoids the knee itself).
            fn = lambda s: reference.whitened_loss(s, teacher, loss=loss, beta=0.5, index=index, reduction=reduction)  # noqa: E731
            assert torch.autograd.gradcheck(fn, (student,), eps=1e-6, atol=1e-6)


def test_beta_zero_is_l1(gen):
    student, teacher = _inputs(gen)
    out, grad, grad_out = _value_and_grad(lambda: whitened_loss(student, teacher, beta=0.0, backend="triton"), student, gen)
    target = F.layer_norm(teacher.float(), (DIM,), eps=1e-5)
    expected = F.l1_loss(student.float(), target)
    (expected_grad,) = torch.autograd.grad(expected, student, grad_out)
    close(out, expected, torch.float32, factor=4)
    close(grad, expected_grad, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_empty_index(gen, backend):
    student, teacher = _inputs(gen)
    empty = torch.empty(0, dtype=torch.long, device=DEVICE)
    mean = whitened_loss(student, teacher, index=empty, backend=backend)
    assert mean.item() == 0.0  # an empty selection contributes nothing (not NaN)
    (grad,) = torch.autograd.grad(mean * 3.0, student)
    assert torch.count_nonzero(grad) == 0
    assert whitened_loss(student, teacher, index=empty, reduction="sum", backend=backend).item() == 0.0
    assert whitened_loss(student, teacher, index=empty, reduction="none", backend=backend).shape == (0,)


def test_non_contiguous_inputs(gen):
    base_s = randn(gen, ROWS, 2 * DIM, requires_grad=True)
    student = base_s[:, ::2]  # column stride 2
    teacher = randn(gen, DIM, ROWS, shift=2.0).T  # transposed view
    assert not student.is_contiguous() and not teacher.is_contiguous()
    index = _index(gen, ROWS, 9)
    out, grad, grad_out = _value_and_grad(
        lambda: whitened_loss(student, teacher, index=index, backend="triton"), base_s, gen
    )
    ref = reference.whitened_loss(student, teacher, index=index)
    (ref_grad,) = torch.autograd.grad(ref, base_s, grad_out)
    close(out, ref, torch.float32, factor=4)
    close(grad, ref_grad, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("loss", ["smooth_l1", "mse"])
def test_dtype_grid(gen, dtype, loss):
    """Low-precision inputs: the kernel reads them, accumulates in fp32, returns an fp32 loss and a gradient in
    the input dtype; the reference sees the same (rounded) inputs."""
    student, teacher = _inputs(gen, dtype=dtype)
    out, grad, grad_out = _value_and_grad(lambda: whitened_loss(student, teacher, loss=loss, backend="triton"), student, gen)
    ref = reference.whitened_loss(student, teacher, loss=loss)
    (ref_grad,) = torch.autograd.grad(ref, student, grad_out)
    assert out.dtype == torch.float32 and grad.dtype == dtype
    close(out, ref, torch.float32, factor=10)  # same inputs, fp32 math on both sides
    close(grad, ref_grad, dtype)  # the gradient is rounded to the input dtype


def test_teacher_gets_no_gradient(gen):
    student, teacher = _inputs(gen)
    teacher.requires_grad_(True)
    out = whitened_loss(student, teacher, backend="triton")
    out.backward()
    assert teacher.grad is None and student.grad is not None


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_backward_hands_its_one_buffer_to_grad(gen, reduction):
    """The backward scales the forward's dS in place: the gradient is right for grad_output != 1 and no second
    [rows, D] tensor is made (the saved dS buffer is the gradient). A second backward through a retained graph
    fails autograd's version check rather than returning a gradient scaled twice."""
    student, teacher = _inputs(gen)
    out = whitened_loss(student, teacher, reduction=reduction, backend="triton")
    grad_out = randn(gen, *out.shape, dtype=out.dtype, scale=1.5, shift=0.5)
    saved = out.grad_fn.saved_tensors if hasattr(out.grad_fn, "saved_tensors") else None
    out.backward(grad_out, retain_graph=True)
    ref = reference.whitened_loss(student, teacher, reduction=reduction)
    (ref_grad,) = torch.autograd.grad(ref, student, grad_out)
    close(student.grad, ref_grad, torch.float32)
    if saved is not None:  # the saved dS itself now holds the gradient
        close(saved[0], ref_grad, torch.float32)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.backward(grad_out)


def test_no_grad_mode_skips_the_gradient(gen):
    student, teacher = _inputs(gen)
    with torch.no_grad():
        out = whitened_loss(student, teacher, backend="triton")
    close(out, reference.whitened_loss(student, teacher), torch.float32, factor=4)
    assert not out.requires_grad


def test_argument_errors(gen):
    student, teacher = _inputs(gen)
    with pytest.raises(ShapeError, match="teacher must be"):
        whitened_loss(student, teacher[:, :-1])
    with pytest.raises(ValueError, match="loss must be one of"):
        whitened_loss(student, teacher, loss="huber")
    with pytest.raises(ValueError, match="reduction must be one of"):
        whitened_loss(student, teacher, reduction="avg")
    with pytest.raises(ValueError, match="beta must be >= 0"):
        whitened_loss(student, teacher, beta=-1.0)
    with pytest.raises(ShapeError, match=r"every index must lie in \[0, 37\)"):
        whitened_loss(student, teacher, index=torch.tensor([0, 37], device=DEVICE))
    with pytest.raises(ShapeError, match="more than once"):
        whitened_loss(student, teacher, index=torch.tensor([3, 5, 3], device=DEVICE))
    with pytest.raises(TypeError, match="integer tensor"):
        whitened_loss(student, teacher, index=torch.tensor([0.0, 1.0], device=DEVICE))
    with pytest.raises(ValueError, match="backend must be one of"):
        whitened_loss(student, teacher, backend="cuda")


def test_ext_backend_unavailable_is_clear(gen, monkeypatch):
    """backend='ext' when kdforge._ext reports it is not built: BackendUnavailable with the reason and the fix."""
    import types

    fake = types.SimpleNamespace(available=lambda: False, unavailable_reason=lambda: "kdforge._C failed to load")
    monkeypatch.setitem(__import__("sys").modules, "kdforge._ext", fake)
    student, teacher = _inputs(gen)
    with pytest.raises(BackendUnavailable, match=r"kdforge\._C is not built: kdforge\._C failed to load\. Build it"):
        whitened_loss(student, teacher, backend="ext")
    assert _dispatch.resolve("whitened_loss", "auto", torch.device("cpu")) == "reference"


def test_triton_on_cpu_without_interpreter_is_refused(gen, monkeypatch):
    monkeypatch.setattr(_dispatch, "interpreter_requested", lambda: False)
    student, teacher = _inputs(gen, rows=3, dim=4)
    with pytest.raises(BackendUnavailable, match="TRITON_INTERPRET=1"):
        whitened_loss(student.cpu(), teacher.cpu(), backend="triton")


def test_auto_never_uses_the_interpreter_on_cpu(gen):
    assert _dispatch.resolve("whitened_loss", "auto", torch.device("cpu")) in ("ext", "reference")


def test_opcheck_custom_op(gen):
    """torch.library.opcheck: schema, fake tensor, autograd registration and AOT dispatch of the Triton op."""
    student, teacher = _inputs(gen, rows=9, dim=12)
    index = torch.tensor([1, 4, 8], device=DEVICE)
    op = torch.ops.kdforge_triton.whitened_loss
    torch.library.opcheck(op, (student, teacher, index, "smooth_l1", 2.0, True, 1e-5, "mean", True))
    torch.library.opcheck(op, (student.detach(), teacher, None, "mse", 2.0, False, 1e-5, "none", False))


@pytest.mark.parametrize("backend", ["reference", "triton", "auto"])
def test_torch_compile_fullgraph(gen, backend):
    """torch.compile(fullgraph=True) traces whitened_loss forward and backward: the pure-torch reference path,
    the Triton custom op through its fake implementation and registered autograd, and "auto" (the backend choice
    is a trace-time constant; on this CPU it is the compiled extension where built, else the reference). The
    aot_eager backend runs dynamo + AOTAutograd without code generation (no C++ compiler needed on CPU)."""
    student, teacher = _inputs(gen, rows=8, dim=16)
    index = torch.tensor([0, 3, 5], device=DEVICE)

    def fn(s, t):
        return whitened_loss(s, t, index=index, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out = compiled(student, teacher)
    (grad,) = torch.autograd.grad(out, student)
    ref = reference.whitened_loss(student, teacher, index=index)
    (ref_grad,) = torch.autograd.grad(ref, student)
    close(out, ref, torch.float32, factor=4)
    close(grad, ref_grad, torch.float32)


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(4 * 257, 768), (2 * 1025, 1024), (77, 4100)])
def test_gpu_large_rows(gen, dtype, shape):
    assert ON_GPU
    student, teacher = _inputs(gen, dtype=dtype, rows=shape[0], dim=shape[1])
    index = _index(gen, shape[0], shape[0] // 2)
    for idx in (None, index):
        out, grad, grad_out = _value_and_grad(
            lambda: whitened_loss(student, teacher, index=idx, backend="triton"), student, gen
        )
        ref = reference.whitened_loss(student, teacher, index=idx)
        (ref_grad,) = torch.autograd.grad(ref, student, grad_out)
        close(out, ref, torch.float32, factor=50)
        close(grad, ref_grad, dtype)
