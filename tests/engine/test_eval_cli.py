"""``kdforge eval RUN_DIR``: a run's checkpoint evaluated again, with the recipe's evaluators or overridden ones."""

from __future__ import annotations

import json

from cli_helpers import TINY, kdforge

EVAL = [
    "--set", "eval.data={plugin = 'procedural', num_train = 40, num_val = 20, image_size = 16}",
    "--set", "eval.evaluators={knn = {plugin = 'knn', k = 5}}",
]  # fmt: skip


def test_eval_reproduces_the_runs_own_evaluation_and_takes_overrides(tmp_path):
    run = tmp_path / "run"
    res = kdforge("train", TINY, "--output-dir", run, "--no-progress", "--set", "train.max_steps=3", *EVAL)
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())

    res = kdforge("eval", run)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((run / "eval_last.json").read_text())
    assert report["features"] == "cls" and report["checkpoint"].endswith("last.pt")
    # The same weights, data and evaluator as the run's "after" evaluation: the same numbers.
    assert report["student_knn_top1"] == summary["student_knn_top1_after"]
    assert report["teacher_knn_top1"] == summary["teacher_knn_top1"]

    out = tmp_path / "mean_patch.json"
    res = kdforge("eval", run, "--no-teacher", "--set", "eval.features='mean_patch'", "--out", out)
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["features"] == "mean_patch" and not any(k.startswith("teacher_") for k in report)
    assert 0.0 <= report["student_knn_top1"] <= 100.0


def test_eval_errors_name_the_fix(tmp_path):
    run = tmp_path / "run"
    res = kdforge("train", TINY, "--output-dir", run, "--no-progress", "--set", "train.max_steps=1")
    assert res.returncode == 0, res.stderr[-3000:]
    res = kdforge("eval", run)  # tiny.toml has no evaluation data
    assert res.returncode == 2 and "no [eval.data] or [eval.evaluators]" in res.stderr and "--set" in res.stderr
    res = kdforge("eval", run, "--checkpoint", run / "nope.pt")
    assert res.returncode == 2 and "no checkpoint at" in res.stderr
    res = kdforge("eval", run, "--set", "eval.featurs='cls'")
    assert res.returncode == 2 and "did you mean 'features'" in res.stderr
