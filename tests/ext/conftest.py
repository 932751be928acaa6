"""Fixtures for the kdforge._C tests.

Every test here needs the built extension. Without it the tests are skipped with the reason printed, except on CI
(CI=true), where building it is part of the job: there they fail, so a broken build cannot pass as "skipped".
Tests marked ``gpu`` also need the CUDA kernels and a visible GPU, else they are skipped with the reason.
"""

from __future__ import annotations

import pytest

from kdforge import _ext


@pytest.fixture(autouse=True)
def _require_ext(request, require_ext):
    """Every test here needs kdforge._C (the root conftest's require_ext); ``gpu`` tests also its CUDA kernels."""
    if request.node.get_closest_marker("gpu") is not None:
        why = _ext.cuda_unavailable_reason()
        if why is not None:
            pytest.skip(f"needs the CUDA kernels on a GPU: {why}")
