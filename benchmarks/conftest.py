"""pytest hooks for kdforge benchmarks: the results table at session end, the JSON dump, shared fixtures.

Run: ``python -m pytest benchmarks -q`` (quick sizes on a CPU or with KDFORGE_BENCH_QUICK=1; goal sizes on a GPU).
``--kdforge-json PATH`` (or KDFORGE_BENCH_JSON=PATH) writes every record with the device name, versions and date;
``--kdforge-json auto`` picks benchmarks/results/bench-<device>-<date>.json, and a bare file name lands in
benchmarks/results/. See benchmarks/harness.py for how a benchmark file records its measurements.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Benchmark files import `benchmarks.harness`; the repository root must be importable for that, and every file
# (this one included) must use that one module name so they all share one RECORDS table.
_ROOT = str(Path(__file__).resolve().parent.parent)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

from benchmarks import goals, harness  # noqa: E402


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("kdforge", "kdforge benchmarks")
    group.addoption(
        "--kdforge-json",
        action="store",
        default=None,
        metavar="PATH",
        help="write every benchmark record (with device, versions, date) to PATH; 'auto' picks a name under "
        f"benchmarks/results/. Also settable with {harness.JSON_ENV}.",
    )


@pytest.fixture(scope="session")
def bench_device():
    """The device benchmarks run on (CUDA where present, else CPU)."""
    return harness.bench_device()


@pytest.fixture(scope="session")
def quick(bench_device) -> bool:
    """True when benchmarks use their small sizes (CPU, or KDFORGE_BENCH_QUICK=1)."""
    return harness.is_quick(bench_device)


@pytest.fixture(scope="session")
def copy_anchor(bench_device) -> harness.Record:
    """Copy bandwidth of the benchmark device, measured once; records with bytes_moved report a fraction of it."""
    return harness.copy_bandwidth(bench_device)


def pytest_benchmark_update_json(config, benchmarks, output_json) -> None:  # noqa: ARG001 - hook signature
    # pytest-benchmark's own --benchmark-json is written before the terminal summary: resolve anchors measured
    # after the records naming them, so that file carries the same ratios as the table and --kdforge-json.
    by_label = {r.label: r for r in harness.finalize()}
    for bench in output_json.get("benchmarks", []):
        info = bench.get("extra_info", {})
        record = by_label.get(info.get("label"))
        if record is not None:
            info.update(
                speedup_vs_anchor=record.speedup_vs_anchor,
                speedups=dict(record.speedups),
                frac_copy_bw=record.frac_copy_bw,
                peak_mem_bytes=record.peak_mem_bytes,
            )
    output_json["kdforge"] = harness.environment_info()


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:  # noqa: ARG001 - pytest hook signature
    records = harness.finalize()
    if not records:
        return
    terminalreporter.section("kdforge benchmarks")
    terminalreporter.write_line(f"device: {harness.device_name()}  quick={harness.is_quick()}")
    terminalreporter.write_line(harness.format_table(records))
    # Goals of the benchmark files that ran (they register on import); unmeasured ones say what is missing.
    verdicts = goals.evaluate(records)
    if verdicts:
        terminalreporter.write_line("")
        terminalreporter.write_line(goals.format_verdicts(verdicts, quick=harness.is_quick()))
    target = config.getoption("--kdforge-json", default=None) or os.environ.get(harness.JSON_ENV)
    if target:
        path = harness.write_json(harness.resolve_json_path(target), records, verdicts)
        terminalreporter.write_line(f"kdforge benchmark records written to {path}")
