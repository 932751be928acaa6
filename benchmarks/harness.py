"""Shared timing harness for kdforge's kernel microbenchmarks (pytest-benchmark).

Every benchmark file under benchmarks/ times its callables through :func:`measure`, so that all of them warm up,
synchronise the device before reading a clock (CUDA events on GPU), report the median, and state the bytes moved
and FLOPs next to the time. ``benchmarks/conftest.py`` prints one table of every record at the end of the session
and, when asked (``--kdforge-json PATH`` or ``KDFORGE_BENCH_JSON=PATH``), writes them to JSON with the device name,
the torch/triton versions and the date.

How another benchmark file uses it::

    import torch
    from benchmarks.harness import measure, pick, bench_device

    def test_my_op(benchmark, copy_anchor):          # both fixtures come from benchmarks/conftest.py
        device = bench_device()
        n = pick(quick=4096, full=64 * 1024 * 1024)   # small sizes in quick mode (CPU, or KDFORGE_BENCH_QUICK=1)
        x = torch.randn(n, device=device)
        measure(
            benchmark,
            lambda: my_op(x),
            device=device,
            label="my_op/fp32/n=%d" % n,            # unique name of this record in the table and the JSON
            group="my_op",                           # records of one group are compared with each other
            bytes_moved=2 * x.numel() * x.element_size(),   # what the op must read + write at least
            flops=None,                              # or the arithmetic it must do
            anchor="torch_op/fp32/n=%d" % n,         # another record of this run (or a list of them):
        )                                            # speedup = anchor median / this median

``measure`` returns a :class:`Record`; ``benchmark.extra_info`` receives the same numbers (median_s, GB/s,
TFLOP/s, fraction of the copy bandwidth, speedup over each anchor, peak memory) so ``--benchmark-json`` carries
them too. Anchors are resolved at the end of the session, so the order in which tests run does not matter.
On CUDA each record also carries ``peak_mem_bytes``: the most memory one call allocated above what was allocated
before it (torch.cuda.max_memory_allocated), so two implementations of one step compare in memory as well.

Two implementations timed on the wall clock (the CPU, where other processes share the cores) are compared with
:func:`compare` instead: interleaved rounds of both, one speedup per round, and their median as the speedup; the
rounds stay in the record so that a goal is judged on their spread, not on one lucky sample.

``benchmarks/goals.py`` turns the records into a verdict for each performance goal of the issues (met, not met,
unmeasured, with the figures); the session table ends with it and the JSON carries it.

Quick mode (:func:`is_quick`): on by default where no CUDA device is present, or with ``KDFORGE_BENCH_QUICK=1``;
benchmark files then pick tiny sizes so CI exercises the harness in seconds. ``KDFORGE_BENCH_QUICK=0`` on a GPU
machine forces the goal sizes.

The copy-bandwidth anchor (:func:`copy_bandwidth`, fixture ``copy_anchor``) times a plain ``dst.copy_(src)`` on the
benchmark device; records with ``bytes_moved`` report ``frac_copy_bw`` = their GB/s over that figure, the practical
ceiling of a memory-bound kernel.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

QUICK_ENV = "KDFORGE_BENCH_QUICK"
JSON_ENV = "KDFORGE_BENCH_JSON"
RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ---------------------------------------------------------------------------------------------------------------
# device and mode
# ---------------------------------------------------------------------------------------------------------------


def bench_device() -> torch.device:
    """The device benchmarks run on: the current CUDA device where one is present, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def is_quick(device: torch.device | None = None) -> bool:
    """True for small sizes: ``KDFORGE_BENCH_QUICK=1``, or no CUDA device (unless ``KDFORGE_BENCH_QUICK=0``)."""
    env = os.environ.get(QUICK_ENV)
    if env is not None and env.strip() != "":
        return env.strip().lower() not in ("0", "false", "no", "off")
    device = device if device is not None else bench_device()
    return device.type != "cuda"


def pick(quick: Any, full: Any, device: torch.device | None = None) -> Any:
    """``quick`` in quick mode, ``full`` otherwise (sizes, parameter lists, repetitions)."""
    return quick if is_quick(device) else full


def synchronize(device: torch.device | str | None = None) -> None:
    """Wait for all queued work on ``device`` (no-op on the CPU)."""
    device = torch.device(device) if device is not None else bench_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device | None = None) -> str:
    device = device if device is not None else bench_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({_cpu_model()}, {os.cpu_count()} logical cores, {torch.get_num_threads()} torch threads)"


def _cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else the architecture."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return f"{line.split(':', 1)[1].strip()}, {platform.machine()}"
    except OSError:
        pass
    return platform.processor() or platform.machine()


# ---------------------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Per-call times of one callable, in seconds."""

    times_s: list[float]
    method: str  # "cuda-events" or "perf_counter"

    @property
    def median_s(self) -> float:
        return statistics.median(self.times_s)


def time_callable(
    fn: Callable[[], Any],
    *,
    device: torch.device | None = None,
    warmup: int = 3,
    reps: int = 20,
    max_time_s: float | None = None,
) -> Timing:
    """Time ``fn()`` ``reps`` times after ``warmup`` untimed calls.

    On CUDA each call is bracketed by CUDA events (device time, free of Python launch jitter between calls);
    elsewhere the clock is read after a synchronise. ``max_time_s`` stops early (after at least 3 timed calls)
    so a slow configuration does not hold the session.
    """
    device = device if device is not None else bench_device()
    for _ in range(warmup):
        fn()
    synchronize(device)
    times: list[float] = []
    started = time.perf_counter()
    if device.type == "cuda":
        pairs = []
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            pairs.append((start, end))
            if max_time_s is not None and i >= 2 and time.perf_counter() - started > max_time_s:
                break
        torch.cuda.synchronize(device)
        times = [s.elapsed_time(e) / 1e3 for s, e in pairs]
        return Timing(times, "cuda-events")
    for i in range(reps):
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - t0)
        if max_time_s is not None and i >= 2 and time.perf_counter() - started > max_time_s:
            break
    return Timing(times, "perf_counter")


# ---------------------------------------------------------------------------------------------------------------
# records
# ---------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Record:
    """One measured callable: time, work, and derived rates."""

    label: str
    group: str
    nodeid: str
    device: str
    median_s: float
    timing_method: str
    reps: int
    bytes_moved: float | None = None
    flops: float | None = None
    anchors: list[str] = dataclasses.field(default_factory=list)
    speedups: dict[str, float] = dataclasses.field(default_factory=dict)  # anchor label -> anchor median / this
    frac_copy_bw: float | None = None
    peak_mem_bytes: float | None = None  # CUDA: most bytes one call allocated above the allocation before it
    params: dict[str, Any] = dataclasses.field(default_factory=dict)
    # anchor label -> the speedup of each interleaved round (:func:`compare`); speedups[anchor] is their median
    round_speedups: dict[str, list[float]] = dataclasses.field(default_factory=dict)

    @property
    def anchor(self) -> str | None:
        """The first (main) anchor."""
        return self.anchors[0] if self.anchors else None

    @property
    def speedup_vs_anchor(self) -> float | None:
        """Speedup over the first anchor (None until that anchor is measured)."""
        return self.speedups.get(self.anchor) if self.anchor is not None else None

    @property
    def gbps(self) -> float | None:
        if self.bytes_moved is None or self.median_s <= 0:
            return None
        return self.bytes_moved / self.median_s / 1e9

    @property
    def tflops(self) -> float | None:
        if self.flops is None or self.median_s <= 0:
            return None
        return self.flops / self.median_s / 1e12

    def as_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["gbps"] = self.gbps
        out["tflops"] = self.tflops
        out["anchor"] = self.anchor
        out["speedup_vs_anchor"] = self.speedup_vs_anchor
        return out


# Every record of this process, by label, in the order measured. conftest.py prints and writes them.
RECORDS: dict[str, Record] = {}
# Copy bandwidth per device string, measured once per session.
_COPY_BW: dict[str, Record] = {}


def _resolve(record: Record) -> None:
    """Fill the anchor ratios and the copy-bandwidth fraction where their inputs are known."""
    for label in record.anchors:
        if record.round_speedups.get(label):
            record.speedups[label] = statistics.median(record.round_speedups[label])
        elif label in RECORDS and record.median_s > 0:
            record.speedups[label] = RECORDS[label].median_s / record.median_s
    copy = _COPY_BW.get(record.device)
    if copy is not None and record.gbps is not None and copy.gbps:
        record.frac_copy_bw = record.gbps / copy.gbps


# pytest-benchmark's extra_info dict of each record, re-filled at the end when late anchors resolve.
_EXTRA_INFO: dict[str, dict[str, Any]] = {}


def _publish(benchmark: Any, record: Record) -> None:
    if benchmark is not None:
        _EXTRA_INFO[record.label] = benchmark.extra_info
    info = _EXTRA_INFO.get(record.label)
    if info is None:
        return
    info.update(
        label=record.label,
        median_s=record.median_s,
        timing_method=record.timing_method,
        bytes_moved=record.bytes_moved,
        flops=record.flops,
        gbps=record.gbps,
        tflops=record.tflops,
        anchor=record.anchor,
        speedup_vs_anchor=record.speedup_vs_anchor,
        speedups=dict(record.speedups),
        frac_copy_bw=record.frac_copy_bw,
        peak_mem_bytes=record.peak_mem_bytes,
    )
    info.update({f"param_{k}": v for k, v in record.params.items()})


def finalize() -> list[Record]:
    """Resolve every anchor ratio (anchors may be measured after the records that name them); return the records."""
    for record in RECORDS.values():
        _resolve(record)
        _publish(None, record)
    return list(RECORDS.values())


def measure(
    benchmark: Any,
    fn: Callable[[], Any],
    *,
    label: str,
    group: str | None = None,
    device: torch.device | None = None,
    bytes_moved: float | None = None,
    flops: float | None = None,
    anchor: str | Sequence[str] | None = None,
    warmup: int | None = None,
    rounds: int | None = None,
    track_memory: bool = True,
    params: dict[str, Any] | None = None,
) -> Record:
    """Time ``fn`` with pytest-benchmark and the harness; record and return the result.

    ``benchmark`` is pytest-benchmark's fixture (or None to time without it). The callable runs ``warmup`` times
    untimed, then ``rounds`` times; pytest-benchmark times a wrapper that synchronises the device after each call,
    and on CUDA a second pass with CUDA events gives the figure the harness reports (device time). ``label`` must be
    unique in the session; ``anchor`` names another record to compare with (speedup = anchor median / this median),
    or a list of them, the first being the main one. On CUDA one more call measures ``peak_mem_bytes`` (unless
    ``track_memory`` is False: for code that allocates outside torch's allocator, whose peak would read as 0).
    """
    device = device if device is not None else bench_device()
    quick = is_quick(device)
    warmup = warmup if warmup is not None else (1 if quick else 5)
    rounds = rounds if rounds is not None else (3 if quick else 20)
    _check_new(label)
    if benchmark is not None:
        benchmark.group = group or benchmark.group

    def synced() -> Any:
        out = fn()
        synchronize(device)
        return out

    timing: Timing | None = None
    if benchmark is not None:
        benchmark.pedantic(synced, rounds=rounds, warmup_rounds=warmup, iterations=1)
        stats = getattr(benchmark, "stats", None)
        inner = getattr(stats, "stats", None)
        if inner is not None and getattr(inner, "data", None) and device.type != "cuda":
            timing = Timing(list(inner.data), "perf_counter")
    if timing is None:
        # CUDA (device-event timing), or pytest-benchmark disabled (--benchmark-disable) / absent.
        timing = time_callable(fn, device=device, warmup=warmup if benchmark is None else 1, reps=rounds)
    anchors = [anchor] if isinstance(anchor, str) else list(anchor or [])

    record = Record(
        label=label,
        group=group or (getattr(benchmark, "group", None) or "default"),
        nodeid=getattr(benchmark, "fullname", "") or "",
        device=str(device),
        median_s=timing.median_s,
        timing_method=timing.method,
        reps=len(timing.times_s),
        bytes_moved=bytes_moved,
        flops=flops,
        anchors=anchors,
        peak_mem_bytes=peak_memory(fn, device) if track_memory else None,
        params=dict(params or {}),
    )
    return _register(record, benchmark)


def _check_new(label: str) -> None:
    if label in RECORDS:
        raise ValueError(f"benchmark label {label!r} is recorded twice; labels must be unique per session")


def _register(record: Record, benchmark: Any = None) -> Record:
    _check_new(record.label)
    RECORDS[record.label] = record
    _resolve(record)
    # Records measured earlier that name this one as their anchor can now be resolved too.
    for other in RECORDS.values():
        if record.label in other.anchors:
            _resolve(other)
    _publish(benchmark, record)
    return record


def compare(
    label: str,
    fn: Callable[[], Any],
    *,
    anchor: str,
    anchor_fn: Callable[[], Any],
    group: str,
    device: torch.device | None = None,
    rounds: int | None = None,
    calls: int = 1,
    warmup: int | None = None,
    bytes_moved: float | None = None,
    flops: float | None = None,
    track_memory: bool = True,
    params: dict[str, Any] | None = None,
) -> tuple[Record, Record]:
    """Time ``fn`` (recorded as ``label``) against ``anchor_fn`` (recorded as ``anchor``) in interleaved rounds;
    return both records.

    On a shared CPU the wall clock drifts by more than the effects measured (one small case gave 2.7x to 17.7x in
    four runs): two callables timed in separate tests are timed on two different machines. Here, after ``warmup``
    untimed calls of each, every round times ``calls`` calls of one and then of the other, the order alternating
    from round to round, and keeps the round's speedup (anchor median / this median). ``speedups[anchor]`` is the
    median of those and ``round_speedups[anchor]`` keeps them all, so that a goal tells a stable result from a
    lucky one (benchmarks/goals.py). ``bytes_moved``, ``flops`` and ``params`` describe the work of either.
    """
    device = device if device is not None else bench_device()
    quick = is_quick(device)
    rounds = rounds if rounds is not None else (5 if quick else 9)
    warmup = warmup if warmup is not None else (1 if quick else 3)
    for name in (label, anchor):
        _check_new(name)
    for _ in range(warmup):
        fn()
        anchor_fn()
    times: dict[str, list[float]] = {label: [], anchor: []}
    speedups, method = [], ""
    for r in range(rounds):
        pair = [(label, fn), (anchor, anchor_fn)]
        medians = {}
        for name, f in pair if r % 2 == 0 else pair[::-1]:
            timing = time_callable(f, device=device, warmup=0, reps=calls)
            times[name] += timing.times_s
            medians[name], method = timing.median_s, timing.method
        speedups.append(medians[anchor] / medians[label])
    nodeid = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]

    def record(name: str, f: Callable[[], Any], **kw: Any) -> Record:
        return Record(label=name, group=group, nodeid=nodeid, device=str(device),
                      median_s=statistics.median(times[name]), timing_method=method, reps=len(times[name]),
                      bytes_moved=bytes_moved, flops=flops, params=dict(params or {}),
                      peak_mem_bytes=peak_memory(f, device) if track_memory else None, **kw)  # fmt: skip

    base = _register(record(anchor, anchor_fn))
    return _register(record(label, fn, anchors=[anchor], round_speedups={anchor: speedups})), base


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(lower quartile, median, upper quartile) of ``values``: the middle half of the rounds lies between the two."""
    if len(values) == 1:
        return values[0], values[0], values[0]
    q1, median, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, median, q3


def peak_memory(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Bytes one call of ``fn`` allocates at its peak above what was allocated before it; None off CUDA (the CPU
    allocator keeps no such statistics). Whatever the call returns is released before the next measurement."""
    if device.type != "cuda":
        return None
    synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del out
    return float(max(peak, 0))


def copy_bandwidth(device: torch.device | None = None, nbytes: int | None = None) -> Record:
    """Measure (once per device and session) the bandwidth of a plain ``dst.copy_(src)``.

    Bytes moved count the read and the write (2 * nbytes). Default size: 1 GiB on CUDA (well past L2), 64 MiB
    in quick mode or on the CPU.
    """
    device = device if device is not None else bench_device()
    key = str(device)
    if key in _COPY_BW:
        return _COPY_BW[key]
    if nbytes is None:
        nbytes = (64 << 20) if is_quick(device) else (1 << 30)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    timing = time_callable(lambda: dst.copy_(src), device=device, warmup=3, reps=pick(5, 30, device))
    record = Record(
        label=f"anchor/copy/{nbytes >> 20}MiB",
        group="anchor",
        nodeid="",
        device=key,
        median_s=timing.median_s,
        timing_method=timing.method,
        reps=len(timing.times_s),
        bytes_moved=2.0 * src.numel() * src.element_size(),
    )
    record.frac_copy_bw = 1.0
    _COPY_BW[key] = record
    RECORDS.setdefault(record.label, record)
    for other in RECORDS.values():
        _resolve(other)
    return record


def neighbours_beyond_ties(scores: Any, idx: Any, ref_scores: Any, ref_idx: Any, tol: float) -> int:
    """How many queries' neighbour sets differ from the reference beyond ties: neighbours scoring more than ``tol``
    above the reference's k-th score must be the same rows (order and the rows at the boundary may differ).
    Scores are best first (larger is better), one row per query."""
    scores, idx, ref_scores, ref_idx = (torch.as_tensor(t).cpu() for t in (scores, idx, ref_scores, ref_idx))
    differ = 0
    for q in range(ref_scores.shape[0]):
        kth = float(ref_scores[q, -1])
        ours = set(idx[q][scores[q].double() > kth + tol].tolist())
        theirs = set(ref_idx[q][ref_scores[q].double() > kth + tol].tolist())
        differ += ours != theirs
    return differ


# ---------------------------------------------------------------------------------------------------------------
# reporting
# ---------------------------------------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str) -> str:
    if value is None or (isinstance(value, float) and (math.isnan(value) or math.isinf(value))):
        return "-"
    return format(value, spec)


def _speedup_cell(record: Record, anchor: str) -> str:
    """The speedup over ``anchor``; with interleaved rounds, their quartiles after it."""
    if anchor not in record.speedups:
        return "-"
    rounds = record.round_speedups.get(anchor)
    if not rounds:
        return f"{record.speedups[anchor]:.2f}x"
    q1, _, q3 = quartiles(rounds)
    return f"{record.speedups[anchor]:.2f}x [{q1:.2f}-{q3:.2f}]"


def format_table(records: list[Record]) -> str:
    """A fixed-width table of records, grouped, one line each."""
    header = ("group", "label", "median", "GB/s", "TFLOP/s", "%copyBW", "peak MiB", "speedup", "vs anchor")
    rows = []
    for r in sorted(records, key=lambda r: (r.group, r.label)):
        med = r.median_s
        med_s = f"{med * 1e6:.1f}us" if med < 1e-3 else (f"{med * 1e3:.2f}ms" if med < 1 else f"{med:.3f}s")
        rows.append(
            (
                r.group,
                r.label,
                med_s,
                _fmt(r.gbps, ".1f"),
                _fmt(r.tflops, ".2f"),
                _fmt(None if r.frac_copy_bw is None else 100 * r.frac_copy_bw, ".0f"),
                _fmt(None if r.peak_mem_bytes is None else r.peak_mem_bytes / (1 << 20), ".1f"),
                ", ".join(_speedup_cell(r, a) for a in r.anchors) or "-",
                ", ".join(r.anchors),
            )
        )
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)] if rows else [len(h) for h in header]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(lines)


def environment_info() -> dict[str, Any]:
    """Device name, library versions and date for the JSON header."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_name(),
        "quick": is_quick(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "host_cpu_count": os.cpu_count(),
    }
    try:  # triton is optional (absent or broken on some CPU machines)
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001 - any import failure only means "not reported"
        info["triton"] = f"unavailable ({type(exc).__name__})"
    return info


def resolve_json_path(value: str) -> Path:
    """``auto`` -> benchmarks/results/bench-<device>-<date>.json; a bare file name lands in benchmarks/results/."""
    if value == "auto":
        slug = "".join(c if c.isalnum() else "-" for c in device_name().split("(")[0].strip().lower()).strip("-")
        stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        return RESULTS_DIR / f"bench-{slug}-{stamp}.json"
    path = Path(value)
    if not path.is_absolute() and path.parent == Path("."):
        return RESULTS_DIR / path
    return path


def write_json(path: Path, records: list[Record], verdicts: list[Any] | None = None) -> Path:
    """Records (and goal verdicts, benchmarks/goals.py) with the device, versions and date."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"environment": environment_info(), "records": [r.as_dict() for r in records]}
    if verdicts is not None:
        payload["goals"] = [dataclasses.asdict(v) for v in verdicts]
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path
