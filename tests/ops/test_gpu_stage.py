"""On a GPU machine the whole kernel test grid runs on the GPU, not only the large-shape ``gpu`` tests.

The interpreter runs the Triton kernels as numpy code on this CPU; masks, strides, NaN, ties, every bias shape,
opcheck and torch.compile are only checked on the compiled kernels when a GPU session runs these same tests there.
That session runs ``bash .ci/gpu test``: here its pytest command is recorded (a stand-in python records it and
runs nothing) and collected, and must select every test of tests/ops and tests/ext.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from ops_helpers import DEVICE

REPO = Path(__file__).resolve().parents[2]
GRID = ("tests/ops", "tests/ext")

# Records the arguments of `python -m pytest ...`, skips `python -m pip ...` (the wheel install), runs the rest.
_STAND_IN = """#!/usr/bin/env bash
if [ "$1" = -m ] && [ "$2" = pytest ]; then shift 2; printf '%s\\n' "$@" > "{args}"; exit 0; fi
if [ "$1" = -m ] && [ "$2" = pip ]; then exit 0; fi
exec "{python}" "$@"
"""

# A pytest plugin writing what a session selected and deselected once collection is final.
_PROBE = """
import json, os
_deselected = []
def pytest_deselected(items):
    _deselected.extend(item.nodeid for item in items)
def pytest_collection_finish(session):
    with open(os.environ["KDFORGE_STAGE_PROBE"], "w") as f:
        json.dump({"selected": [item.nodeid for item in session.items], "deselected": _deselected}, f)
"""


def _gpu_stage_pytest_args(tmp_path: Path) -> list[str]:
    args = tmp_path / "pytest-args"
    stand_in = tmp_path / "python"
    stand_in.write_text(_STAND_IN.format(args=args, python=sys.executable))
    stand_in.chmod(0o755)
    env = {**os.environ, "PYTHON": str(stand_in), "OUT": str(tmp_path / "out")}
    proc = subprocess.run(["bash", str(REPO / ".ci" / "gpu"), "test"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert args.exists(), f".ci/gpu test ran no pytest command:\n{proc.stdout[-3000:]}"
    return args.read_text().splitlines()


def test_gpu_stage_selects_every_kernel_test(tmp_path):
    args = _gpu_stage_pytest_args(tmp_path)
    (tmp_path / "stage_probe.py").write_text(_PROBE)
    report = tmp_path / "collected.json"
    env = {**os.environ, "KDFORGE_STAGE_PROBE": str(report),
           "PYTHONPATH": os.pathsep.join([str(tmp_path), str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "pytest", *args, "--collect-only", "-p", "stage_probe"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    collected = json.loads(report.read_text())
    assert not collected["deselected"], (
        f".ci/gpu test deselects {len(collected['deselected'])} kernel tests (pytest {' '.join(args)}), e.g. "
        f"{collected['deselected'][:3]}: the whole grid must run on the GPU"
    )
    files = {nodeid.split("::")[0] for nodeid in collected["selected"]}
    expected = {str(p.relative_to(REPO)) for d in GRID for p in sorted((REPO / d).glob("test_*.py"))}
    assert expected <= files, f".ci/gpu test leaves out {sorted(expected - files)} (pytest {' '.join(args)})"


def test_triton_tests_run_compiled_kernels_where_cuda_is_visible():
    """tests/conftest.py turns the interpreter on only without CUDA; the op tests' tensors follow the device."""
    interpreted = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if torch.cuda.is_available():
        assert not interpreted and DEVICE.type == "cuda", (os.environ.get("TRITON_INTERPRET"), DEVICE)
    else:
        assert interpreted and DEVICE.type == "cpu", (os.environ.get("TRITON_INTERPRET"), DEVICE)
