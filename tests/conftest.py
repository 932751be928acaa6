"""Hermetic tests: no third-party plugin is autoloaded unless a test installs one on purpose.

Without a GPU, Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET must be set before any
kdforge.kernels module is imported (``@triton.jit`` decides then), so it is set here, before any test module of
any package imports kdforge; on a CUDA machine it is left alone and the compiled kernels are tested.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ["KDFORGE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.setdefault("KDFORGE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "kdforge"))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_registry():
    from kdforge.plugins import reset_registry

    reset_registry()
    yield
    reset_registry()
