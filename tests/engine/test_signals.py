"""SIGTERM as clusters send it (issue 9, item 11): to the whole process group, DataLoader workers included, at any
moment of a run (training, evaluation, start-up, a teacher's first-use training). The run stops promptly with exit
code 0, a checkpoint where there is training state, and nothing left behind where there is none."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path


from kdforge.engine import checkpoint as ckpt

from cli_helpers import TINY, kdforge

CRASH = Path(__file__).resolve().parent / "crash"
EVAL = ["--set", "eval.data={plugin = 'procedural', num_train = 64, num_val = 32, image_size = 16}",
        "--set", "eval.evaluators={knn = {plugin = 'knn', k = 3}}"]


def run_in_own_group(*args, cwd=None, timeout=600, **hooks) -> tuple[subprocess.CompletedProcess, float]:
    """``kdforge ARGS`` as a job of its own process group (so a SIGTERM to the group reaches it and its workers
    only), with the crash hooks of tests/engine/crash set from ``hooks``; returns the result and how many seconds
    passed between the SIGTERM and the end of the process (from the hook's record)."""
    env = {**os.environ, **{f"KDFORGE_TEST_{k.upper()}": str(v) for k, v in hooks.items()}}
    stamp = Path(cwd or ".").resolve() / ".sigterm_sent"
    env["KDFORGE_TEST_SIGTERM_STAMP"] = str(stamp)
    res = kdforge(*args, env=env, timeout=timeout, cwd=cwd, hooks=CRASH, new_session=True)
    ended = time.time()
    took = ended - float(stamp.read_text()) if stamp.exists() else float("nan")
    stamp.unlink(missing_ok=True)
    return res, took


def test_sigterm_to_the_process_group_with_workers_checkpoints_and_exits_0(tmp_path):
    run = tmp_path / "run"
    res, took = run_in_own_group("train", TINY, "--output-dir", run, "--no-progress", "--set", "train.num_workers=2",
                                 sigterm_at_step=4, sigterm_group=1, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SIGTERM at step 4" in res.stderr and "--resume" in res.stderr and "Traceback" not in res.stderr
    assert ckpt.load_run(run / "last.pt")["step"] == 4
    assert took < 60


def test_sigterm_during_the_first_evaluation_stops_promptly_and_leaves_nothing(tmp_path):
    run = tmp_path / "run"
    res, took = run_in_own_group("train", TINY, "--output-dir", run, "--no-progress", *EVAL,
                                 sigterm_at_check="evaluation", sigterm_group=1, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SIGTERM during the before evaluation" in res.stderr and "nothing to resume" in res.stderr
    assert not run.exists()  # no training state: the directory is left as it was found (absent)
    assert took < 30


def test_sigterm_during_an_epoch_evaluation_checkpoints_the_training_state(tmp_path):
    run = tmp_path / "run"
    hooks = dict(sigterm_at_check="evaluation", sigterm_group=1)
    # eval.before = false: the first evaluation is the one at the end of epoch 1 (step 6), with training state
    res, _ = run_in_own_group("train", TINY, "--output-dir", run, "--no-progress", *EVAL, "--set", "eval.before=false",
                              "--set", "eval.every_epochs=1", cwd=tmp_path, **hooks)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SIGTERM during the epoch1 evaluation" in res.stderr
    state = ckpt.load_run(run / "last.pt")
    assert state["step"] == 6 and state["epoch"] == 1 and state["batch_in_epoch"] == 0
    res, _ = run_in_own_group("train", TINY, "--output-dir", run, "--no-progress", *EVAL, "--set", "eval.before=false",
                              "--set", "eval.every_epochs=1", "--resume", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert json.loads((run / "summary.json").read_text())["steps"] == 18


def test_sigterm_during_a_first_use_teacher_training_stops_promptly(tmp_path):
    cache = tmp_path / "cache"
    teacher = ("teacher={plugin = 'embedded', epochs = 50, cache_dir = '%s', progress = false, "
               "data = {plugin = 'procedural', num_train = 2000, num_val = 100}}" % cache)
    res, took = run_in_own_group("train", TINY, "--output-dir", tmp_path / "run", "--no-progress", "--set", teacher,
                                 "--set", "augment.image_size=32",
                                 "--set", "student.model_kwargs={img_size = 32, patch_size = 4, embed_dim = 24, "
                                 "depth = 1, num_heads = 2}",
                                 sigterm_at_check="embedded teacher", sigterm_group=1, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "SIGTERM during the first-use training of the embedded teacher" in res.stderr
    assert "nothing was written" in res.stderr
    assert not (tmp_path / "run").exists()
    assert not list(cache.rglob("*.safetensors"))  # no half-trained teacher in the cache
    assert took < 30
