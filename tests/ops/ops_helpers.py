"""Shared helpers of the op tests (imported by name: tests/ops is on sys.path under pytest's prepend mode)."""

from __future__ import annotations

import pytest
import torch

# The device the "triton" backend is tested on: the GPU where present, else the CPU interpreter (tiny shapes).
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"

gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device; none is visible to torch on this machine")

# Tolerances per input dtype (absolute, relative) for results computed with fp32 accumulation.
TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def randn(gen, *shape, dtype=torch.float32, device=DEVICE, scale=1.0, shift=0.0, requires_grad=False):
    """Normal random tensor drawn from ``gen`` on the CPU (so CPU and GPU runs see the same numbers)."""
    t = (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)


def close(actual, expected, dtype, *, factor=1.0, msg=""):
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(
        actual.double().cpu(), expected.double().cpu(), atol=atol * factor, rtol=rtol * factor, msg=msg or None
    )
