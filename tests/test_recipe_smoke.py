"""The shipped recipes' smoke profiles move real knowledge from a trained teacher into a random student: Proteus'
(the README's main job) and FD's (a shared relative position bias through kdforge.ops.attention). The runs are
session fixtures (tests/conftest.py), shared with the tests that start from them."""

import json

import pytest


@pytest.mark.slow
@pytest.mark.parametrize(
    "run, losses",
    [("proteus_smoke_run", ("loss/token", "loss/feature", "loss/patch")), ("fd_smoke_run", ("loss/feature",))],
)
def test_smoke_profile_distils_knowledge(request, run, losses):
    out = request.getfixturevalue(run)
    summary = json.loads((out / "summary.json").read_text())
    before, after = summary["student_knn_top1_before"], summary["student_knn_top1_after"]
    print(f"{run}: kNN top-1 {before:.2f} -> {after:.2f} (teacher {summary.get('teacher_knn_top1')})")
    assert after >= before + 10, summary  # kNN top-1 points
    for key in losses:
        assert key in summary["final_metrics"]
