"""Performance goals of the issues, judged from benchmark records: met, not met, or unmeasured, with the figures.

A benchmark file states its goals next to the benchmarks that measure them, with the labels it records::

    from benchmarks import goals

    goals.speedup(3, "whitened_loss 65792x768: >= 3x torch eager", label=..., anchor=..., at_least=3.0)

Goals register when their file is imported. At the end of a benchmark session the table is followed by one
verdict per goal whose file ran (``benchmarks/conftest.py``), and ``--kdforge-json`` stores the verdicts with the
records. A saved JSON can be judged again later::

    python -m benchmarks.goals benchmarks/results/h100.json

A goal whose record is missing (quick mode, a skipped backend, no GPU) is "unmeasured", never "met".

A speedup measured on the wall clock (the CPU, shared with other processes) is judged only from interleaved
rounds of the two callables (``harness.compare``): at least ``MIN_ROUNDS`` of them, "met" when the lower quartile
of the per-round speedups reaches the goal, "not met" when the upper quartile falls short, and "noisy" when the
middle half of the rounds straddles the goal. Two wall-clock medians timed apart are "unmeasured", whatever their
ratio. Device-event timings (CUDA) are judged on their medians.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import sys
from pathlib import Path
from typing import Callable

from benchmarks.harness import Record, quartiles

MET, NOT_MET, NOISY, UNMEASURED = "met", "not met", "noisy", "unmeasured"
# Benchmark modules that declare goals; the JSON command imports them to know the goals.
GOAL_MODULES = ("benchmarks.test_bench_ops", "benchmarks.test_bench_ext", "benchmarks.test_bench_engine",
                "benchmarks.train_step")
# Fewest interleaved rounds a wall-clock speedup is judged from (with fewer, a quartile is one or two rounds).
MIN_ROUNDS = 5


@dataclasses.dataclass(frozen=True)
class Verdict:
    issue: int
    goal: str
    status: str  # MET | NOT_MET | NOISY | UNMEASURED
    figure: str  # what was measured, or what is missing

    def line(self) -> str:
        return f"[{self.status:>10}] issue {self.issue}: {self.goal} -- {self.figure}"


@dataclasses.dataclass(frozen=True)
class Goal:
    issue: int
    text: str
    labels: tuple[str, ...]  # every record the judgement needs
    judge: Callable[..., tuple[bool, str]]  # records (in ``labels`` order) -> (met?, figure)

    def evaluate(self, records: dict[str, Record]) -> Verdict:
        missing = [label for label in self.labels if label not in records]
        if missing:
            return Verdict(self.issue, self.text, UNMEASURED, "no record " + ", ".join(missing))
        try:
            ok, figure = self.judge(*(records[label] for label in self.labels))
        except _Unmeasured as exc:
            return Verdict(self.issue, self.text, UNMEASURED, str(exc))
        except _Noisy as exc:
            return Verdict(self.issue, self.text, NOISY, str(exc))
        return Verdict(self.issue, self.text, MET if ok else NOT_MET, figure)


class _Unmeasured(Exception):
    """A record exists but lacks the figure a goal needs (e.g. peak memory off CUDA)."""


class _Noisy(Exception):
    """The repeats of a measurement fall on both sides of the goal."""


REGISTRY: dict[str, Goal] = {}


def register(goal: Goal) -> Goal:
    REGISTRY.setdefault(goal.text, goal)  # a module imported twice registers once
    return goal


def _ms(seconds: float) -> str:
    return f"{seconds:.3g} s" if seconds >= 1 else f"{seconds * 1e3:.3g} ms"


def _judge_speedup(rec: Record, base: Record, at_least: float, goal: str, shown: Callable[[float], float] = float,
                   fmt: str = "{:.2f}x", name: str = "") -> tuple[bool, str]:
    """(met?, figure) for "``rec`` is at least ``at_least`` times faster than ``base``". The figure shows each
    speedup r as ``name`` + ``fmt.format(shown(r))`` (e.g. as an overhead, 1 / r - 1)."""

    def show(*ratios: float) -> str:
        return " to ".join(fmt.format(v) for v in sorted(shown(r) for r in ratios))

    rounds = rec.round_speedups.get(base.label)
    if rounds:
        if len(rounds) < MIN_ROUNDS:
            raise _Unmeasured(f"{len(rounds)} interleaved rounds of {rec.label} and {base.label}; "
                              f"a verdict needs >= {MIN_ROUNDS}")
        q1, median, q3 = quartiles(rounds)
        figure = (f"{name}{show(median)}, median of {len(rounds)} interleaved rounds (middle half {show(q1, q3)}; "
                  f"{_ms(rec.median_s)} vs {_ms(base.median_s)}; goal {goal})")
        if q1 < at_least <= q3:
            raise _Noisy(figure)
        return q1 >= at_least, figure
    ratio = base.median_s / rec.median_s
    figure = f"{name}{show(ratio)} ({_ms(rec.median_s)} vs {_ms(base.median_s)}; goal {goal})"
    if "perf_counter" in (rec.timing_method, base.timing_method):
        raise _Unmeasured(f"wall-clock medians timed apart, {figure}: a verdict needs >= {MIN_ROUNDS} interleaved "
                          "rounds (harness.compare)")
    return ratio >= at_least, figure


def speedup(issue: int, text: str, *, label: str, anchor: str, at_least: float) -> Goal:
    """``label`` is at least ``at_least`` times faster than ``anchor`` (both measured in one run)."""

    def judge(rec: Record, base: Record) -> tuple[bool, str]:
        return _judge_speedup(rec, base, at_least, f">= {at_least:g}x")

    return register(Goal(issue, text, (label, anchor), judge))


def overhead(issue: int, text: str, *, label: str, anchor: str, at_most: float) -> Goal:
    """``label`` takes at most ``at_most`` (a fraction) longer than ``anchor``: overhead = 1 / speedup - 1."""

    def judge(rec: Record, base: Record) -> tuple[bool, str]:
        return _judge_speedup(rec, base, 1.0 / (1.0 + at_most), f"<= {at_most:.0%}", lambda r: 1.0 / r - 1.0,
                              "{:+.1%}", "overhead ")

    return register(Goal(issue, text, (label, anchor), judge))


def copy_bandwidth(issue: int, text: str, *, label: str, at_least: float) -> Goal:
    """``label`` reaches at least the fraction ``at_least`` of the measured device copy bandwidth."""

    def judge(rec: Record) -> tuple[bool, str]:
        if rec.frac_copy_bw is None:
            raise _Unmeasured("no copy-bandwidth anchor or no byte count in the record")
        return rec.frac_copy_bw >= at_least, (
            f"{100 * rec.frac_copy_bw:.0f}% of copy bandwidth ({rec.gbps:.0f} GB/s, {_ms(rec.median_s)}; "
            f"goal >= {100 * at_least:.0f}%)"
        )

    return register(Goal(issue, text, (label,), judge))


def _peak(rec: Record) -> float:
    if rec.peak_mem_bytes is None:
        raise _Unmeasured(f"{rec.label} has no peak memory (measured on CUDA only)")
    return rec.peak_mem_bytes


def peak_not_above(issue: int, text: str, *, label: str, other: str, slack: float = 1.0) -> Goal:
    """``label``'s peak memory is at most ``slack`` times ``other``'s."""

    def judge(rec: Record, base: Record) -> tuple[bool, str]:
        mine, theirs = _peak(rec), _peak(base)
        return mine <= slack * theirs, f"peak {mine / 2**20:.1f} MiB vs {theirs / 2**20:.1f} MiB"

    return register(Goal(issue, text, (label, other), judge))


def peak_below(issue: int, text: str, *, label: str, limit_bytes: float, limit_text: str) -> Goal:
    """``label``'s peak memory (above what was allocated before the call) stays under ``limit_bytes``."""

    def judge(rec: Record) -> tuple[bool, str]:
        mine = _peak(rec)
        return mine < limit_bytes, f"peak {mine / 2**20:.1f} MiB (limit {limit_text}: {limit_bytes / 2**20:.1f} MiB)"

    return register(Goal(issue, text, (label,), judge))


def param_check(issue: int, text: str, *, label: str, key: str, ok: Callable[[object], bool]) -> Goal:
    """A figure the benchmark stored in the record's params (e.g. a correctness check) passes ``ok``."""

    def judge(rec: Record) -> tuple[bool, str]:
        if key not in rec.params:
            raise _Unmeasured(f"{rec.label} has no {key!r}")
        return bool(ok(rec.params[key])), f"{key} = {rec.params[key]}"

    return register(Goal(issue, text, (label,), judge))


def evaluate(records: list[Record] | dict[str, Record], goals: list[Goal] | None = None) -> list[Verdict]:
    """One verdict per goal (all registered goals by default), in issue order."""
    by_label = records if isinstance(records, dict) else {r.label: r for r in records}
    chosen = list(REGISTRY.values()) if goals is None else goals
    return [g.evaluate(by_label) for g in sorted(chosen, key=lambda g: g.issue)]


def format_verdicts(verdicts: list[Verdict], *, quick: bool = False) -> str:
    """A count line, then one line per verdict; in quick mode, where no goal size runs, the count line alone."""
    counts = {s: sum(v.status == s for v in verdicts) for s in (MET, NOT_MET, NOISY, UNMEASURED)}
    head = (f"goals: {counts[MET]} met, {counts[NOT_MET]} not met, {counts[NOISY]} noisy, "
            f"{counts[UNMEASURED]} unmeasured")
    if quick and counts[UNMEASURED] == len(verdicts):
        return head + " (quick sizes: goals are judged at their own sizes, KDFORGE_BENCH_QUICK=0)"
    return "\n".join([head, *(v.line() for v in verdicts)])


def load_records(path: Path) -> list[Record]:
    """Records of a JSON written by ``--kdforge-json``."""
    payload = json.loads(Path(path).read_text())
    fields = {f.name for f in dataclasses.fields(Record)}
    return [Record(**{k: v for k, v in row.items() if k in fields}) for row in payload["records"]]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0] in ("-h", "--help"):
        print("usage: python -m benchmarks.goals RESULTS.json  (a file written by pytest benchmarks --kdforge-json)")
        return 2
    path = Path(argv[0])
    if not path.is_file():
        print(f"benchmarks.goals: {path} does not exist; write one with: pytest benchmarks --kdforge-json {path}")
        return 2
    for name in GOAL_MODULES:
        importlib.import_module(name)
    # Run as ``python -m``, this file is ``__main__``; the benchmark modules registered into ``benchmarks.goals``.
    registry = importlib.import_module("benchmarks.goals")
    env = json.loads(path.read_text()).get("environment", {})
    print(f"{path}: device {env.get('device')}, torch {env.get('torch')}, date {env.get('date')}")
    print(registry.format_verdicts(registry.evaluate(load_records(path))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
