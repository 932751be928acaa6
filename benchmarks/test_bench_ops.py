"""Microbenchmarks of kdforge.ops against the PyTorch (and faiss) code they replace.

GPU (goal sizes, KDFORGE_BENCH_QUICK unset or 0): the Triton backends ("auto" on CUDA)
- whitened_loss forward+backward, bf16 [256*257, 768] and [64*1025, 1024], against torch eager
  (layer_norm + smooth_l1_loss + backward) and torch.compile of the same; bytes = the minimum a fused pass moves
  (read student and teacher, write the gradient), so GB/s and %copyBW show the distance to the memory limit;
- masked_gather of half the rows of [64, 257, 768] bf16 against x[mask] and the copy bandwidth, and its inverse
  masked_scatter against ``clone`` + ``new[mask] = rows``;
- attention forward+backward, bf16 d=64, N in {197, 257, 1025}, shared [H, N, N] bias with gradient, against
  torch SDPA with attn_mask=bias; FLOPs = 3.5 * 4 B H N^2 d (forward + backward, as FlashAttention counts);
- knn Q=1e4, G=1e7, D=768, k=100, fp16 gallery resident on the GPU (and streamed from host memory), against
  faiss-gpu where importable; FLOPs = 2 Q G D.
CPU / quick mode: tiny sizes, the reference and ext backends (never the Triton interpreter), faiss-cpu.

Peak memory (CUDA) is recorded per call. The goals of issues 3 and 4 (CUDA side) are declared next to the
benchmarks that measure them (``benchmarks/goals.py``) and judged at the end of the session.

Run: ``python -m pytest benchmarks/test_bench_ops.py`` (add ``--kdforge-json auto`` to keep the records).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from benchmarks import goals
from benchmarks.harness import bench_device, is_quick, measure, neighbours_beyond_ties, pick
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

WL_GOAL_SHAPES = [(256 * 257, 768), (64 * 1025, 1024)]
WL_SHAPES = pick(quick=[(4 * 37, 64), (2 * 65, 128)], full=WL_GOAL_SHAPES, device=DEVICE)
WL_DTYPE = torch.bfloat16 if ON_GPU else torch.float32


def _wl_inputs(rows: int, dim: int):
    g = torch.Generator(device="cpu").manual_seed(0)
    student = torch.randn(rows, dim, generator=g).to(DEVICE, WL_DTYPE).requires_grad_(True)
    teacher = (torch.randn(rows, dim, generator=g) * 2 + 1).to(DEVICE, WL_DTYPE)
    return student, teacher


def _wl_label(impl: str, rows: int, dim: int, dtype: torch.dtype = WL_DTYPE) -> str:
    return f"whitened_loss/{impl}/{str(dtype).split('.')[-1]}/{rows}x{dim}"


for _rows, _dim in WL_GOAL_SHAPES:
    _tri, _bf16 = _wl_label("triton", _rows, _dim, torch.bfloat16), torch.bfloat16
    _shape = f"bf16 [{_rows}, {_dim}]"
    goals.copy_bandwidth(3, f"whitened_loss {_shape} fwd+bwd: >= 80% of copy bandwidth", label=_tri, at_least=0.8)
    goals.speedup(3, f"whitened_loss {_shape}: >= 3x torch eager", label=_tri,
                  anchor=_wl_label("eager", _rows, _dim, _bf16), at_least=3.0)  # fmt: skip
    goals.speedup(3, f"whitened_loss {_shape}: >= 1.3x torch.compile", label=_tri,
                  anchor=_wl_label("compile", _rows, _dim, _bf16), at_least=1.3)  # fmt: skip
    # The step frees the previous gradient first, so a kernel without an extra [rows, D] buffer peaks at about the
    # new gradient's size above the state before the call, i.e. well under one more bf16 [rows, D] buffer.
    goals.peak_below(3, f"whitened_loss {_shape}: no extra [rows, D] buffer (peak memory)", label=_tri,
                     limit_bytes=0.5 * _rows * _dim * 2, limit_text="half a bf16 [rows, D] buffer")  # fmt: skip
    goals.speedup(4, f"whitened_loss {_shape}: ext within 10% of Triton or faster",
                  label=_wl_label("ext", _rows, _dim, _bf16), anchor=_tri, at_least=1 / 1.1)  # fmt: skip


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
        anchor=None if impl == "eager" else [_wl_label(a, rows, dim) for a in ("eager", "compile") if a != impl],
        params={"rows": rows, "dim": dim, "dtype": str(WL_DTYPE)},
    )


# ---------------------------------------------------------------------------------------------------------------
# masked_gather
# ---------------------------------------------------------------------------------------------------------------

MG_GOAL_SHAPE = (64, 257, 768)
MG_SHAPE = pick(quick=(8, 37, 64), full=MG_GOAL_SHAPE, device=DEVICE)


def _mg_label(impl: str, shape: tuple[int, int, int], op: str = "masked_gather") -> str:
    return "{}/{}/{}x{}x{}".format(op, impl, *shape)


goals.copy_bandwidth(3, "masked_gather bf16 half of [64, 257, 768]: >= 80% of copy bandwidth",
                     label=_mg_label("triton", MG_GOAL_SHAPE), at_least=0.8)  # fmt: skip


@pytest.fixture(scope="module")
def masked_data():
    """x [B, N, D], a mask selecting about half the rows, and replacement rows [M, D]."""
    B, N, D = MG_SHAPE
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(B, N, D, generator=g).to(DEVICE, WL_DTYPE)
    mask = (torch.rand(B, N, generator=g) < 0.5).to(DEVICE)
    rows = torch.randn(int(mask.sum()), D, generator=g).to(DEVICE, WL_DTYPE)
    return x, mask, rows


@pytest.mark.parametrize("impl", ["torch_index", "triton", "reference", "ext"])
def test_masked_gather(benchmark, copy_anchor, masked_data, impl):
    x, mask, rows = masked_data
    m, D = rows.shape
    if impl == "torch_index":
        fn = lambda: x[mask]  # noqa: E731
    else:
        _skip_unless_available("masked_gather", impl)
        fn = lambda: ops.masked_gather(x, mask, backend=impl)  # noqa: E731
    measure(
        benchmark,
        fn,
        label=_mg_label(impl, MG_SHAPE),
        group="masked_gather",
        bytes_moved=2.0 * m * D * x.element_size(),  # read and write the selected rows
        anchor=None if impl == "torch_index" else _mg_label("torch_index", MG_SHAPE),
        params={"rows_selected": m, "dim": D},
    )


@pytest.mark.parametrize("impl", ["torch_index_put", "triton", "reference", "ext"])
def test_masked_scatter(benchmark, copy_anchor, masked_data, impl):
    """The inverse: a new [B, N, D] tensor with half its rows replaced (the student's mask tokens put back)."""
    out, mask, rows = masked_data
    if impl == "torch_index_put":

        def fn():
            new = out.clone()
            new[mask] = rows
            return new

    else:
        _skip_unless_available("masked_scatter", impl)
        fn = lambda: ops.masked_scatter(rows, mask, out, backend=impl)  # noqa: E731
    measure(
        benchmark,
        fn,
        label=_mg_label(impl, MG_SHAPE, "masked_scatter"),
        group="masked_scatter",
        bytes_moved=2.0 * out.numel() * out.element_size(),  # read each row once (out's or rows'), write them all
        anchor=None if impl == "torch_index_put" else _mg_label("torch_index_put", MG_SHAPE, "masked_scatter"),
        params={"rows_replaced": rows.shape[0], "dim": rows.shape[1]},
    )


# ---------------------------------------------------------------------------------------------------------------
# attention
# ---------------------------------------------------------------------------------------------------------------

# (B, H, N, d): ViT-B/16 at 224 (N 197) and ViT-S/14 at 224 (N 257) batches, and a long sequence (N 1025).
ATTN_GOAL_SHAPES = [(64, 12, 197, 64), (64, 6, 257, 64), (8, 16, 1025, 64)]
ATTN_SHAPES = pick(quick=[(2, 2, 37, 32)], full=ATTN_GOAL_SHAPES, device=DEVICE)


def _attn_label(impl: str, shape: tuple[int, int, int, int]) -> str:
    return "attention/{}/B{}H{}N{}d{}".format(impl, *shape)


for _shape in ATTN_GOAL_SHAPES:
    _text = "attention bf16 fwd+bwd B{}H{}N{}d{} with [H, N, N] bias".format(*_shape)
    goals.speedup(3, f"{_text}: >= 1.0x SDPA memory-efficient", label=_attn_label("triton", _shape),
                  anchor=_attn_label("sdpa_efficient", _shape), at_least=1.0)  # fmt: skip
    goals.peak_not_above(3, f"{_text}: memory no higher than SDPA memory-efficient",
                         label=_attn_label("triton", _shape), other=_attn_label("sdpa_efficient", _shape))  # fmt: skip


def _sdpa_efficient(q, k, v, bias):
    """torch SDPA restricted to its memory-efficient backend (the one that takes an additive bias with a gradient)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)


@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "B{}H{}N{}d{}".format(*s))
@pytest.mark.parametrize("impl", ["sdpa_efficient", "sdpa", "triton", "reference"])
def test_attention_fwd_bwd(benchmark, shape, impl):
    B, H, N, d = shape
    dtype = torch.bfloat16 if ON_GPU else torch.float32
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v = (torch.randn(B, H, N, d, generator=g).to(DEVICE, dtype).requires_grad_(True) for _ in range(3))
    bias = (torch.randn(H, N, N, generator=g) * 0.5).to(DEVICE, dtype).requires_grad_(True)
    if impl == "triton" and not ON_GPU:
        pytest.skip("the Triton attention kernel is only timed on CUDA (the CPU would run the interpreter)")
    if impl == "sdpa_efficient" and not ON_GPU:
        pytest.skip("SDPA's memory-efficient backend exists on CUDA only")
    if impl == "reference" and ON_GPU and N > 257:
        pytest.skip("the reference materialises [B, H, N, N] fp32 scores; skipped at N > 257 on the GPU")
    grad_out = torch.randn(B, H, N, d, generator=g).to(DEVICE, dtype)
    if impl == "sdpa_efficient":
        fn = _sdpa_efficient
    else:
        fn = lambda q, k, v, bias: ops.attention(q, k, v, bias=bias, backend=impl)  # noqa: E731

    def step():
        for t in (q, k, v, bias):
            t.grad = None
        fn(q, k, v, bias).backward(grad_out)

    measure(
        benchmark,
        step,
        label=_attn_label(impl, shape),
        group=f"attention N{N}",
        flops=3.5 * 4.0 * B * H * N * N * d,
        anchor=[_attn_label(a, shape) for a in ("sdpa_efficient", "sdpa") if a != impl] or None,
        params={"B": B, "H": H, "N": N, "d": d, "dtype": str(dtype), "bias": "[H,N,N] with grad"},
    )


# ---------------------------------------------------------------------------------------------------------------
# knn
# ---------------------------------------------------------------------------------------------------------------

KNN_GOAL = dict(Q=10_000, G=10_000_000, D=768, k=100)
KNN = pick(quick=dict(Q=64, G=20_000, D=64, k=10), full=KNN_GOAL, device=DEVICE)
# Queries checked against a float32 search of the same (fp16) gallery before timing (all of them at quick sizes).
KNN_CHECKED_QUERIES = 256


def _knn_label(impl: str, size: dict) -> str:
    return "knn/{}/Q{Q}G{G}D{D}k{k}".format(impl, **size)


_KNN_TEXT = "knn fp16 Q=1e4 G=1e7 D=768 k=100"
goals.speedup(3, f"{_KNN_TEXT}: >= 1.0x faiss-gpu brute force", label=_knn_label("triton", KNN_GOAL),
              anchor=_knn_label("faiss", KNN_GOAL), at_least=1.0)  # fmt: skip
goals.param_check(3, f"{_KNN_TEXT}: same neighbours as an fp32 search up to fp16 ties",
                  label=_knn_label("triton", KNN_GOAL), key="queries_differing_beyond_ties", ok=lambda n: n == 0)  # fmt: skip
goals.speedup(4, f"{_KNN_TEXT}: ext >= 1.0x faiss-gpu brute force", label=_knn_label("ext", KNN_GOAL),
              anchor=_knn_label("faiss", KNN_GOAL), at_least=1.0)  # fmt: skip


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


@pytest.fixture(scope="module")
def knn_fp32_truth(knn_data):
    """float32 exact search of the first KNN_CHECKED_QUERIES queries over the same gallery (the reference op)."""
    queries, gallery = knn_data
    return reference.knn(queries[:KNN_CHECKED_QUERIES].float(), gallery, KNN["k"])


def _knn_check(result, truth) -> dict:
    """How far a timed implementation's answer is from the fp32 truth, for the record's params."""
    scores, idx = (torch.as_tensor(t)[:KNN_CHECKED_QUERIES].cpu() for t in result)
    ref_scores, ref_idx = (t.cpu() for t in truth)
    return {
        "checked_queries": int(ref_scores.shape[0]),
        "max_abs_score_diff": float((scores.double() - ref_scores.double()).abs().max()),
        # Scores are fp32 sums of fp16 products; a summation-order difference is far below this tolerance.
        "queries_differing_beyond_ties": neighbours_beyond_ties(scores, idx, ref_scores, ref_idx, tol=1e-2),
    }


def _knn_measure(benchmark, fn, impl, queries, gallery, truth, rounds=None, track_memory=True):
    """Time ``fn`` (returning (scores, indices)) after checking its answer against ``truth``."""
    Q, G, D, k = queries.shape[0], gallery.shape[0], queries.shape[1], KNN["k"]
    check = _knn_check(fn(), truth)
    measure(
        benchmark,
        fn,
        label=_knn_label(impl, KNN),
        group="knn",
        flops=2.0 * Q * G * D,
        bytes_moved=float(G) * D * gallery.element_size(),
        anchor=None if impl == "faiss" else _knn_label("faiss", KNN),
        rounds=rounds,
        warmup=0 if not QUICK else None,  # the checked call above was the warm-up
        track_memory=track_memory,
        params={"Q": Q, "G": G, "D": D, "k": k, "dtype": str(gallery.dtype), **check},
    )
    assert check["queries_differing_beyond_ties"] == 0, f"knn/{impl} disagrees with the fp32 search: {check}"


@pytest.mark.parametrize("impl", ["triton", "reference", "ext"])
def test_knn(benchmark, knn_data, knn_fp32_truth, impl):
    queries, gallery = knn_data
    _skip_unless_available("knn", impl)
    if impl == "reference" and not QUICK:
        pytest.skip("the reference streams torch.topk over [Q, chunk] fp32 scores: minutes at goal size")
    _knn_measure(
        benchmark, lambda: ops.knn(queries, gallery, KNN["k"], backend=impl), impl, queries, gallery,
        knn_fp32_truth, rounds=None if QUICK else 3,
    )  # fmt: skip


def test_knn_streamed_from_host(benchmark, knn_data, knn_fp32_truth):
    """The gallery in (pinned-on-the-fly) host memory, streamed with copy/compute overlap."""
    if not ON_GPU or _dispatch.triton_reason("cuda") is not None:
        pytest.skip("streaming host memory to the device needs CUDA and Triton")
    queries, gallery = knn_data
    host = gallery.cpu()
    _knn_measure(
        benchmark, lambda: ops.knn(queries, host, KNN["k"], backend="triton"), "triton_host_stream", queries, host,
        knn_fp32_truth, rounds=None if QUICK else 2,
    )  # fmt: skip


def test_knn_faiss(benchmark, knn_data, knn_fp32_truth):
    """faiss' exact inner-product search: faiss.knn_gpu brute force on the fp16 CUDA tensors, or IndexFlatIP on CPU."""
    import faiss
    import numpy as np

    queries, gallery = knn_data
    k = KNN["k"]
    if ON_GPU:
        if not hasattr(faiss, "StandardGpuResources") or faiss.get_num_gpus() < 1:
            pytest.skip("faiss-gpu is not importable here (faiss-cpu has no GPU index); no faiss anchor on the GPU")
        import faiss.contrib.torch_utils  # noqa: F401 - lets knn_gpu take CUDA tensors (fp16 included)

        res = faiss.StandardGpuResources()
        fn = lambda: faiss.knn_gpu(res, queries, gallery, k, metric=faiss.METRIC_INNER_PRODUCT)  # noqa: E731
    else:
        index = faiss.IndexFlatIP(queries.shape[1])
        index.add(np.ascontiguousarray(gallery.float().numpy()))
        q = np.ascontiguousarray(queries.float().numpy())
        fn = lambda: index.search(q, k)  # noqa: E731
    # faiss allocates outside torch's allocator: its peak memory is not visible to the harness.
    _knn_measure(benchmark, fn, "faiss", queries, gallery, knn_fp32_truth, rounds=None if QUICK else 3,
                 track_memory=False)  # fmt: skip
