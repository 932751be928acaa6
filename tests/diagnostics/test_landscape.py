"""kdforge.diagnostics.landscape: filter-normalised directions, the loss grid around the final weights (centre,
restoring, determinism, time budget), and ``kdforge diagnose landscape`` on a tiny run and on the FD smoke run."""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch
from PIL import Image
from torch import nn

from kdforge.diagnostics.landscape import (
    FixedBatchLoss,
    filter_normalised_direction,
    landscape_run,
    loss_landscape,
    run_objective,
    trainable_parameters,
)
from kdforge.cli import main
from kdforge.errors import KdforgeError

from cli_helpers import TINY, kdforge


def _toy():
    """A small MLP with a conv in front and its fixed data: (model, loss_fn)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.LayerNorm(12), nn.Linear(12, 5), nn.ReLU(),
                          nn.Linear(5, 1))
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 2, 4, 4, generator=g), torch.randn(16, 1, generator=g)

    def loss_fn():
        mse = float(nn.functional.mse_loss(model(x), y).detach())
        return mse, {"mse": mse}

    return model, loss_fn


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------------------------------------------- toy models
def test_each_direction_filter_has_the_norm_of_the_weight_filter():
    model, _ = _toy()
    params = trainable_parameters(model)
    d = filter_normalised_direction(params, torch.Generator().manual_seed(0))
    assert list(d) == list(params)
    for name, w in params.items():
        assert d[name].shape == w.shape and d[name].dtype == w.dtype
        if w.dim() <= 1:  # biases and LayerNorm parameters stay where training left them
            assert not d[name].any(), name
        else:
            rows, w_rows = d[name].reshape(w.shape[0], -1), w.detach().reshape(w.shape[0], -1)
            torch.testing.assert_close(rows.norm(dim=1), w_rows.norm(dim=1), rtol=1e-5, atol=1e-7)
            assert not torch.allclose(rows / rows.norm(dim=1, keepdim=True),
                                      w_rows / w_rows.norm(dim=1, keepdim=True))  # a new direction, not w itself
    # A zero filter of the weights gives a zero filter of the direction (Li et al.'s guard), not nan.
    w = torch.ones(3, 4)
    w[1] = 0
    d = filter_normalised_direction({"w": w}, torch.Generator().manual_seed(0))["w"]
    assert torch.isfinite(d).all() and d[1].abs().max() < 1e-8 and d[0].norm() == pytest.approx(2.0)


def test_grid_points_are_the_loss_at_w_plus_alpha_d1_plus_beta_d2_and_the_centre_is_exact():
    model, loss_fn = _toy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    final_loss = loss_fn()[0]
    land = loss_landscape(loss_fn, trainable_parameters(model), grid=5, radius=0.5, seed=7, show_progress=False)
    assert land.complete and land.alphas == [-0.5, -0.25, 0.0, 0.25, 0.5] and land.betas == land.alphas
    assert land.centre_loss == final_loss and float(land.loss[2, 2]) == final_loss  # exactly
    for n, p in model.named_parameters():  # the weights are put back exactly
        assert torch.equal(p, before[n]), n
    assert loss_fn()[0] == final_loss
    # Rebuild one corner by hand: d1 then d2 from one generator seeded with the seed; rows follow beta.
    g = torch.Generator().manual_seed(7)
    d1 = filter_normalised_direction(before, g)
    d2 = filter_normalised_direction(before, g)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(before[n] + 0.25 * d1[n] - 0.5 * d2[n])
    assert float(land.loss[0, 3]) == pytest.approx(loss_fn()[0], rel=1e-6)
    torch.testing.assert_close(land.terms["mse"], land.loss)
    assert abs(land.direction_cosine) < 0.5


def test_same_seed_same_landscape_other_seed_other_directions():
    model, loss_fn = _toy()
    params = trainable_parameters(model)
    a = loss_landscape(loss_fn, params, grid=3, seed=3, show_progress=False)
    b = loss_landscape(loss_fn, params, grid=3, seed=3, show_progress=False)
    c = loss_landscape(loss_fn, params, grid=3, seed=4, show_progress=False)
    assert torch.equal(a.loss, b.loss)
    assert not torch.equal(a.loss, c.loss) and a.centre_loss == c.centre_loss


def test_weights_are_restored_when_the_loss_raises():
    model, loss_fn = _toy()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []

    def failing():
        calls.append(1)
        if len(calls) == 4:
            raise RuntimeError("boom")
        return loss_fn()

    with pytest.raises(RuntimeError, match="boom"):
        loss_landscape(failing, trainable_parameters(model), grid=3, show_progress=False)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


class _Clock:
    """A stand-in for the landscape module's ``time``: only the loss advances it, by a chosen cost per call."""

    def __init__(self):
        self.now = 100.0

    def perf_counter(self):
        return self.now


def _costly(loss_fn, clock, costs):
    """``loss_fn`` that advances ``clock`` by costs[call] (the last cost repeats)."""
    calls = []

    def timed():
        clock.now += costs[min(len(calls), len(costs) - 1)]
        calls.append(1)
        return loss_fn()

    return timed


def test_time_budget_shrinks_the_grid_after_the_first_point(monkeypatch):
    import kdforge.diagnostics.landscape as landscape

    model, loss_fn = _toy()
    clock = _Clock()
    monkeypatch.setattr(landscape, "time", clock)
    land = loss_landscape(_costly(loss_fn, clock, [0.02]), trainable_parameters(model), grid=21, max_seconds=0.6,
                          show_progress=False)
    # After the centre (0.02 s), 0.58 s are left: 5 x 5 - 1 = 24 more points fit, 7 x 7 - 1 = 48 do not.
    assert land.alphas == [-1.0, -0.5, 0.0, 0.5, 1.0] and land.grid_requested == 21 and land.complete
    assert "shrunk from 21 x 21 to 5 x 5" in land.note and clock.now - 100.0 <= 0.6


def test_time_budget_stops_from_the_centre_outwards_and_says_so(monkeypatch):
    import kdforge.diagnostics.landscape as landscape

    model, loss_fn = _toy()
    clock = _Clock()
    monkeypatch.setattr(landscape, "time", clock)
    # The first point looks cheap, so the grid is not shrunk: the time runs out later.
    land = loss_landscape(_costly(loss_fn, clock, [0.001, 0.1]), trainable_parameters(model), grid=7,
                          max_seconds=1.5, show_progress=False)
    assert len(land.alphas) == 7 and not land.complete and "stopped by --max-seconds" in land.note
    assert clock.now - 100.0 <= 1.5
    done = int(land.evaluated.sum())
    assert 9 < done < 25 and land.evaluated[2:5, 2:5].all()  # the centre, then the inner ring, first
    assert f"after {done} of 49 points" in land.note
    report = json.loads(json.dumps(land.to_json()))
    assert report["evaluated"] == done and report["complete"] is False and report["points"] == 49
    assert sum(v is None for row in report["loss"] for v in row) == 49 - done
    assert report["min_loss"] <= report["centre_loss"] <= report["max_loss"]


def test_grid_and_range_are_checked():
    model, loss_fn = _toy()
    params = trainable_parameters(model)
    for kwargs, message in (({"grid": 4}, "odd"), ({"grid": 1}, "odd"), ({"radius": 0.0}, "positive")):
        with pytest.raises(KdforgeError, match=message):
            loss_landscape(loss_fn, params, show_progress=False, **kwargs)


# ------------------------------------------------------------------------------------------------- a tiny run
@pytest.fixture
def tiny_run(tiny_two_step_run):
    return tiny_two_step_run


def test_centre_of_a_run_is_its_training_objective_at_the_final_weights(tiny_run, tmp_path):
    from kdforge.diagnostics.landscape import _fixed_batches
    from kdforge.engine.runs import read_run

    digest = _sha(tiny_run / "last.pt")
    json_path, image, land = landscape_run(tiny_run, grid=3, batches=2, seed=5, out=tmp_path / "l.png",
                                           show_progress=False)
    state, recipe = read_run(tiny_run, builds=())
    objective = run_objective(state, recipe, torch.device("cpu"))
    loss = FixedBatchLoss(objective, _fixed_batches(recipe, 2, 5, torch.device("cpu")), mask_seed=5)
    total, terms = loss()
    assert land.centre_loss == total and set(land.terms) == {"token", "feature", "patch"} == set(terms)
    assert total == pytest.approx(sum(terms.values()))  # the recipe's weights are all 1
    assert _sha(tiny_run / "last.pt") == digest
    report = json.loads(json_path.read_text())
    assert report["centre_loss"] == total and report["loss"][1][1] == total and report["step"] == 2
    assert report["seeds"] == {"directions": 5, "batches": 5, "masks": 5, "run": 3}
    assert report["settings"]["images"] == 16 and report["complete"] is True


def test_cli_writes_json_and_plot_and_leaves_the_run_alone(tiny_run, capfd):
    files = {p.name: _sha(p) for p in tiny_run.iterdir() if p.is_file()}
    res = kdforge("diagnose", "landscape", tiny_run, "--grid", 5, "--batches", 1, "--range", 0.5)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "landscape.png" in res.stdout and "5 x 5 points" in res.stdout and "point/s" in res.stderr  # the bar
    report = json.loads((tiny_run / "landscape.json").read_text())
    assert report["grid"] == 5 and report["alphas"] == [-0.5, -0.25, 0.0, 0.25, 0.5]
    assert report["min_loss"] <= report["centre_loss"] <= report["max_loss"]
    with Image.open(tiny_run / "landscape.png") as im:
        assert im.format == "PNG" and im.size[0] > 1000
    assert {n: _sha(tiny_run / n) for n in files} == files  # nothing of the run was changed
    # Again in this process (quicker): --no-progress, --out, and the same numbers (deterministic).
    assert main(["diagnose", "landscape", str(tiny_run), "--grid", "5", "--batches", "1", "--range", "0.5",
                 "--no-progress", "--out", str(tiny_run / "again.png")]) == 0
    assert "point/s" not in capfd.readouterr().err
    assert json.loads((tiny_run / "again.json").read_text())["loss"] == report["loss"]


def test_cli_errors_name_what_is_missing(tmp_path, capsys):
    """Exit 2 and one message (in this process: ``main`` is what the console script runs)."""

    def error(*args):
        code = main(["diagnose", "landscape", str(tmp_path), *map(str, args)])
        return code, capsys.readouterr().err

    code, err = error()
    assert code == 2 and "holds no recipe.toml" in err
    (tmp_path / "recipe.toml").write_text(TINY.read_text())
    code, err = error()
    assert code == 2 and "no checkpoint at" in err and "--checkpoint" in err
    (tmp_path / "last.pt").write_bytes(b"not a checkpoint")
    code, err = error()
    assert code == 2 and "damaged or not a checkpoint" in err
    for args, message in ((["--grid", 4], "--grid must be odd"), (["--range", -1], "--range must be a positive"),
                          (["--batches", 0], "--batches must be >= 1"), (["--max-seconds", 0], "--max-seconds")):
        code, err = error(*args)
        assert code == 2 and message in err, err
    assert not (tmp_path / "landscape.json").exists()
    res = kdforge("diagnose", "landscape", tmp_path / "missing")  # and through the console entry point
    assert res.returncode == 2 and "holds no recipe.toml" in res.stderr


# ------------------------------------------------------------------------------------------------- the FD smoke run
@pytest.mark.slow
def test_fd_smoke_run_landscape(fd_smoke_run, tmp_path):
    digest = _sha(fd_smoke_run / "last.pt")
    t0 = time.perf_counter()
    res = kdforge("diagnose", "landscape", fd_smoke_run, "--grid", 5, "--batches", 1, "--no-progress",
                  "--max-seconds", 120, "--out", tmp_path / "landscape.png")
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-3000:]
    report = json.loads((tmp_path / "landscape.json").read_text())
    summary = {k: report[k] for k in ("grid", "evaluated", "centre_loss", "min_loss", "max_loss", "wall_seconds",
                                      "seconds_per_point", "note")}
    print(f"FD smoke landscape, step {report['step']} ({wall:.1f} s with start-up): {summary}")
    # Seconds on an idle CPU; the budget (which bounds the time, not the grid) holds however busy the machine is.
    assert report["wall_seconds"] <= 120 and report["step"] > 0
    assert list(report["objective"]) == ["feature"] and report["settings"]["precision"] == "fp32"
    # A trained run sits in a valley of its own objective: every neighbour of the centre costs loss.
    n, loss = report["grid"], report["loss"]
    c = n // 2
    ring = [loss[i][j] for i in range(c - 1, c + 2) for j in range(c - 1, c + 2) if (i, j) != (c, c)]
    assert None not in ring, report["note"]
    assert report["centre_loss"] < min(ring) and report["min_loss"] == report["centre_loss"]
    assert _sha(fd_smoke_run / "last.pt") == digest
