"""The README's main job: Proteus' smoke profile moves real knowledge from a trained teacher into a random student."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_smoke_profile_distils_knowledge(tmp_path):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "kdforge.cli", "train", str(REPO / "plugins" / "proteus.toml"), "--profile", "smoke",
         "--output-dir", str(out), "--no-progress"], capture_output=True, text=True, timeout=1500,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["student_knn_top1_before"], summary["student_knn_top1_after"]
    assert after >= before + 10, summary
    for key in ("loss/token", "loss/feature", "loss/patch"):
        assert key in summary["final_metrics"]
