"""kdforge._C whitened_loss (CPU kernels) against a float64 reference, torch's own losses, and bad input."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from reference64 import whitened_loss as ref_whitened_loss
from tolerances import close

from kdforge import _ext

# Irregular sizes: rows not a multiple of any thread split, D not a multiple of the vector width (8) or 16.
SHAPE = (3, 41, 45)


def _inputs(gen, shape=SHAPE, dtype=torch.float32):
    student = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    # Teacher far from whitened (mean 3, std 2), so the whitening matters; a few |d| around beta.
    teacher = (torch.randn(shape, generator=gen) * 2 + 3).to(dtype)
    return student, teacher


def _loss_and_grad(student, teacher, gen, **kw):
    out = _ext.whitened_loss(student, teacher, **kw)
    grad_out = torch.rand(out.shape, generator=gen, dtype=out.dtype) * 2 + 0.3  # != 1
    (grad,) = torch.autograd.grad(out, student, grad_out)
    return out, grad, grad_out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("loss", ["smooth_l1", "mse"])
@pytest.mark.parametrize("whiten", [True, False])
def test_matches_reference(gen, dtype, loss, whiten):
    student, teacher = _inputs(gen, dtype=dtype)
    kw = dict(loss=loss, beta=0.7, whiten=whiten, eps=1e-5)
    out, grad, grad_out = _loss_and_grad(student, teacher, gen, **kw)
    ref, ref_grad = ref_whitened_loss(student, teacher, **kw)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert grad.dtype == dtype and grad.shape == student.shape
    close(out, ref, dtype if dtype == torch.float64 else torch.float32, factor=4)
    close(grad, ref_grad * grad_out.double(), dtype)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_reductions_with_index_and_duplicates(gen, reduction):
    """index addresses flat rows of student.reshape(-1, D); a row listed twice counts twice; others get 0 grad."""
    student, teacher = _inputs(gen)
    rows = SHAPE[0] * SHAPE[1]
    index = torch.cat([torch.randperm(rows, generator=gen)[:17], torch.tensor([5, 5])])
    kw = dict(index=index, reduction=reduction, beta=2.0)
    out, grad, grad_out = _loss_and_grad(student, teacher, gen, **kw)
    ref, ref_grad = ref_whitened_loss(student, teacher, **kw)
    assert out.shape == ref.shape == ((19,) if reduction == "none" else ())
    close(out, ref, torch.float32, factor=4)
    if reduction == "none":  # per-row weights: grad = sum_i w_i dl_i at row index[i]
        ref_grad, _ = _weighted_rows_grad(student, teacher, index, grad_out)
    else:
        ref_grad = ref_grad * float(grad_out)
    close(grad, ref_grad, torch.float32)
    untouched = torch.ones(rows, dtype=torch.bool)
    untouched[index] = False
    assert torch.count_nonzero(grad.reshape(rows, -1)[untouched]) == 0


def _weighted_rows_grad(student, teacher, index, weights):
    grad = torch.zeros(student.numel() // student.shape[-1], student.shape[-1], dtype=torch.float64)
    for i, r in enumerate(index.tolist()):
        _, g = ref_whitened_loss(student, teacher, index=torch.tensor([r]), reduction="sum", beta=2.0)
        grad += g.reshape(grad.shape) * float(weights[i])
    return grad.reshape(student.shape), None


def test_none_without_index_keeps_leading_shape(gen):
    student, teacher = _inputs(gen)
    out, grad, grad_out = _loss_and_grad(student, teacher, gen, reduction="none", loss="mse")
    ref, _ = ref_whitened_loss(student, teacher, reduction="none", loss="mse")
    assert out.shape == SHAPE[:-1]
    close(out, ref, torch.float32, factor=4)
    _, per_elem = ref_whitened_loss(student, teacher, reduction="sum", loss="mse")
    close(grad, per_elem * grad_out.double()[..., None], torch.float32)


def test_empty_index_gives_zero_loss_and_gradient(gen):
    student, teacher = _inputs(gen)
    empty = torch.empty(0, dtype=torch.long)
    for reduction in ("mean", "sum"):
        out = _ext.whitened_loss(student, teacher, index=empty, reduction=reduction)
        (grad,) = torch.autograd.grad(out, student, torch.tensor(3.0))
        assert out.item() == 0.0 and not torch.isnan(out)
        assert torch.count_nonzero(grad) == 0
    assert _ext.whitened_loss(student, teacher, index=empty, reduction="none").shape == (0,)


def test_non_contiguous_inputs(gen):
    """Transposed and sliced views (e.g. dropping a CLS token) give the same result as contiguous copies."""
    base_s = torch.randn(3, 45, 42, generator=gen).transpose(1, 2)[:, 1:]  # [3, 41, 45], strides (1890, 1, 42)
    base_t = (torch.randn(3, 45, 42, generator=gen) * 2 + 3).transpose(1, 2)[:, 1:]
    assert not base_s.is_contiguous()
    student = base_s.detach().requires_grad_()  # a non-contiguous leaf
    out, grad, grad_out = _loss_and_grad(student, base_t, gen, beta=1.0)
    ref, ref_grad = ref_whitened_loss(student, base_t.contiguous(), beta=1.0)
    close(out, ref, torch.float32, factor=4)
    close(grad, ref_grad * float(grad_out), torch.float32)


@pytest.mark.parametrize("beta", [0.0, 0.5, 2.0])
def test_matches_torch_layer_norm_and_smooth_l1(gen, beta):
    """Same values and gradients as torch's F.layer_norm + F.smooth_l1_loss, beta = 0 (L1) included."""
    student, teacher = _inputs(gen, shape=(37, 29))
    out = _ext.whitened_loss(student, teacher, beta=beta, eps=1e-5)
    (grad,) = torch.autograd.grad(out, student)
    s2 = student.detach().clone().requires_grad_()
    ref = F.smooth_l1_loss(s2, F.layer_norm(teacher, (29,), eps=1e-5), beta=beta)
    ref.backward()
    close(out, ref, torch.float32)
    close(grad, s2.grad, torch.float32)


def test_loss_backward_twice_with_retained_graph(gen):
    """dS is handed to autograd as the gradient when grad_output is 1; a retained graph must still be right."""
    student, teacher = _inputs(gen)
    out = _ext.whitened_loss(student, teacher)
    out.backward(retain_graph=True)
    first = student.grad.clone()
    out.backward()
    close(student.grad, 2 * first, torch.float32)
    _, ref_grad = ref_whitened_loss(student, teacher)
    close(first, ref_grad, torch.float32)


def test_mixed_dtypes_promote(gen):
    student, teacher = _inputs(gen, dtype=torch.bfloat16)
    teacher32 = teacher.float() + 0.001 * torch.randn(teacher.shape, generator=gen)
    out, grad, grad_out = _loss_and_grad(student, teacher32, gen)
    ref, ref_grad = ref_whitened_loss(student, teacher32)
    assert grad.dtype == torch.bfloat16
    close(out, ref, torch.float32, factor=4)
    close(grad, ref_grad * float(grad_out), torch.bfloat16)


def test_teacher_gets_no_gradient(gen):
    student, teacher = _inputs(gen)
    teacher.requires_grad_()
    _ext.whitened_loss(student, teacher).backward()
    assert student.grad is not None and teacher.grad is None


def test_result_does_not_depend_on_thread_count(gen):
    student, teacher = _inputs(gen, shape=(513, 77))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _ext.whitened_loss(student, teacher, reduction="sum")
        torch.set_num_threads(max(2, before))
        many = _ext.whitened_loss(student, teacher, reduction="sum")
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, many)


_SUBPROCESS = r"""
import json, sys, torch
from kdforge import _ext, _C
g = torch.Generator().manual_seed(7)
s = torch.randn(67, 45, generator=g, dtype=torch.float64).requires_grad_()
t = torch.randn(67, 45, generator=g, dtype=torch.float64) * 2 + 3
out = {"isa": _C.CPU_KERNEL_ISA}
for dtype in ("float32", "bfloat16"):
    si = s.detach().to(getattr(torch, dtype)).requires_grad_()
    loss = _ext.whitened_loss(si, t.to(si.dtype), beta=0.7)
    loss.backward()
    out[dtype] = [loss.item(), si.grad.double().tolist()]
print(json.dumps(out))
"""


def test_baseline_and_avx2_kernels_agree():
    """ATEN_CPU_CAPABILITY=default selects the baseline copy of the CPU kernels; both copies agree."""
    def run(env_value):
        env = {**os.environ, "ATEN_CPU_CAPABILITY": env_value}
        res = subprocess.run([sys.executable, "-c", _SUBPROCESS], env=env, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout.strip().splitlines()[-1])

    default = run("default")
    assert default["isa"] == "DEFAULT"
    native = run("avx2") if "AVX2" in _ext.build_info()["cpu_kernels"] else None
    if native is None:
        pytest.skip("this build has no AVX2 kernel copy (not x86-64)")
    if native["isa"] != "AVX2":
        pytest.skip(f"this CPU cannot run the AVX2 copy (ATen capability {native['isa']})")
    for dtype in ("float32", "bfloat16"):
        close(torch.tensor(default[dtype][0]), torch.tensor(native[dtype][0]), torch.float32)
        close(torch.tensor(default[dtype][1]), torch.tensor(native[dtype][1]), getattr(torch, dtype))


def test_opcheck():
    gen = torch.Generator().manual_seed(0)
    student, teacher = _inputs(gen, shape=(2, 5, 11))
    index = torch.tensor([0, 3, 3, 9])
    op = torch.ops.kdforge.whitened_loss.default
    for args in [
        (student, teacher, None, "smooth_l1", 2.0, True, 1e-5, "mean"),
        (student, teacher, index, "mse", 1.0, False, 1e-5, "sum"),
        (student, teacher, index, "smooth_l1", 0.5, True, 1e-6, "none"),
    ]:
        torch.library.opcheck(op, args)


def test_compiles_with_torch_compile(gen):
    student, teacher = _inputs(gen, shape=(4, 9, 13))
    fn = torch.compile(lambda s, t: _ext.whitened_loss(s, t, beta=0.7) * 2, backend="aot_eager", fullgraph=True)
    out = fn(student, teacher)
    (grad,) = torch.autograd.grad(out, student)
    ref, ref_grad = ref_whitened_loss(student, teacher, beta=0.7)
    close(out, 2 * ref, torch.float32, factor=4)
    close(grad, 2 * ref_grad, torch.float32)


@pytest.mark.parametrize(
    "kwargs, student_shape, teacher_shape, message",
    [
        ({}, (4, 8), (4, 9), "teacher must be [..., D] like student, got teacher [4, 9] and student [4, 8]"),
        ({"loss": "l1"}, (4, 8), (4, 8), 'loss must be "smooth_l1" or "mse", got "l1"'),
        ({"reduction": "max"}, (4, 8), (4, 8), 'reduction must be "mean", "sum" or "none", got "max"'),
        ({"beta": -1.0}, (4, 8), (4, 8), "beta must be >= 0"),
        ({"index": torch.tensor([0, 4])}, (4, 8), (4, 8), "index[1] = 4 is out of range for 4 rows"),
        ({"index": torch.tensor([0, 1], dtype=torch.int32)}, (4, 8), (4, 8), "index must be int64 (LongTensor)"),
        ({"index": torch.tensor([[0]])}, (4, 8), (4, 8), "index must be a 1-D LongTensor"),
        ({}, (4, 0), (4, 0), "student must be [..., D] with D >= 1"),
    ],
)
def test_bad_input_messages(kwargs, student_shape, teacher_shape, message):
    with pytest.raises(RuntimeError) as err:
        _ext.whitened_loss(torch.randn(student_shape), torch.randn(teacher_shape), **kwargs)
    assert message in str(err.value)


def test_integer_inputs_are_refused():
    with pytest.raises(RuntimeError, match="student must be float32, bfloat16, float16 or float64, got Long"):
        _ext.whitened_loss(torch.ones(3, 4, dtype=torch.long), torch.ones(3, 4, dtype=torch.long))
