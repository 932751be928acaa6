"""The compiled backend (``backend="ext"``): Python entry points over the kdforge._C operators.

``import kdforge._C`` loads the shared object built from csrc/ by setup.py, which registers the schemas and the
CPU/CUDA kernels as ``torch.ops.kdforge.*``. This module adds what the C++ side leaves to Python, next to the
functions that call the ops: fake (meta) kernels so torch.compile can trace them, and the autograd formulas of
masked_gather / masked_scatter (whitened_loss's is in C++, where its per-call overhead is lower).

Importing this module never raises: when the extension is missing or broken, :func:`available` is False and
:func:`unavailable_reason` says why (the public ops in kdforge.ops then fall back to their other backends).
Calling one of the functions below without the extension raises BackendUnavailable.

The argument checks live in C++ (every TORCH_CHECK names the argument, what was expected and what came); the
public wrappers in kdforge.ops check again with kdforge's own error types before they get here.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor

from kdforge.errors import BackendUnavailable

__all__ = [
    "available",
    "unavailable_reason",
    "cuda_available",
    "cuda_unavailable_reason",
    "build_info",
    "whitened_loss",
    "masked_gather",
    "masked_scatter",
    "knn",
]

_BUILD_HINT = "build it with `pip install --no-build-isolation -e .` (add -v to see the compiler output)"

_C: Any = None
_REASON: str | None = None


def _load() -> None:
    global _C, _REASON
    try:
        from kdforge import _C as compiled  # noqa: N811 - the extension's module name
    except ModuleNotFoundError as exc:
        if exc.name not in ("kdforge._C", "_C"):
            _REASON = f"importing kdforge._C failed: {type(exc).__name__}: {exc}"
        elif os.environ.get("KDFORGE_NO_EXT", "").strip().lower() in ("1", "true", "yes"):
            _REASON = f"kdforge._C not built (KDFORGE_NO_EXT=1 at install); unset it and {_BUILD_HINT}"
        else:
            _REASON = f"kdforge._C not built (it is skipped when KDFORGE_NO_EXT=1 at install); {_BUILD_HINT}"
        return
    except Exception as exc:  # noqa: BLE001 - e.g. OSError "undefined symbol" after a torch upgrade
        _REASON = (
            f"kdforge._C is built but cannot be loaded ({type(exc).__name__}: {exc}); it was probably compiled "
            f"against another torch than {torch.__version__}: rebuild, {_BUILD_HINT}"
        )
        return
    try:
        _register(torch.library)
    except Exception as exc:  # noqa: BLE001 - a torch.library API change must not break `import kdforge`
        _REASON = f"kdforge._C loaded but registering its fake/autograd kernels failed ({type(exc).__name__}: {exc})"
        return
    _C = compiled


def available() -> bool:
    """True when kdforge._C is built, loads, and its ops are registered."""
    return _C is not None


def unavailable_reason() -> str | None:
    """None when :func:`available`, else one sentence saying why not and what to do."""
    return None if _C is not None else _REASON


def cuda_available() -> bool:
    """True when kdforge._C was compiled with its CUDA kernels (whether or not a GPU is visible right now)."""
    return _C is not None and bool(getattr(_C, "WITH_CUDA", 0))


def cuda_unavailable_reason() -> str | None:
    """None when the CUDA kernels can run here (compiled in and a GPU visible), else why not."""
    if _C is None:
        return _REASON
    if not cuda_available():
        return (
            "kdforge._C was compiled without its CUDA kernels (torch was a CPU build, nvcc was not found, or "
            "KDFORGE_FORCE_CUDA=0); rebuild with nvcc on PATH or CUDA_HOME set"
        )
    if not torch.cuda.is_available():
        return "kdforge._C has CUDA kernels but torch sees no CUDA device"
    return None


def build_info() -> dict[str, str]:
    """What was compiled, for ``kdforge info``: CPU kernel builds and the one in use, CUDA and its archs."""
    if _C is None:
        return {"status": f"unavailable: {_REASON}"}
    return {
        "status": "ok",
        "cpu_kernels": f"{_C.CPU_KERNEL_ISA} (compiled: {_C.CPU_KERNEL_BUILDS}; ATEN_CPU_CAPABILITY picks)",
        "cuda_kernels": f"yes (TORCH_CUDA_ARCH_LIST={_C.CUDA_ARCH_LIST})" if cuda_available() else "no",
    }


def _require() -> None:
    if _C is None:
        raise BackendUnavailable(f"kdforge._C is not available: {_REASON}")


def _require_device(op: str, device: torch.device) -> None:
    """BackendUnavailable for CUDA tensors when the CUDA kernels were not compiled in (instead of the
    dispatcher's "could not run ... with arguments from the 'CUDA' backend")."""
    _require()
    if device.type == "cuda" and not cuda_available():
        raise BackendUnavailable(f"{op}: {cuda_unavailable_reason()}; use backend='triton' or 'reference' on GPU")


# ---------------------------------------------------------------------------------------------------------------
# Public functions (the "ext" backend of kdforge.ops)
# ---------------------------------------------------------------------------------------------------------------


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
) -> Tensor:
    """Fused (whitened) smooth-L1 / MSE between student and teacher: Tensor[..., D]; loss and dS in one pass.

    The teacher is normalised per row by a LayerNorm without affine when ``whiten``; ``index``: LongTensor[M] of
    flat row positions of ``student.reshape(-1, D)`` restricts the loss to those rows (no gather first).
    ``reduction``: "mean" over the selected elements (0 for an empty selection), "sum", or "none" (per-row sums:
    Tensor[...] without index, Tensor[M] with it). Returns float32 (float64 for float64 inputs), differentiable in
    ``student`` only. Mixed dtypes are computed in the promoted dtype; the gradient comes back in the student's.
    """
    _require_device("whitened_loss", student.device)
    if student.dtype != teacher.dtype:
        common = torch.promote_types(student.dtype, teacher.dtype)
        student, teacher = student.to(common), teacher.to(common)
    out = torch.ops.kdforge.whitened_loss(
        student, teacher.detach(), index, loss, float(beta), bool(whiten), float(eps), reduction
    )[0]
    if reduction == "none" and index is None:
        out = out.reshape(student.shape[:-1])
    return out


def _as_bnd(x: Tensor) -> Tensor:
    """x: Tensor[..., D] as the ops' [B, N, D]: a 3-D tensor as is (any strides), else flattened to [1, L, D]."""
    return x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])


def masked_gather(x: Tensor, mask: Tensor) -> Tensor:
    """Rows of x: Tensor[B, N, D] (or any [..., D]) where mask: BoolTensor[B, N] (x.shape[:-1]) is true, in
    row-major order -> Tensor[M, D]. Differentiable in x (the backward scatters into zeros)."""
    _require_device("masked_gather", x.device)
    return torch.ops.kdforge.masked_gather(_as_bnd(x), mask.reshape(_as_bnd(x).shape[:2]))


def masked_scatter(rows: Tensor, mask: Tensor, out: Tensor) -> Tensor:
    """A new tensor equal to out: Tensor[B, N, D] (or any [..., D]) with the rows where mask is true replaced by
    rows: Tensor[M, D], in row-major order; ``out`` is not modified. Differentiable in rows and out."""
    _require_device("masked_scatter", out.device)
    o = _as_bnd(out)
    return torch.ops.kdforge.masked_scatter(rows, mask.reshape(o.shape[:2]), o).reshape(out.shape)


def knn(
    queries: Tensor, gallery: Any, k: int, *, metric: str = "ip", chunk_size: int | None = None
) -> tuple[Tensor, Tensor]:
    """Exact k nearest gallery rows per query, best first, ties to the lower gallery index.

    queries: Tensor[Q, D]; gallery: Tensor[G, D] on the queries' device or the CPU (streamed chunk by chunk to the
    GPU), or a numpy array / np.memmap [G, D] (read in place, chunk by chunk). metric "ip": largest inner product
    first; "l2": smallest squared distance first (reported squared). Returns (scores Tensor[Q, k] float32 (float64
    for float64 queries on the CPU), indices LongTensor[Q, k]). Not differentiable.
    """
    _require_device("knn", queries.device)
    if not isinstance(gallery, Tensor):
        gallery = _numpy_gallery(gallery)
    return torch.ops.kdforge.knn(queries.detach(), gallery.detach(), int(k), metric, chunk_size)


def _numpy_gallery(gallery: Any) -> Tensor:
    import warnings

    import numpy as np

    if not isinstance(gallery, np.ndarray):
        raise TypeError(f"knn: gallery must be a torch.Tensor or a numpy array [G, D], got {type(gallery).__name__}")
    with warnings.catch_warnings():
        # A read-only memmap is fine: the kernel only reads it.
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(gallery)


# ---------------------------------------------------------------------------------------------------------------
# Fake kernels and autograd formulas (registered once kdforge._C has loaded)
# ---------------------------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register(lib: Any) -> None:
    ops = torch.ops.kdforge

    @lib.register_fake("kdforge::whitened_loss")
    def _(student, teacher, index, loss, beta, whiten, eps, reduction):
        dim = student.shape[-1]
        n = index.shape[0] if index is not None else student.numel() // dim
        acc = _acc_dtype(student.dtype)
        loss_shape = (n,) if reduction == "none" else ()
        grad_shape = (n, dim) if index is not None else student.shape
        return student.new_empty(loss_shape, dtype=acc), student.new_empty(grad_shape)

    @lib.register_fake("kdforge::whitened_loss_backward")
    def _(grad_loss, grad_rows, index, student_shape):
        return grad_rows.new_empty(student_shape)

    @lib.register_fake("kdforge::masked_gather")
    def _(x, mask):
        m = torch.library.get_ctx().new_dynamic_size()
        return x.new_empty((m, x.shape[2]))

    @lib.register_fake("kdforge::masked_scatter")
    def _(rows, mask, out):
        return out.new_empty(out.shape)

    @lib.register_fake("kdforge::knn")
    def _(queries, gallery, k, metric, chunk_size):
        q = queries.shape[0]
        scores = queries.new_empty((q, k), dtype=_acc_dtype(queries.dtype))
        return scores, queries.new_empty((q, k), dtype=torch.long)

    # whitened_loss's autograd is registered in C++ (csrc/ops/whitened_loss/autograd): the Python path would cost
    # ~0.3 ms per call, a third of the fused kernel's time at the sizes it is used for.

    # masked_gather <-> masked_scatter are each other's backward (so double backward works too).
    def gather_setup(ctx, inputs, output):
        x, mask = inputs
        ctx.x_shape, ctx.x_dtype = x.shape, x.dtype
        ctx.save_for_backward(mask)

    def gather_backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        zeros = grad.new_zeros(ctx.x_shape)
        return ops.masked_scatter(grad.contiguous(), mask, zeros), None

    lib.register_autograd("kdforge::masked_gather", gather_backward, setup_context=gather_setup)

    def scatter_setup(ctx, inputs, output):
        rows, mask, _ = inputs
        ctx.rows_shape = rows.shape
        ctx.save_for_backward(mask)

    def scatter_backward(ctx, grad):
        (mask,) = ctx.saved_tensors
        grad_rows = grad_out = None
        if ctx.needs_input_grad[0]:
            grad_rows = ops.masked_gather(grad, mask)
        if ctx.needs_input_grad[2]:
            # The masked rows of out were overwritten, so they get no gradient.
            grad_out = ops.masked_scatter(grad.new_zeros(ctx.rows_shape), mask, grad)
        return grad_rows, None, grad_out

    lib.register_autograd("kdforge::masked_scatter", scatter_backward, setup_context=scatter_setup)


_load()
