"""Shared helpers of the op tests (imported by name: tests/ops is on sys.path under pytest's prepend mode)."""

from __future__ import annotations

import pytest
import torch

# The device the "triton" backend is tested on: the GPU where present, else the CPU interpreter (tiny shapes).
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
ON_GPU = DEVICE.type == "cuda"

gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs a CUDA device; none is visible to torch on this machine")


def randn(gen, *shape, dtype=torch.float32, device=DEVICE, scale=1.0, shift=0.0, requires_grad=False):
    """Normal random tensor drawn from ``gen`` on the CPU (so CPU and GPU runs see the same numbers)."""
    t = (torch.randn(tuple(shape), generator=gen, dtype=torch.float64) * scale + shift).to(device=device, dtype=dtype)
    return t.requires_grad_(requires_grad)

