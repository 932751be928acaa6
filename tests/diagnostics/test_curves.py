"""Training curves from metrics.jsonl: what a user sees after a run, a resume, a crash, or before any run."""

import json
import math
import os
import signal
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kdforge.cli import main
from kdforge.diagnostics.curves import layout, plot_curves, read_metrics
from kdforge.engine.loggers import JsonlLogger
from kdforge.errors import MetricsError

TINY = Path(__file__).resolve().parents[1] / "recipes" / "tiny.toml"


def write_run(run_dir: Path, steps, *, scale=1.0, evals=(), teacher=None, extra=None):
    """metrics.jsonl as the trainer writes it (through the real logger): a train row per step, an eval row at each
    step of ``evals`` holding every result so far."""
    logger = JsonlLogger(JsonlLogger.Config(), run_dir)
    results = {"teacher_knn_top1": teacher} if teacher is not None else {}
    for step in steps:
        if step in evals:
            results[f"student_knn_top1_{'before' if step == 0 else f'epoch{step}'}"] = 10.0 + step
            logger.log(step, dict(results))
        if step == 0:
            continue
        row = {"loss": scale * 3.0 / step, "lr": 1e-3 * step, "loss/token": scale * 1.0 / step,
               "loss/patch": scale * 2.0 / step, "grad_norm": 1.0, "img_per_s": 100.0 + step, "epoch": step / 4}
        logger.log(step, {**row, **(extra or {}).get(step, {})})
    logger.close()


def assert_real_image(path: Path, min_bytes=10_000):
    assert path.is_file() and path.stat().st_size > min_bytes
    with Image.open(path) as im:
        assert im.format == "PNG"
        pixels = np.asarray(im.convert("L"))
    assert pixels.shape[0] > 200 and pixels.shape[1] > 200
    assert (pixels < 128).mean() > 0.01  # curves, axes and text, not a blank canvas


def titles(run_dir):
    return [p.title.split(" (")[0] for p in layout(read_metrics(run_dir))]


def test_full_run_gives_a_png_with_a_panel_per_metric_family(tmp_path):
    write_run(tmp_path, range(0, 13), evals=(0, 6, 12), teacher=80.0)
    out = plot_curves(tmp_path)
    assert out == tmp_path / "curves.png"
    assert_real_image(out)
    assert titles(tmp_path) == ["training loss", "learning rate", "throughput", "gradient norm", "evaluation"]
    panels = {p.title.split(" (")[0]: p for p in layout(read_metrics(tmp_path))}
    loss_labels = [line.label for line in panels["training loss"].lines]
    assert loss_labels == ["loss (total)", "patch", "token"]
    # Each evaluation at the step it ran, although every later eval row repeats it; the teacher as a reference.
    student = panels["evaluation"].lines[0]
    assert (student.steps, student.values) == ([0, 6, 12], [10.0, 16.0, 22.0])
    assert [(label, value) for label, value, _ in panels["evaluation"].references] == [("teacher knn_top1", 80.0)]


def test_resumed_run_keeps_the_last_row_written_for_each_step(tmp_path):
    write_run(tmp_path, range(1, 9))  # crashed after step 8, last checkpoint at step 5
    write_run(tmp_path, range(6, 13), scale=2.0)  # the resumed run rewrites steps 6 to 8
    loss = read_metrics(tmp_path).series["loss"]
    assert sorted(loss) == list(range(1, 13))
    assert loss[5] == pytest.approx(3.0 / 5) and loss[6] == pytest.approx(6.0 / 6) and loss[8] == pytest.approx(6.0 / 8)
    line = layout(read_metrics(tmp_path))[0].lines[0]
    assert line.steps == list(range(1, 13))  # one point per step, in order, not a zig-zag back to step 6
    assert_real_image(plot_curves(tmp_path))


def test_corrupt_last_line_is_skipped_and_reported(tmp_path):
    write_run(tmp_path, range(1, 6))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "time": 17.5, "loss": 0.4')  # killed mid-write
    with pytest.warns(UserWarning, match=r"skipped line 6 .*half-written"):
        metrics = read_metrics(tmp_path)
    assert metrics.skipped == [6] and sorted(metrics.series["loss"]) == [1, 2, 3, 4, 5]
    with pytest.warns(UserWarning, match="skipped line 6"):
        assert_real_image(plot_curves(tmp_path))


def test_half_row_glued_to_the_resumed_runs_first_row_keeps_the_whole_row(tmp_path):
    write_run(tmp_path, range(1, 6))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "time": 17.5, "lo')  # killed mid-write; the resume appends right after it
    write_run(tmp_path, range(5, 8), scale=2.0)
    with pytest.warns(UserWarning, match="kept the whole row after half a row on line 6"):
        metrics = read_metrics(tmp_path)
    assert metrics.recovered == [6] and metrics.skipped == []
    assert sorted(metrics.series["loss"]) == list(range(1, 8)) and metrics.series["loss"][5] == pytest.approx(1.2)


def test_nan_inf_missing_keys_and_a_single_point(tmp_path):
    write_run(tmp_path, range(1, 5), extra={2: {"grad_norm": float("inf")}, 3: {"loss/token": float("nan")}})
    panels = {p.title.split(" (")[0]: p for p in layout(read_metrics(tmp_path))}
    assert panels["gradient norm"].lines[0].dropped == 1 and panels["gradient norm"].lines[0].steps == [1, 3, 4]
    token = next(line for line in panels["training loss"].lines if line.label == "token")
    assert token.dropped == 1 and all(math.isfinite(v) for v in token.values)
    assert_real_image(plot_curves(tmp_path))

    single = tmp_path / "single"
    single.mkdir()
    (single / "metrics.jsonl").write_text(json.dumps({"step": 1, "time": 1.0, "loss": 2.5}) + "\n")
    assert titles(single) == ["training loss"]  # no lr, throughput or eval keys: no empty panels for them
    assert_real_image(plot_curves(single, tmp_path / "out" / "one.png"), min_bytes=3_000)


@pytest.mark.filterwarnings("ignore:.*half-written")
@pytest.mark.parametrize("content", [None, "", "\n", '{"step": 1, "lo'], ids=["missing", "empty", "blank", "torn"])
def test_missing_or_empty_metrics_say_train_first_and_exit_2(tmp_path, capsys, content):
    if content is not None:
        (tmp_path / "metrics.jsonl").write_text(content)
    with pytest.raises(MetricsError, match="train first") as exc:
        plot_curves(tmp_path)
    assert str(tmp_path / "metrics.jsonl") in str(exc.value)
    assert main(["diagnose", "curves", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "kdforge: error:" in err and "metrics.jsonl" in err and "train first" in err
    assert not (tmp_path / "curves.png").exists()


def test_cli_prints_where_the_png_went_and_reports_skipped_lines(tmp_path, capsys):
    write_run(tmp_path, range(1, 6))
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "lo')
    out = tmp_path / "plots" / "run.png"
    assert main(["diagnose", "curves", str(tmp_path), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"curves: {out}"
    assert "kdforge: warning:" in captured.err and "skipped line 6" in captured.err
    assert_real_image(out)
    assert main(["diagnose", "curves", str(tmp_path), "--out", str(tmp_path / "x.notaformat")]) == 2
    assert "unknown image format" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ the trainer
def tiny_trainer(run_dir, *overrides):
    from kdforge.engine.trainer import Trainer
    from kdforge.recipe import load_recipe

    return Trainer(load_recipe(TINY, overrides=list(overrides)), run_dir, show_progress=False)


def test_training_writes_curves_png_with_its_evaluations(tmp_path):
    trainer = tiny_trainer(tmp_path, "train.max_steps=3",
                           "eval.data={plugin = 'procedural', num_train = 24, num_val = 16, image_size = 16}",
                           "eval.evaluators={knn = {plugin = 'knn', k = 5}}", "eval.teacher=false")
    trainer.fit()
    assert_real_image(tmp_path / "curves.png")
    assert titles(tmp_path) == ["training loss", "learning rate", "throughput", "gradient norm", "evaluation"]


def test_sigterm_writes_curves_png_before_stopping(tmp_path, monkeypatch):
    from kdforge.engine.trainer import Preempted

    trainer = tiny_trainer(tmp_path)
    original = trainer.train_step

    def train_step(micro):
        out = original(micro)
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # as a cluster scheduler would; fit() has its handler in place
        return out

    monkeypatch.setattr(trainer, "train_step", train_step)
    with pytest.raises(Preempted):
        trainer.fit()
    assert_real_image(tmp_path / "curves.png")
    assert sorted(read_metrics(tmp_path).series["loss"]) == [1, 2]


def test_a_plotting_failure_warns_and_the_run_still_succeeds(tmp_path, monkeypatch):
    import kdforge.diagnostics.curves as curves

    def broken(run_dir, out=None):
        raise RuntimeError("no fonts on this node")

    monkeypatch.setattr(curves, "plot_curves", broken)
    trainer = tiny_trainer(tmp_path, "train.max_steps=1")
    with pytest.warns(UserWarning, match="curves.png.*RuntimeError: no fonts on this node"):
        summary = trainer.fit()
    assert summary["steps"] == 1 and (tmp_path / "summary.json").is_file()
    assert not (tmp_path / "curves.png").exists()
