"""Training curves of a run, from the metrics.jsonl that :class:`kdforge.engine.loggers.JsonlLogger` writes.

Rows look like ``{"step": 7, "time": ..., "loss": ..., "lr": ..., "loss/<label>": ..., "grad_norm": ...,
"img_per_s": ..., "epoch": ...}`` (training, every ``train.log_every`` steps) or ``{"step": 6, "time": ...,
"student_knn_top1_epoch1": ..., "teacher_knn_top1": ..., ...}`` (after each evaluation, holding every result so
far). Non-finite values are written as the strings "nan", "inf", "-inf". A resumed run appends to the file, so a
step can appear twice (the resumed run's row wins), and a crash mid-write can leave half a row, alone on the last
line or glued to the first row of the resumed run.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from pathlib import Path

from kdforge.engine.checkpoint import atomic_path
from kdforge.errors import KdforgeError, MetricsError

METRICS_FILE = "metrics.jsonl"
CURVES_FILE = "curves.png"

# Keys that index a row rather than measure anything.
_INDEX_KEYS = {"step", "time", "epoch"}
# The trainer's evaluation results: student_<metric>_<when> (before, epoch<N>, after) and teacher_<metric>.
_STUDENT_EVAL = re.compile(r"^student_(?P<metric>.+)_(?P<when>before|after|epoch\d+)$")
_TEACHER_EVAL = re.compile(r"^teacher_(?P<metric>.+)$")
_ACCURACY = re.compile(r"top\d+$")
# Noisy lines with at least this many points also get a centred moving average over about 1/25 of the run (the
# raw curve drawn faintly); centred, so that a falling loss is not drawn late as a trailing average would draw it.
_SMOOTH_FROM = 50
_SMOOTH_FRACTION = 25
# Lines with at most this many points get markers, so that one point is still visible.
_MARKERS_UP_TO = 30


@dataclasses.dataclass
class Metrics:
    """The readable content of a metrics.jsonl."""

    path: Path
    """The file read."""
    series: dict[str, dict[int, float]]
    """Metric name -> {step: value}, steps in first-seen order; the last row written for a step wins (a resumed
    run rewrites the steps after its checkpoint). Values may be nan or +-inf."""
    skipped: list[int]
    """1-based numbers of the lines that held no readable row (half-written by a crash, or not a JSON object)."""
    recovered: list[int]
    """1-based numbers of the lines that held half a row followed by a whole one (a crash mid-write, then a
    resume): the whole row was kept."""

    @property
    def steps(self) -> list[int]:
        """Every step that has a value, ascending."""
        return sorted({s for points in self.series.values() for s in points})


@dataclasses.dataclass
class Line:
    """One curve of a panel: ``steps`` and ``values`` of equal length, finite values only."""

    label: str
    steps: list[int]
    values: list[float]
    dropped: int = 0
    """How many non-finite values were left out."""
    color: str | None = None
    marker: bool = False
    """Eval points are few and far between: always draw them as markers."""
    smooth: bool = True
    """Noisy (a loss, a throughput): add a moving average once there are many points. Not for a schedule."""


@dataclasses.dataclass
class Panel:
    """One subplot: a metric family against the optimizer step."""

    title: str
    ylabel: str
    lines: list[Line]
    references: list[tuple[str, float, str]] = dataclasses.field(default_factory=list)
    """Horizontal lines (label, value, color): the teacher's evaluation, measured once."""
    log_y: bool = False


def _number(value) -> float | None:
    """A metric value as a float (the logger writes non-finite values as strings), or None if it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str) and value.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return float(value.strip())
    return None


def _parse_line(text: str) -> tuple[dict | None, bool]:
    """(row, recovered) for one line; row is None when the line holds no readable row."""
    try:
        row = json.loads(text)
    except ValueError:
        # Half a row from a crash, then the resumed run's first row appended to it: keep the whole row.
        start = text.rfind('{"step"')
        if start <= 0:
            return None, False
        try:
            row = json.loads(text[start:])
        except ValueError:
            return None, False
        return (row, True) if isinstance(row, dict) and "step" in row else (None, False)
    return (row, False) if isinstance(row, dict) else (None, False)


def _metrics_path(run_dir: str | Path) -> Path:
    path = Path(run_dir)
    return path if path.suffix == ".jsonl" else path / METRICS_FILE


def read_metrics(run_dir: str | Path) -> Metrics:
    """Read ``<run_dir>/metrics.jsonl`` (or the .jsonl file ``run_dir`` names).

    Unreadable lines are skipped and listed in ``skipped`` (and in a warning). Raises :class:`MetricsError` when
    the file is missing or holds no row with a step and a numeric metric.
    """
    path = _metrics_path(run_dir)
    where = path.parent
    if not path.is_file():
        raise MetricsError(f"no metrics at '{path}': a run writes {path.name} while it trains; train first "
                           f"(kdforge train RECIPE --output-dir {where}) or point at a run directory")
    series: dict[str, dict[int, float]] = {}
    skipped: list[int] = []
    recovered: list[int] = []
    rows = 0
    with path.open(encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if not text.strip():
                continue
            rows += 1
            row, glued = _parse_line(text)
            step = row.get("step") if row is not None else None
            if not isinstance(step, int) or isinstance(step, bool):
                skipped.append(number)
                continue
            if glued:
                recovered.append(number)
            for key, value in row.items():
                if key in _INDEX_KEYS:
                    continue
                value = _number(value)
                if value is not None:
                    series.setdefault(key, {})[step] = value
    if skipped or recovered:
        notes = []
        if skipped:
            notes.append(f"skipped {_lines(skipped)} (no readable row: half-written by a crash?)")
        if recovered:
            notes.append(f"kept the whole row after half a row on {_lines(recovered)} (a crash, then a resume)")
        warnings.warn(f"{path}: " + "; ".join(notes), stacklevel=2)
    if not series:
        if not rows:
            what = "is empty"
        elif len(skipped) == rows:
            what = f"holds no readable row ({_lines(skipped)} unreadable)"
        else:
            what = "holds no metric values"
        raise MetricsError(f"'{path}' {what}: there is nothing to plot yet; train first "
                           f"(kdforge train RECIPE --output-dir {where}), or wait for its first log step")
    return Metrics(path=path, series=series, skipped=skipped, recovered=recovered)


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:5])) + (f" and {len(numbers) - 5} more" if len(numbers) > 5 else "")
    return f"line{'s' if len(numbers) > 1 else ''} {shown}"


def _line(label: str, points: dict[int, float], **style) -> Line:
    steps = sorted(points)
    finite = [(s, points[s]) for s in steps if math.isfinite(points[s])]
    return Line(label, [s for s, _ in finite], [v for _, v in finite], dropped=len(steps) - len(finite), **style)


def _auto_log(lines: list[Line]) -> bool:
    """Log scale when every value is positive and they span at least a decade (a loss falling fast)."""
    values = [v for line in lines for v in line.values]
    return bool(values) and min(values) > 0 and max(values) / min(values) >= 10


def layout(metrics: Metrics) -> list[Panel]:
    """The panels that ``metrics`` has data for, in a fixed order: loss terms, learning rate, throughput,
    gradient norm, evaluation accuracy, then anything else. A family with no key in the file has no panel."""
    series = dict(metrics.series)
    panels: list[Panel] = []

    loss = [_line("loss (total)", series.pop("loss"), color="black")] if "loss" in series else []
    for key in sorted(k for k in series if k.startswith("loss/")):
        loss.append(_line(key.removeprefix("loss/"), series.pop(key)))
    if loss:
        panels.append(Panel("training loss", "loss", loss, log_y=_auto_log(loss)))
    for key, title, ylabel in (("lr", "learning rate", "lr"), ("img_per_s", "throughput", "images / s"),
                               ("grad_norm", "gradient norm (before clipping)", "L2 norm")):
        if key in series:
            panels.append(Panel(title, ylabel, [_line(key, series.pop(key), smooth=key != "lr")]))

    # An evaluation's results are logged again with every later one: its step is the first row that holds it.
    student: dict[str, dict[int, float]] = {}
    teacher: dict[str, float] = {}
    for key in sorted(series):
        if m := _STUDENT_EVAL.match(key):
            step = min(series[key])
            student.setdefault(m["metric"], {})[step] = series.pop(key)[step]
        elif m := _TEACHER_EVAL.match(key):
            points = series.pop(key)
            teacher[m["metric"]] = points[min(points)]
    accuracy = Panel("evaluation (student; teacher dashed)", "accuracy (%)", [])
    other = Panel("other metrics (teacher dashed)", "value", [])
    for i, metric in enumerate(sorted(set(student) | set(teacher))):
        color, panel = f"C{i % 10}", accuracy if _ACCURACY.search(metric) else other
        if metric in student:
            panel.lines.append(_line(f"student {metric}", student[metric], color=color, marker=True))
        if metric in teacher and math.isfinite(teacher[metric]):
            panel.references.append((f"teacher {metric}", teacher[metric], color))
    other.lines += [_line(key, points) for key, points in sorted(series.items())]
    other.log_y = _auto_log(other.lines)
    panels += [p for p in (accuracy, other) if p.lines or p.references]
    return panels


def _smooth(values: list[float]) -> list[float]:
    """Centred moving average over ``len(values) // _SMOOTH_FRACTION`` points each side, narrower at the ends."""
    import numpy as np

    half = max(1, len(values) // (2 * _SMOOTH_FRACTION))
    sums = np.concatenate([[0.0], np.cumsum(values)])
    i = np.arange(len(values))
    lo, hi = np.maximum(i - half, 0), np.minimum(i + half + 1, len(values))
    return ((sums[hi] - sums[lo]) / (hi - lo)).tolist()


def _draw(ax, panel: Panel) -> None:
    for line in panel.lines:
        label = line.label + (f" ({line.dropped} non-finite not drawn)" if line.dropped else "")
        many = line.smooth and len(line.steps) >= _SMOOTH_FROM and not line.marker
        marker = "o" if line.marker or len(line.steps) <= _MARKERS_UP_TO else None
        drawn = ax.plot(line.steps, line.values, color=line.color, marker=marker, markersize=4,
                        linewidth=0.8 if many else 1.5, alpha=0.3 if many else 1.0,
                        label=None if many else label)
        if many:
            ax.plot(line.steps, _smooth(line.values), color=drawn[0].get_color(), linewidth=1.5,
                    label=f"{label}, smoothed")
    for label, value, color in panel.references:
        ax.axhline(value, color=color, linestyle="--", linewidth=1.2, label=f"{label} ({value:.4g})")
    if panel.log_y:
        ax.set_yscale("log")
    ax.set_title(panel.title, fontsize=10)
    ax.set_xlabel("step")
    ax.set_ylabel(panel.ylabel)
    ax.grid(True, alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="best")


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the training curves of ``run_dir`` (a run directory, or its metrics.jsonl) into one image.

    One panel per metric family against the optimizer step: loss and its terms, learning rate, images per second,
    gradient norm, the student's evaluations (teacher's as dashed lines), anything else. ``out`` defaults to
    ``<run_dir>/curves.png``; a directory gets curves.png inside it; the suffix picks the format (.png, .pdf,
    .svg, ...). The file is replaced atomically. Uses matplotlib's Agg canvas directly: no display is needed and
    pyplot's global state (a notebook's backend) is left alone. Returns the path written.
    """
    metrics = read_metrics(run_dir)
    path = Path(out) if out is not None else metrics.path.parent / CURVES_FILE
    if path.is_dir():
        path = path / CURVES_FILE
    if not path.suffix:
        path = path.with_suffix(".png")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = layout(metrics)
    cols = 1 if len(panels) == 1 else 2
    rows = -(-len(panels) // cols)
    fig = Figure(figsize=(6.4 * cols, 3.4 * rows + 0.4), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in canvas.get_supported_filetypes():
        raise KdforgeError(f"cannot write '{path}': unknown image format '.{fmt}' "
                           f"(use one of {', '.join('.' + f for f in sorted(canvas.get_supported_filetypes()))})")
    first = None
    for i, panel in enumerate(panels):  # one step axis for all, so that a feature lines up across panels
        ax = fig.add_subplot(rows, cols, i + 1, sharex=first)
        first = first or ax
        _draw(ax, panel)
    steps = metrics.steps
    title = f"{metrics.path.parent.name or metrics.path.parent.resolve().name}: steps {steps[0]} to {steps[-1]}"
    if metrics.skipped:
        title += f" ({len(metrics.skipped)} unreadable line{'s' if len(metrics.skipped) > 1 else ''} of "
        title += f"{metrics.path.name} skipped)"
    fig.suptitle(title, fontsize=11)

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
    return path
