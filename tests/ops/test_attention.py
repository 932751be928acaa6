"""kdforge.ops.attention: the flash-style Triton kernels (forward and backward, with bias) against the reference.

Interpreter shapes are tiny but irregular (N 21 and 37 are not multiples of the 16-wide tiles; d 48 is not a
power of two); the goal shapes (N 197 / 257 / 1025) run in the GPU tests.
"""

from __future__ import annotations

import pytest
import torch
from ops_helpers import DEVICE, gpu_only, randn
from tolerances import close

from kdforge.errors import BackendUnavailable, ShapeError
from kdforge.ops import _dispatch, attention, reference
from kdforge.ops.attn import auto_backend

BIAS_SHAPES = {
    "none": None,
    "shared_rel_pos[H,N,N]": lambda B, H, N: (H, N, N),
    "full[B,H,N,N]": lambda B, H, N: (B, H, N, N),
    "per_batch[B,1,N,N]": lambda B, H, N: (B, 1, N, N),
    "key_only[B,1,1,N]": lambda B, H, N: (B, 1, 1, N),
}


def _qkv(gen, B, H, N, d, dtype=torch.float32):
    return [randn(gen, B, H, N, d, dtype=dtype, requires_grad=True) for _ in range(3)]


def _check(gen, q, k, v, bias, backend, dtype=torch.float32, scale=None):
    out = attention(q, k, v, bias=bias, scale=scale, backend=backend)
    ref = reference.attention(q, k, v, bias=bias, scale=scale)
    assert out.shape == q.shape and out.dtype == q.dtype
    grad_out = randn(gen, *out.shape, dtype=out.dtype, scale=2.0)
    inputs = [q, k, v] + ([bias] if bias is not None and bias.requires_grad else [])
    got = torch.autograd.grad(out, inputs, grad_out)
    expected = torch.autograd.grad(ref, inputs, grad_out)
    close(out, ref, dtype, factor=4, msg="out")
    for name, g, e in zip(["dq", "dk", "dv", "dbias"], got, expected):
        assert g.shape == e.shape, name
        close(g, e, dtype, factor=8, msg=name)


@pytest.mark.parametrize("bias_kind", list(BIAS_SHAPES))
@pytest.mark.parametrize("N,d", [(37, 32), (21, 48)])
def test_triton_matches_reference(gen, bias_kind, N, d):
    B, H = 2, 3
    q, k, v = _qkv(gen, B, H, N, d)
    shape = BIAS_SHAPES[bias_kind]
    bias = None if shape is None else randn(gen, *shape(B, H, N), requires_grad=True)
    _check(gen, q, k, v, bias, "triton")


def test_bias_without_grad_and_custom_scale(gen):
    q, k, v = _qkv(gen, 1, 2, 19, 64)
    bias = randn(gen, 2, 19, 19)  # requires no grad: no dbias work
    _check(gen, q, k, v, bias, "triton", scale=0.3)


def test_masking_bias_with_minus_inf(gen):
    """A -inf bias (padding mask) on some keys: those keys get zero weight, no NaN, gradients still right."""
    B, H, N, d = 1, 2, 23, 32
    q, k, v = _qkv(gen, B, H, N, d)
    bias = torch.zeros(B, 1, 1, N, device=DEVICE)
    bias[..., 17:] = float("-inf")
    out = attention(q, k, v, bias=bias, backend="triton")
    assert torch.isfinite(out).all()
    _check(gen, q, k, v, bias, "triton")
    # The masked keys do not influence the output.
    v2 = v.detach().clone()
    v2[:, :, 17:] += 100.0
    close(attention(q, k, v2, bias=bias, backend="triton"), out, torch.float32)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
def test_fully_masked_query_rows(gen, backend):
    """Queries whose every key is masked (-inf on the whole bias row) output 0 and get no gradient, as torch SDPA
    does, and do not spoil the other rows (no NaN anywhere); the other rows match a reference run without them."""
    B, H, N, d = 2, 2, 19, 32
    q, k, v = _qkv(gen, B, H, N, d)
    bias = randn(gen, H, N, N)
    dead = [0, 5, 18]
    bias[:, dead, :] = float("-inf")
    bias[1, :, 3] = float("-inf")  # one masked key everywhere as well
    bias.requires_grad_(True)
    out = attention(q, k, v, bias=bias, backend=backend)
    grad_out = randn(gen, *out.shape, scale=2.0)
    dq, dk, dv, dbias = torch.autograd.grad(out, [q, k, v, bias], grad_out)
    for name, t in (("out", out), ("dq", dq), ("dk", dk), ("dv", dv), ("dbias", dbias)):
        assert not t.isnan().any(), f"NaN in {name}"
    assert torch.count_nonzero(out[:, :, dead]) == 0 and torch.count_nonzero(dq[:, :, dead]) == 0
    assert torch.count_nonzero(dbias[:, dead]) == 0
    live = [i for i in range(N) if i not in dead]
    ref = reference.attention(q.detach()[:, :, live], k.detach(), v.detach(), bias=bias.detach()[:, live])
    close(out[:, :, live], ref, torch.float32, factor=4)
    _check(gen, q, k, v, bias, backend)  # every output and gradient against the reference's (same convention)


def test_non_contiguous_qkv(gen):
    """q, k, v as views of one [B, N, 3, H, d] projection (the usual ViT layout): arbitrary strides."""
    B, N, H, d = 2, 29, 2, 32
    qkv = randn(gen, B, N, 3, H, d, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    assert not q.is_contiguous()
    bias = randn(gen, H, N, N, requires_grad=True)
    out = attention(q, k, v, bias=bias, backend="triton")
    ref = reference.attention(q, k, v, bias=bias)
    grad_out = randn(gen, *out.shape)
    got = torch.autograd.grad(out, (qkv, bias), grad_out)
    expected = torch.autograd.grad(ref, (qkv, bias), grad_out)
    close(out, ref, torch.float32, factor=4)
    for g, e in zip(got, expected):
        close(g, e, torch.float32, factor=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_dtype_grid(gen, dtype):
    q, k, v = _qkv(gen, 1, 2, 21, 32, dtype=dtype)
    bias = randn(gen, 2, 21, 21, requires_grad=True)
    _check(gen, q, k, v, bias, "triton", dtype=dtype)


@pytest.mark.parametrize("bias_kind", ["none", "shared_rel_pos[H,N,N]"])
def test_sdpa_backend_matches_reference(gen, bias_kind):
    B, H, N, d = 2, 3, 37, 32
    q, k, v = _qkv(gen, B, H, N, d)
    shape = BIAS_SHAPES[bias_kind]
    bias = None if shape is None else randn(gen, *shape(B, H, N), requires_grad=True)
    _check(gen, q, k, v, bias, "sdpa")


def test_reference_gradcheck_float64(gen):
    q, k, v = (randn(gen, 1, 2, 5, 4, dtype=torch.float64, requires_grad=True) for _ in range(3))
    bias = randn(gen, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *a: reference.attention(*a[:3], bias=a[3]), (q, k, v, bias))


def test_auto_backend(gen, monkeypatch):
    # "auto" is SDPA (flash / cuDNN) without a bias; the Triton kernel only with a bias, in fp16/bf16 on CUDA.
    cuda = torch.device("cuda")
    monkeypatch.setitem(_dispatch._TRITON_IMPORT, "error", None)  # decided without a GPU: Triton importable
    for dtype in (torch.float16, torch.bfloat16):
        assert auto_backend(cuda, dtype, 64, has_bias=False) == "sdpa"
        assert auto_backend(cuda, dtype, 64, has_bias=True) == "triton"
        assert auto_backend(cuda, dtype, 8, has_bias=True) == "sdpa"  # head dim outside the kernel's 16..128
    assert auto_backend(cuda, torch.float32, 64, has_bias=True) == "sdpa"  # no silent TF32: SDPA's fp32 path
    assert auto_backend(torch.device("cpu"), torch.bfloat16, 64, has_bias=True) == "sdpa"  # never the interpreter
    monkeypatch.setitem(_dispatch._TRITON_IMPORT, "error", "triton cannot be imported (test)")
    assert auto_backend(cuda, torch.float16, 64, has_bias=True) == "sdpa"
    monkeypatch.undo()
    # Head dims outside the kernel's range fall back under auto and are refused when triton is asked for.
    q2, k2, v2 = _qkv(gen, 1, 1, 5, 8)
    close(attention(q2, k2, v2), reference.attention(q2, k2, v2), torch.float32)
    with pytest.raises(BackendUnavailable, match="head dims 16..128"):
        attention(q2, k2, v2, backend="triton")


def test_unavailable_backends_are_clear(gen):
    q, k, v = _qkv(gen, 1, 1, 5, 32)
    with pytest.raises(BackendUnavailable, match="no compiled attention"):
        attention(q, k, v, backend="ext")
    if _dispatch.xformers_reason() is not None:
        with pytest.raises(BackendUnavailable, match="xformers"):
            attention(q, k, v, backend="xformers")
    else:
        pytest.skip("xformers is installed here; its absence message cannot be tested")


def test_argument_errors(gen):
    q, k, v = _qkv(gen, 1, 2, 5, 32)
    with pytest.raises(ShapeError, match="must share one shape"):
        attention(q, k[:, :, :4], v)
    with pytest.raises(ShapeError, match=r"must be \[B, H, N, d\]"):
        attention(q[0], k[0], v[0])
    with pytest.raises(ShapeError, match="bias must broadcast"):
        attention(q, k, v, bias=torch.zeros(3, 5, 5, device=DEVICE))
    with pytest.raises(TypeError, match="share a dtype"):
        attention(q, k.double(), v)


@pytest.mark.parametrize("backend", ["triton", "sdpa", "reference"])
@pytest.mark.parametrize("shape", [(0, 2, 5, 32), (2, 0, 5, 32), (2, 2, 0, 32)], ids=["B=0", "H=0", "N=0"])
def test_empty_inputs(gen, backend, shape):
    """No batch, heads or tokens: an empty output, and zero gradients for q, k, v and the bias on every backend."""
    q, k, v = (randn(gen, *shape, requires_grad=True) for _ in range(3))
    bias = randn(gen, shape[1], shape[2], shape[2], requires_grad=True)
    out = attention(q, k, v, bias=bias, backend=backend)
    assert out.shape == shape
    grads = torch.autograd.grad(out.sum(), [q, k, v, bias])
    for t, g in zip([q, k, v, bias], grads):
        assert g.shape == t.shape and torch.count_nonzero(g) == 0


def test_zero_head_dim_is_an_error(gen):
    q = randn(gen, 1, 2, 3, 0)
    with pytest.raises(ShapeError, match="head dim d .* must be >= 1"):
        attention(q, q, q)


def test_opcheck_custom_ops(gen):
    q, k, v = _qkv(gen, 1, 2, 9, 16)
    bias = randn(gen, 2, 9, 9, requires_grad=True)
    torch.library.opcheck(torch.ops.kdforge_triton.attention_fwd, (q, k, v, bias, 0.25))
    torch.library.opcheck(torch.ops.kdforge_triton.attention_fwd, (q, k, v, None, 0.25))


def test_torch_compile_fullgraph(gen):
    """torch.compile(fullgraph=True, backend='aot_eager') traces the Triton attention op forward and backward."""
    q, k, v = _qkv(gen, 1, 2, 9, 16)
    bias = randn(gen, 2, 9, 9, requires_grad=True)
    torch._dynamo.reset()
    fn = torch.compile(lambda *a: attention(*a[:3], bias=a[3], backend="triton"), fullgraph=True, backend="aot_eager")
    out = fn(q, k, v, bias)
    got = torch.autograd.grad(out.sum(), (q, k, v, bias))
    ref = reference.attention(q, k, v, bias=bias)
    expected = torch.autograd.grad(ref.sum(), (q, k, v, bias))
    close(out, ref, torch.float32, factor=4)
    for g, e in zip(got, expected):
        close(g, e, torch.float32, factor=8)


@gpu_only
@pytest.mark.gpu
@pytest.mark.parametrize("N", [197, 257, 1025])
@pytest.mark.parametrize("d", [32, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_gpu_goal_shapes(gen, N, d, dtype):
    B, H = 2, 4
    q, k, v = _qkv(gen, B, H, N, d, dtype=dtype)
    bias = randn(gen, H, N, N, dtype=dtype, requires_grad=True)
    out = attention(q, k, v, bias=bias, backend="triton")
    ref = reference.attention(q.double(), k.double(), v.double(), bias=bias.double())
    grad_out = randn(gen, *out.shape, dtype=dtype)
    got = torch.autograd.grad(out, (q, k, v, bias), grad_out)
    expected = torch.autograd.grad(ref, (q, k, v, bias), grad_out.double())
    factor = 4 if dtype != torch.float32 else 20
    close(out, ref, dtype, factor=factor)
    for g, e in zip(got, expected):
        close(g, e, dtype, factor=4 * factor)
