"""Fixtures for the kdforge._C tests.

Every test here needs the built extension. Without it the tests are skipped with the reason printed, except on CI
(CI=true), where building it is part of the job: there they fail, so a broken build cannot pass as "skipped".
Tests marked ``gpu`` also need the CUDA kernels and a visible GPU, else they are skipped with the reason.
"""

from __future__ import annotations

import os
import zlib

import pytest
import torch

from kdforge import _ext


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture(autouse=True)
def _require_ext(request):
    if not _ext.available():
        reason = f"kdforge._C is not available: {_ext.unavailable_reason()}"
        if _on_ci():
            pytest.fail(f"{reason} (CI=true: the extension must be built before the tests run)", pytrace=False)
        pytest.skip(reason)
    if request.node.get_closest_marker("gpu") is not None:
        why = _ext.cuda_unavailable_reason()
        if why is not None:
            pytest.skip(f"needs the CUDA kernels on a GPU: {why}")


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded from the test id: fresh data per case, reproducible per case."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))
