"""The train-step benchmark (benchmarks/train_step.py) runs its tiny size end to end on a CPU: three
configurations with figures, and the issue 14 goal reported unmeasured without a GPU record."""

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import goals, train_step  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU harness run (a GPU runs the full size)")
def test_tiny_step_benchmark_writes_the_three_configurations(tmp_path, monkeypatch, capsys):
    torch.set_num_threads(2)
    out = tmp_path / "train_step_cpu.json"
    # Two steps per configuration besides the one that counts FLOPs and syncs: one warm-up, one timed round.
    assert train_step.main(["--out", str(out), "--rounds", "1", "--calls", "1", "--warmup", "1"]) == 0
    printed = capsys.readouterr().out
    assert train_step.NO_CUDA in printed

    payload = json.loads(out.read_text())
    assert payload["skipped"] == train_step.NO_CUDA and payload["size"]["name"] == "tiny"
    assert payload["environment"]["torch"] == torch.__version__ and "date" in payload["environment"]
    configs = {c["config"]: c for c in payload["configs"]}
    assert sorted(configs) == sorted(train_step.CONFIGS)
    for name, c in configs.items():
        assert c["img_per_s"] > 0 and c["step_median_s"] > 0, name
        assert isinstance(c["syncs_per_step"], int) and c["syncs_per_step"] >= 0, name
        assert c["mfu"] is None and c["cuda_syncs_per_step"] is None, name  # no peak FLOP/s or sync mode on a CPU
        assert c["flops_per_step"] > 0, name
    # The released loop reads its loss on the host every step (loss.item()); the counter must see it.
    assert configs["proteus_released_loop"]["syncs_per_step"] >= 1
    assert {r["label"] for r in payload["records"]} == {train_step.label(train_step.SIZES["tiny"], c)
                                                         for c in train_step.CONFIGS}

    # The goal: unmeasured from CPU figures, in the JSON and when the JSON is judged again.
    assert [(g["issue"], g["status"]) for g in payload["goals"]] == [(14, goals.UNMEASURED)]
    assert goals.main([str(out)]) == 0
    verdict = [line for line in capsys.readouterr().out.splitlines() if "issue 14" in line]
    assert len(verdict) == 1 and verdict[0].startswith(f"[{goals.UNMEASURED:>10}]"), verdict


def test_goal_is_never_met_from_cpu_records():
    """Even full-size labels recorded on a CPU are unmeasured (the goal names a GPU)."""
    full = train_step.SIZES["full"]
    base = train_step.label(full, "proteus_released_loop")

    def rec(config, speedup):
        name = train_step.label(full, config)
        extra = {} if name == base else {"anchors": [base], "speedups": {base: speedup},
                                         "round_speedups": {base: [speedup] * 7}}
        return goals.Record(label=name, group="g", nodeid="", device="cpu", median_s=1.0,
                            timing_method="perf_counter", reps=7, **extra)

    records = [rec(c, 3.0) for c in train_step.CONFIGS]
    goal = goals.REGISTRY[train_step.GOAL_TEXT]
    assert goals.evaluate(records, [goal])[0].status == goals.UNMEASURED
    for r in records:
        r.device = "cuda:0"
    assert goals.evaluate(records, [goal])[0].status == goals.MET
    records[1].round_speedups[base] = [1.2] * 7
    records[1].speedups[base] = 1.2
    assert goals.evaluate(records, [goal])[0].status == goals.MET  # the faster kdforge configuration is judged
    records[0].round_speedups[base] = [1.1] * 7
    records[0].speedups[base] = 1.1
    assert goals.evaluate(records, [goal])[0].status == goals.NOT_MET
