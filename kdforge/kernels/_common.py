"""Helpers shared by the Triton kernel modules (host side only)."""

from __future__ import annotations

import contextlib
import os

import torch
import triton

# Fixed when the kernel modules are imported, exactly like @triton.jit decides interpreted vs compiled.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")


def next_pow2(n: int, minimum: int = 1) -> int:
    return max(minimum, triton.next_power_of_2(max(int(n), 1)))


def dot_precision(*tensors: torch.Tensor) -> str:
    """tl.dot input precision: exact IEEE fp32 for fp32 inputs (no silent TF32), native for fp16/bf16."""
    return "ieee" if any(t.dtype in (torch.float32, torch.float64) for t in tensors) else "tf32"


def autotuned(jit_fn, configs, key, **kwargs):
    """An autotuned version of ``jit_fn`` for compiled runs; the plain kernel under the interpreter.

    The interpreter would time every config at CPU speed; it runs the kernel with the launcher's default meta
    parameters instead (the arithmetic is the same in every config).
    """
    if INTERPRET:
        return None
    return triton.autotune(configs=configs, key=key, **kwargs)(jit_fn)


def upcast_dot(*tensors: torch.Tensor) -> bool:
    """True where tl.dot operands must be cast to fp32 first: bfloat16 under the interpreter, whose numpy
    arithmetic has no bfloat16 matrix product (compiled kernels keep bf16 operands and fp32 accumulation)."""
    return INTERPRET and any(t.dtype == torch.bfloat16 for t in tensors)


def device_guard(t: torch.Tensor):
    """Make ``t``'s GPU the current device for a launch: Triton launches on the current device, not the
    tensor's (matters when tensors live on another GPU than the current one)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
