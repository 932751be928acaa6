"""kdforge._ext as a module: what it reports about the build, and how it behaves when kdforge._C is missing."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from kdforge import _ext


def test_reports_a_working_build():
    assert _ext.available() and _ext.unavailable_reason() is None
    info = _ext.build_info()
    assert info["status"] == "ok"
    assert info["cpu_kernels"].split()[0] in ("AVX2", "DEFAULT")
    from kdforge import _C

    assert _ext.cuda_available() == bool(_C.WITH_CUDA)
    assert info["cuda_kernels"].startswith("yes" if _ext.cuda_available() else "no")
    if not _ext.cuda_available() or not torch.cuda.is_available():
        assert _ext.cuda_unavailable_reason()  # says why, never empty


def test_ops_are_registered_for_cpu_and_cuda_as_built():
    for name in ("whitened_loss", "whitened_loss_backward", "masked_gather", "masked_scatter", "knn"):
        op = getattr(torch.ops.kdforge, name).default
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CPU")
        assert torch._C._dispatch_has_kernel_for_dispatch_key(op.name(), "CUDA") == _ext.cuda_available()


_MISSING = r"""
import json, sys
sys.modules["kdforge._C"] = None  # what Python sees when the extension was never built
from kdforge import _ext
from kdforge.errors import BackendUnavailable
import torch
out = {"available": _ext.available(), "cuda": _ext.cuda_available(), "reason": _ext.unavailable_reason(),
       "info": _ext.build_info()}
try:
    _ext.whitened_loss(torch.randn(2, 3), torch.randn(2, 3))
except BackendUnavailable as exc:
    out["raised"] = str(exc)
print(json.dumps(out))
"""


def _run(code, **env):
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, **env})
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_import_never_raises_without_the_extension():
    out = _run(_MISSING)
    assert out["available"] is False and out["cuda"] is False
    assert "kdforge._C not built" in out["reason"] and "pip install --no-build-isolation -e ." in out["reason"]
    assert out["info"]["status"].startswith("unavailable")
    assert "kdforge._C is not available" in out["raised"]
    out = _run(_MISSING, KDFORGE_NO_EXT="1")
    assert "KDFORGE_NO_EXT=1 at install" in out["reason"]


def test_cuda_tensors_without_cuda_kernels_get_a_clear_error():
    if _ext.cuda_available():
        pytest.skip("this build has the CUDA kernels; test_ext_cuda.py covers CUDA tensors")
    code = r"""
import json
from kdforge import _ext
from kdforge.errors import BackendUnavailable
try:
    _ext._require_device("knn", __import__("torch").device("cuda"))
except BackendUnavailable as exc:
    print(json.dumps(str(exc)))
"""
    msg = _run(code)
    assert "compiled without its CUDA kernels" in msg
