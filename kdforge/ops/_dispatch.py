"""Backend choice for kdforge ops: which backends can run here, and what ``backend="auto"`` means.

Backends: "reference" (pure PyTorch, always), "triton" (kdforge/kernels; CUDA, or the CPU under the Triton
interpreter when TRITON_INTERPRET=1 was set before kdforge imported its kernels, for tests), "ext" (the compiled
kdforge._C through kdforge._ext), and for attention also "sdpa" (torch's scaled_dot_product_attention) and
"xformers" (memory_efficient_attention, where installed). ``auto`` never picks the Triton interpreter: on CUDA it
prefers Triton, on the CPU the compiled extension, else the reference (SDPA for attention). Attention refines
``auto`` with what only its inputs tell (a bias, the dtype, the head dim): :func:`kdforge.ops.attn.auto_backend`.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

import torch

from kdforge.errors import BackendUnavailable

OPS = ("whitened_loss", "masked_gather", "masked_scatter", "attention", "knn")
COMMON_BACKENDS = ("auto", "reference", "triton", "ext")
ATTENTION_BACKENDS = COMMON_BACKENDS + ("sdpa", "xformers")

EXT_BUILD_HINT = "Build it with `pip install --no-build-isolation -e .`"


def interpreter_requested() -> bool:
    """True when Triton kernels are (to be) built for the CPU interpreter (tests only)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


_TRITON_IMPORT: dict[str, str | None] = {}  # filled once; a plain dict so torch.compile reads it as a constant


def _triton_import_error() -> str | None:
    if "error" not in _TRITON_IMPORT:
        try:
            import triton  # noqa: F401
            import triton.language  # noqa: F401
        except Exception as exc:  # noqa: BLE001 - a broken install raises anything; we only report it
            _TRITON_IMPORT["error"] = (
                f"triton cannot be imported ({type(exc).__name__}: {exc}); install it with `pip install triton`"
            )
        else:
            _TRITON_IMPORT["error"] = None
    return _TRITON_IMPORT["error"]


def triton_reason(device_type: str) -> str | None:
    """None if Triton kernels can run on tensors of ``device_type``, else why not."""
    err = _triton_import_error()
    if err is not None:
        return err
    if device_type == "cuda":
        if not torch.cuda.is_available():
            return "no CUDA device is visible to torch"
        return None
    if interpreter_requested():
        return None
    return (
        f"Triton kernels run on CUDA tensors; these are on {device_type}. Move the inputs to a GPU, pick "
        "backend='reference' (or 'ext'), or set TRITON_INTERPRET=1 before importing kdforge to run the kernels "
        "in Triton's (slow, testing-only) CPU interpreter"
    )


def _ext_module(device_type: str = "cpu") -> tuple[Any | None, str | None]:
    try:
        ext = importlib.import_module("kdforge._ext")
    except Exception as exc:  # noqa: BLE001 - any failure means the extension cannot be used
        return None, f"kdforge._ext could not be imported ({type(exc).__name__}: {exc})"
    try:
        if not ext.available():
            return None, ext.unavailable_reason() or "kdforge._ext reports it is unavailable"
        if device_type == "cuda" and hasattr(ext, "cuda_available") and not ext.cuda_available():
            why = getattr(ext, "cuda_unavailable_reason", lambda: None)() or "it was compiled without CUDA kernels"
            return None, f"kdforge._C has no CUDA kernels ({why})"
    except Exception as exc:  # noqa: BLE001
        return None, f"kdforge._ext.available() failed ({type(exc).__name__}: {exc})"
    return ext, None


def ext_reason(device_type: str = "cpu") -> str | None:
    """None if the compiled extension can run on ``device_type`` tensors, else why not."""
    return _ext_module(device_type)[1]


def ext_module(device_type: str = "cpu") -> Any:
    """kdforge._ext, or BackendUnavailable saying how to build it."""
    ext, reason = _ext_module(device_type)
    if ext is None:
        raise BackendUnavailable(f"kdforge._C is not built: {reason}. {EXT_BUILD_HINT}")
    return ext


def ext_for_call() -> Any:
    """kdforge._ext after :func:`resolve` chose "ext" (it imported and checked the module already).

    A plain sys.modules lookup, which torch.compile can trace (importlib calls it cannot).
    """
    ext = sys.modules.get("kdforge._ext")
    return ext if ext is not None else ext_module()


def xformers_reason() -> str | None:
    try:
        import xformers.ops  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        return (
            f"xformers is not usable here ({type(exc).__name__}: {exc}); install a build matching this torch "
            "(`pip install xformers`) or pick backend='triton', 'sdpa' or 'reference'"
        )
    return None


def check_backend_name(op: str, backend: str) -> None:
    allowed = ATTENTION_BACKENDS if op == "attention" else COMMON_BACKENDS
    if backend not in allowed:
        raise ValueError(f"{op}: backend must be one of {', '.join(repr(b) for b in allowed)}, got {backend!r}")


def resolve(op: str, backend: str, device: torch.device) -> str:
    """The concrete backend ``op`` runs with for a requested ``backend`` and the inputs' ``device``.

    Explicit requests are honoured or refused with BackendUnavailable (never silently replaced); ``auto`` picks
    the fastest backend that can run here and never the Triton interpreter. Under torch.compile the choice is
    made once at trace time and baked into the graph as a constant.
    """
    return _resolve(op, backend, device.type)


# torch.compile evaluates the choice while tracing instead of tracing into imports and availability probes.
_constant_under_compile = getattr(torch.compiler, "assume_constant_result", lambda fn: fn)


@_constant_under_compile
def _resolve(op: str, backend: str, dev: str) -> str:
    check_backend_name(op, backend)
    if backend == "reference":
        return "reference"
    if backend == "auto":
        if dev == "cuda" and _triton_import_error() is None:
            return "triton"
        if op == "attention":
            return "sdpa"
        if ext_reason(dev) is None:
            return "ext"
        return "reference"
    if backend == "triton":
        reason = triton_reason(dev)
        if reason is not None:
            raise BackendUnavailable(f"{op}: backend='triton' cannot run here: {reason}")
        return "triton"
    if backend == "ext":
        if op == "attention":
            raise BackendUnavailable(
                "attention: backend='ext' does not exist: kdforge._C has no compiled attention kernel. Use "
                "backend='triton' (CUDA), 'sdpa', 'xformers' or 'reference'"
            )
        ext_module(dev)  # raises with the build hint
        return "ext"
    if backend == "xformers":
        reason = xformers_reason()
        if reason is not None:
            raise BackendUnavailable(f"attention: backend='xformers' cannot run here: {reason}")
        if dev != "cuda":
            raise BackendUnavailable("attention: backend='xformers' needs CUDA tensors; got tensors on " + dev)
        return "xformers"
    return backend  # "sdpa": torch's own dispatch runs on every device


def available_backends() -> dict[str, dict[str, str | None]]:
    """For every op, every backend -> None if it can run on this machine, else the reason it cannot.

    "triton" is judged for CUDA tensors when a GPU is present, else for CPU tensors (interpreter only).
    """
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    triton = triton_reason(dev)
    ext = ext_reason(dev)
    ext_msg = None if ext is None else f"kdforge._C is not built: {ext}. {EXT_BUILD_HINT}"
    table: dict[str, dict[str, str | None]] = {}
    for op in OPS:
        row: dict[str, str | None] = {"reference": None, "triton": triton}
        if op == "attention":
            row["ext"] = "kdforge._C has no compiled attention kernel"
            row["sdpa"] = None
            row["xformers"] = xformers_reason() or (None if dev == "cuda" else "xformers needs a CUDA device")
        else:
            row["ext"] = ext_msg
        table[op] = row
    return table
