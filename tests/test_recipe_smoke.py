"""The shipped recipes' smoke profiles move real knowledge from a trained teacher into a random student: Proteus'
(the README's main job) and FD's (a shared relative position bias through kdforge.ops.attention)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.parametrize(
    "recipe, losses",
    [("proteus.toml", ("loss/token", "loss/feature", "loss/patch")), ("fd.toml", ("loss/feature",))],
)
def test_smoke_profile_distils_knowledge(tmp_path, recipe, losses):
    out = tmp_path / "run"
    res = subprocess.run(
        [sys.executable, "-m", "kdforge.cli", "train", str(REPO / "plugins" / recipe), "--profile", "smoke",
         "--output-dir", str(out), "--no-progress"], capture_output=True, text=True, timeout=1500,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["student_knn_top1_before"], summary["student_knn_top1_after"]
    assert after >= before + 10, summary  # kNN top-1 points
    for key in losses:
        assert key in summary["final_metrics"]
