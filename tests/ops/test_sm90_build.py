"""The compiled (GPU) side of every Triton kernel, checked without a GPU: build each one for sm_90 with ptxas.

The interpreter tests run the kernels' arithmetic as numpy code; typing, layout and lowering errors of the real
compiler only show when the kernels are built for a GPU. tests/ops/sm90_build.py does that in a fresh process
(without TRITON_INTERPRET, which this test session sets); here with one config per kernel.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest


def test_kernels_build_for_sm90():
    try:
        from triton.backends.nvidia.compiler import get_ptxas  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"triton's NVIDIA backend (ptxas) is not usable here: {type(exc).__name__}: {exc}")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(root) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("sm90_build.py")), "--quick"],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        timeout=900,
    )
    print(proc.stdout[-6000:], proc.stderr[-3000:])
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "all kernels built for sm_90" in proc.stdout
