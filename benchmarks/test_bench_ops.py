"""Microbenchmarks of kdforge.ops against the PyTorch (and faiss) code they replace.

GPU (goal sizes, KDFORGE_BENCH_QUICK unset or 0): the Triton backends ("auto" on CUDA)
- whitened_loss forward+backward, bf16 [256*257, 768] and [64*1025, 1024], against torch eager
  (layer_norm + smooth_l1_loss + backward) and torch.compile of the same; bytes = the minimum a fused pass moves
  (read student and teacher, write the gradient), so GB/s and %copyBW show the distance to the memory limit;
- masked_gather of half the rows of [64, 257, 768] bf16 against x[mask] and the copy bandwidth;
- attention forward+backward, bf16 d=64, N in {197, 257, 1025}, shared [H, N, N] bias with gradient, against
  torch SDPA with attn_mask=bias; FLOPs = 3.5 * 4 B H N^2 d (forward + backward, as FlashAttention counts);
- knn Q=1e4, G=1e7, D=768, k=100, fp16 gallery resident on the GPU (and streamed from host memory), against
  faiss-gpu where importable; FLOPs = 2 Q G D.
CPU / quick mode: tiny sizes, the reference and ext backends (never the Triton interpreter), faiss-cpu.

Run: ``python -m pytest benchmarks/test_bench_ops.py`` (add ``--kdforge-json auto`` to keep the records).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks.harness import bench_device, is_quick, measure, pick
from kdforge import ops
from kdforge.ops import _dispatch, reference

DEVICE = bench_device()
ON_GPU = DEVICE.type == "cuda"
QUICK = is_quick(DEVICE)


@pytest.fixture(autouse=True, scope="module")
def _one_cpu_thread():
    """Quick CPU sizes are far too small to gain from intra-op threads, and on a shared 2-core machine a second
    thread mostly waits on the scheduler (medians jump to the 16 ms time slice). One thread, restored after."""
    if ON_GPU:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _backends(op: str) -> list[str]:
    """Backends to time here: Triton on CUDA; on the CPU the reference and, where built, the extension."""
    out = ["triton"] if ON_GPU and _dispatch.triton_reason("cuda") is None else []
    out.append("reference")
    if op != "attention" and _dispatch.ext_reason(DEVICE.type) is None:
        out.append("ext")
    return out


def _skip_unless_available(op: str, backend: str) -> None:
    if backend not in _backends(op):
        pytest.skip(f"{op}: backend {backend!r} is not timed on {DEVICE.type} (unavailable or interpreter-only)")


# ---------------------------------------------------------------------------------------------------------------
# whitened_loss
# ---------------------------------------------------------------------------------------------------------------

WL_SHAPES = pick(quick=[(4 * 37, 64), (2 * 65, 128)], full=[(256 * 257, 768), (64 * 1025, 1024)], device=DEVICE)
WL_DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _wl_inputs(rows: int, dim: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    student = torch.randn(rows, dim, generator=g).to(DEVICE, WL_DTYPE).requires_grad_(True)
    teacher = (torch.randn(rows, dim, generator=g) * 2 + 1).to(DEVICE, WL_DTYPE)
    return student, teacher


def _wl_label(impl: str, rows: int, dim: int) -> str:
    return f"whitened_loss/{impl}/{str(WL_DTYPE).split('.')[-1]}/{rows}x{dim}"


def _wl_bytes(student: torch.Tensor) -> float:
    return 3.0 * student.numel() * student.element_size()  # read student + teacher, write dstudent


def _eager_whitened(student, teacher):
    # FD's loss as a user writes it: whitened target, torch's smooth-L1 with beta 2, mean.
    target = F.layer_norm(teacher.float(), (teacher.shape[-1],), eps=1e-5)
    return F.smooth_l1_loss(student.float(), target, beta=2.0)


@pytest.mark.parametrize("shape", WL_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("impl", ["eager", "compile", "triton", "reference", "ext"])
def test_whitened_loss_fwd_bwd(benchmark, copy_anchor, shape, impl):
    rows, dim = shape
    student, teacher = _wl_inputs(rows, dim)
    if impl == "eager":
        loss_fn = _eager_whitened
    elif impl == "compile":
        try:
            loss_fn = torch.compile(_eager_whitened)
            loss_fn(student, teacher).backward()  # compile outside the timed region
        except Exception as exc:  # noqa: BLE001 - no working compiler toolchain here: say so, do not fail
            pytest.skip(f"torch.compile does not work here ({type(exc).__name__}: {str(exc)[:120]})")
    else:
        _skip_unless_available("whitened_loss", impl)
        loss_fn = lambda s, t: ops.whitened_loss(s, t, backend=impl)  # noqa: E731

    def step():
        student.grad = None
        loss_fn(student, teacher).backward()

    measure(
        benchmark,
        step,
        label=_wl_label(impl, rows, dim),
        group=f"whitened_loss {rows}x{dim}",
        bytes_moved=_wl_bytes(student),
        anchor=None if impl == "eager" else _wl_label("eager", rows, dim),
        params={"rows": rows, "dim": dim, "dtype": str(WL_DTYPE)},
    )


# ---------------------------------------------------------------------------------------------------------------
# masked_gather
# ---------------------------------------------------------------------------------------------------------------

MG_SHAPE = pick(quick=(8, 37, 64), full=(64, 257, 768), device=DEVICE)


@pytest.mark.parametrize("impl", ["torch_index", "triton", "reference", "ext"])
def test_masked_gather(benchmark, copy_anchor, impl):
    B, N, D = MG_SHAPE
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, N, D, generator=g).to(DEVICE, WL_DTYPE)
    mask = (torch.rand(B, N, generator=g) < 0.5).to(DEVICE)
    m = int(mask.sum())
    if impl == "torch_index":
        fn = lambda: x[mask]  # noqa: E731
    else:
        _skip_unless_available("masked_gather", impl)
        fn = lambda: ops.masked_gather(x, mask, backend=impl)  # noqa: E731
    label = f"masked_gather/{impl}/{B}x{N}x{D}"
    measure(
        benchmark,
        fn,
        label=label,
        group="masked_gather",
        bytes_moved=2.0 * m * D * x.element_size(),  # read and write the selected rows
        anchor=None if impl == "torch_index" else f"masked_gather/torch_index/{B}x{N}x{D}",
        params={"rows_selected": m, "dim": D},
    )


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------

# (B, H, N, d): ViT-B/16 at 224 (N 197) and ViT-S/14 at 224 (N 257) batches, and a long sequence (N 1025).
ATTN_SHAPES = pick(
    quick=[(2, 2, 37, 32)],
    full=[(64, 12, 197, 64), (64, 6, 257, 64), (8, 16, 1025, 64)],
    device=DEVICE,
)


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}H{}N{}d{}".format(*s))
@pytest.mark.parametrize("impl", ["sdpa", "triton", "reference"])
def test_attention_fwd_bwd(benchmark, shape, impl):
    B, H, N, d = shape
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, generator=g).to(DEVICE, dtype).requires_grad_(True) for _ in range(3))
    bias = (torch.randn(H, N, N, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_(True)
    if impl == "triton" and not ON_GPU:
        pytest.skip("the Triton attention kernel is only timed on CUDA (the CPU would run the interpreter)")
    if impl == "reference" and ON_GPU and N > 257:
        pytest.skip("the reference materialises [B, H, N, N] fp32 scores; skipped at N > 257 on the GPU")
    grad_out = torch.randn(B, H, N, d, generator=g).to(DEVICE, dtype)

    def step():
        for t in (q, k, v, bias):
            t.grad = None
        ops.attention(q, k, v, bias=bias, backend=impl).backward(grad_out)

    label = f"attention/{impl}/B{B}H{H}N{N}d{d}"
    measure(
        benchmark,
        step,
        label=label,
        group=f"attention N{N}",
        flops=3.5 * 4.0 * B * H * N * N * d,
        anchor=None if impl == "sdpa" else f"attention/sdpa/B{B}H{H}N{N}d{d}",
        params={"B": B, "H": H, "N": N, "d": d, "dtype": str(dtype), "bias": "[H,N,N] with grad"},
    )


# ---------------------------------------------------------------------------------------------------------------
# knn
# ---------------------------------------------------------------------------------------------------------------

KNN = pick(quick=dict(Q=64, G=20_000, D=64, k=10), full=dict(Q=10_000, G=10_000_000, D=768, k=100), device=DEVICE)


@pytest.fixture(scope="module")
def knn_data():
    Q, G, D = KNN["Q"], KNN["G"], KNN["D"]
    dtype = torch.float16 if ON_GPU else torch.float32
    g = torch.Generator(device=DEVICE).manual_seed(0)
    queries = torch.randn(Q, D, device=DEVICE, generator=g).to(dtype)
    gallery = torch.empty(G, D, device=DEVICE, dtype=dtype)
    step = 1 << 20  # fill in slices: no fp32 copy of a 15 GB gallery at once
    for s in range(0, G, step):
        gallery[s : s + step] = torch.randn(min(step, G - s), D, device=DEVICE, generator=g).to(dtype)
    return queries, gallery


def _knn_measure(benchmark, fn, impl, queries, gallery, rounds=None):
    Q, G, D, k = queries.shape[0], gallery.shape[0], queries.shape[1], KNN["k"]
    measure(
        benchmark,
        fn,
        label=f"knn/{impl}/Q{Q}G{G}D{D}k{k}",
        group="knn",
        flops=2.0 * Q * G * D,
        bytes_moved=float(G) * D * gallery.element_size(),
        anchor=None if impl == "faiss" else f"knn/faiss/Q{Q}G{G}D{D}k{k}",
        rounds=rounds,
        warmup=1 if not QUICK else None,
        params={"Q": Q, "G": G, "D": D, "k": k, "dtype": str(gallery.dtype)},
    )


@pytest.mark.parametrize("impl", ["triton", "reference", "ext"])
def test_knn(benchmark, knn_data, impl):
    queries, gallery = knn_data
    _skip_unless_available("knn", impl)
    if impl == "reference" and not QUICK:
        pytest.skip("the reference streams torch.topk over [Q, chunk] fp32 scores: minutes at goal size")
    _knn_measure(
        benchmark, lambda: ops.knn(queries, gallery, KNN["k"], backend=impl), impl, queries, gallery,
        rounds=None if QUICK else 3,
    )  # fmt: skip


def test_knn_streamed_from_host(benchmark, knn_data):
    """The gallery in (pinned-on-the-fly) host memory, streamed with copy/compute overlap."""
    if not ON_GPU or _dispatch.triton_reason("cuda") is not None:
        pytest.skip("streaming host memory to the device needs CUDA and Triton")
    queries, gallery = knn_data
    host = gallery.cpu()
    _knn_measure(
        benchmark, lambda: ops.knn(queries, host, KNN["k"], backend="triton"), "triton_host_stream", queries, host,
        rounds=None if QUICK else 2,
    )  # fmt: skip


def test_knn_faiss(benchmark, knn_data):
    import faiss
    import numpy as np

    queries, gallery = knn_data
    D, k = queries.shape[1], KNN["k"]
    if ON_GPU:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            pytest.skip("faiss-gpu is not importable here (faiss-cpu has no GPU index); no faiss anchor on the GPU")
        res = faiss.StandardGpuResources()
        index = faiss.GpuIndexFlatIP(res, D)
        index.add(gallery.float().cpu().numpy())
    else:
        index = faiss.IndexFlatIP(D)
        index.add(np.ascontiguousarray(gallery.float().numpy()))
    q = np.ascontiguousarray(queries.float().cpu().numpy())
    _knn_measure(benchmark, lambda: index.search(q, k), "faiss", queries, gallery, rounds=None if QUICK else 3)


def test_reference_matches_faiss_at_bench_size(knn_data):
    """A benchmark of wrong answers is worthless: check the timed configuration once (CPU quick sizes)."""
    if not QUICK:
        pytest.skip("checked at quick sizes only (faiss-cpu at goal size takes minutes)")
    import faiss
    import numpy as np

    queries, gallery = knn_data
    index = faiss.IndexFlatIP(queries.shape[1])
    index.add(np.ascontiguousarray(gallery.float().cpu().numpy()))
    f_scores, f_idx = index.search(np.ascontiguousarray(queries.float().cpu().numpy()), KNN["k"])
    scores, idx = reference.knn(queries.float(), gallery.float(), KNN["k"])
    torch.testing.assert_close(scores.cpu(), torch.from_numpy(f_scores), atol=1e-3, rtol=1e-4)
    assert (idx.cpu().numpy() == f_idx).mean() > 0.99  # identical up to near-ties
