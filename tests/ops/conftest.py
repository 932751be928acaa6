"""Op tests run the Triton kernels in Triton's CPU interpreter, at tiny shapes, when no GPU is present.

TRITON_INTERPRET must be set before any kdforge.kernels module is imported (``@triton.jit`` decides then whether
a kernel is compiled or interpreted); kdforge.ops imports kernels lazily, so setting it here, at collection time,
is early enough even when other test packages imported kdforge.ops before. On a CUDA machine the variable is left
alone so the same tests exercise the compiled kernels.
"""

import os
import zlib

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def gen(request):
    """A fresh, reproducible generator per test case, seeded from the test id (printed, shown on failure)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)
