"""The benchmark harness' judgement: goal verdicts, multiple anchors, the JSON round trip, the tie-aware check."""

from __future__ import annotations

import json

import pytest
import torch

from benchmarks import goals, harness
from benchmarks.harness import Record


def _rec(label: str, median_s: float, **kw) -> Record:
    return Record(label=label, group="g", nodeid="", device="cuda:0", median_s=median_s, timing_method="t", reps=3, **kw)


def _by_label(*records: Record) -> dict[str, Record]:
    return {r.label: r for r in records}


def test_speedup_goal_met_not_met_unmeasured():
    g = goals.speedup(99, "test: x >= 3x eager", label="x", anchor="eager", at_least=3.0)
    try:
        met = g.evaluate(_by_label(_rec("x", 1.0), _rec("eager", 3.5)))
        assert met.status == goals.MET and "3.50x" in met.figure
        missed = g.evaluate(_by_label(_rec("x", 1.0), _rec("eager", 2.0)))
        assert missed.status == goals.NOT_MET and "2.00x" in missed.figure
        absent = g.evaluate(_by_label(_rec("x", 1.0)))
        assert absent.status == goals.UNMEASURED and "eager" in absent.figure
    finally:
        goals.REGISTRY.pop(g.text)


def test_copy_bandwidth_and_memory_goals():
    bw = goals.copy_bandwidth(99, "t-bw", label="k", at_least=0.8)
    fast = _rec("k", 1e-3, bytes_moved=1e9, frac_copy_bw=0.85)
    slow = _rec("k", 1e-3, bytes_moved=1e9, frac_copy_bw=0.5)
    assert bw.evaluate(_by_label(fast)).status == goals.MET
    assert bw.evaluate(_by_label(slow)).status == goals.NOT_MET
    assert bw.evaluate(_by_label(_rec("k", 1e-3))).status == goals.UNMEASURED  # no byte count / copy anchor

    peak = goals.peak_not_above(99, "t-peak", label="a", other="b")
    assert peak.evaluate(_by_label(_rec("a", 1, peak_mem_bytes=100.0), _rec("b", 1, peak_mem_bytes=100.0))).status == goals.MET
    assert peak.evaluate(_by_label(_rec("a", 1, peak_mem_bytes=101.0), _rec("b", 1, peak_mem_bytes=100.0))).status == goals.NOT_MET
    cpu = peak.evaluate(_by_label(_rec("a", 1), _rec("b", 1)))  # peak memory is measured on CUDA only
    assert cpu.status == goals.UNMEASURED and "CUDA" in cpu.figure

    below = goals.peak_below(99, "t-below", label="a", limit_bytes=50.0, limit_text="half")
    assert below.evaluate(_by_label(_rec("a", 1, peak_mem_bytes=49.0))).status == goals.MET
    assert below.evaluate(_by_label(_rec("a", 1, peak_mem_bytes=50.0))).status == goals.NOT_MET

    check = goals.param_check(99, "t-param", label="a", key="differ", ok=lambda n: n == 0)
    assert check.evaluate(_by_label(_rec("a", 1, params={"differ": 0}))).status == goals.MET
    assert check.evaluate(_by_label(_rec("a", 1, params={"differ": 2}))).status == goals.NOT_MET
    assert check.evaluate(_by_label(_rec("a", 1))).status == goals.UNMEASURED
    for text in ("t-bw", "t-peak", "t-below", "t-param"):
        goals.REGISTRY.pop(text)


def test_measure_resolves_every_anchor_in_any_order(monkeypatch):
    monkeypatch.setattr(harness, "RECORDS", {})
    device = torch.device("cpu")
    x = torch.randn(64)
    # The record naming two anchors is measured first; both ratios resolve once the anchors exist.
    fast = harness.measure(None, lambda: x.sum(), label="fast", device=device, anchor=["slow", "slower"], rounds=3)
    assert fast.speedups == {} and fast.anchor == "slow" and fast.peak_mem_bytes is None  # no CUDA here
    harness.measure(None, lambda: (x.sum(), x.cumsum(0)), label="slow", device=device, rounds=3)
    harness.measure(None, lambda: [x.sort() for _ in range(20)], label="slower", device=device, rounds=3)
    records = {r.label: r for r in harness.finalize()}
    assert set(records["fast"].speedups) == {"slow", "slower"}
    assert records["fast"].speedup_vs_anchor == records["fast"].speedups["slow"]
    assert records["fast"].speedups["slower"] == pytest.approx(records["slower"].median_s / records["fast"].median_s)
    table = harness.format_table(list(records.values()))
    assert "slow, slower" in table


def test_json_round_trip_and_command(tmp_path, capsys, monkeypatch):
    records = [_rec("x", 1.0, anchors=["eager"], speedups={"eager": 3.5}), _rec("eager", 3.5)]
    g = goals.speedup(99, "test: x >= 3x eager (json)", label="x", anchor="eager", at_least=3.0)
    try:
        path = harness.write_json(tmp_path / "r.json", records, goals.evaluate(records, [g]))
        payload = json.loads(path.read_text())
        assert payload["goals"][0]["status"] == goals.MET
        assert {"device", "torch", "date"} <= set(payload["environment"])
        loaded = goals.load_records(path)
        assert [r.label for r in loaded] == ["x", "eager"] and loaded[0].speedups == {"eager": 3.5}
        # The command imports the benchmark modules, whose goals then judge the file (here: all unmeasured, plus
        # the test goal above, met).
        assert goals.main([str(path)]) == 0
        out = capsys.readouterr().out
        assert "[       met] issue 99: test: x >= 3x eager (json)" in out
        assert "issue 3: whitened_loss bf16 [65792, 768]: >= 3x torch eager" in out
        assert goals.main([str(tmp_path / "missing.json")]) == 2
        assert "does not exist" in capsys.readouterr().out
    finally:
        goals.REGISTRY.pop(g.text)


def test_neighbours_beyond_ties():
    ref_s = torch.tensor([[5.0, 4.0, 3.0, 3.0]])
    ref_i = torch.tensor([[7, 1, 2, 9]])
    # The two rows tied at the k-th score may come back as either: not a difference.
    assert harness.neighbours_beyond_ties(ref_s, torch.tensor([[7, 1, 9, 2]]), ref_s, ref_i, tol=1e-3) == 0
    assert harness.neighbours_beyond_ties(ref_s, torch.tensor([[7, 1, 2, 4]]), ref_s, ref_i, tol=1e-3) == 0
    # A row above the tie level that is missing is.
    assert harness.neighbours_beyond_ties(ref_s, torch.tensor([[7, 3, 2, 9]]), ref_s, ref_i, tol=1e-3) == 1
