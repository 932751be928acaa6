"""Loss landscape of a run's student around its final weights (papers/004, section 4, after Li et al. 2018,
"Visualizing the Loss Landscape of Neural Nets").

Two random directions ``d1``, ``d2`` in the space of the student's parameters are drawn from a standard Gaussian
(one seeded generator on the CPU, d1 then d2, parameter after parameter in ``named_parameters`` order, so the same
seed gives the same directions on any device) and **filter-normalised**: every filter of a direction (a row along
its first dimension: an output channel of a convolution, an output row of a linear layer, a row of the relative
position bias table) is rescaled to the norm of the same filter of the weights, so that a step of 1 moves every
filter by its own size and landscapes of differently scaled models compare. Parameters with one dimension or none
(biases, LayerNorm scales and shifts) get a zero direction and keep their trained values, as Li et al. do (their
code's ``ignore="biasbn"``). Only the student's trainable parameters move; the loss modules' own parameters (FD's
1x1 projection, Proteus' heads) stay at their trained values, as they are part of the objective rather than of the
representation being judged.

The loss at grid point (alpha, beta) is the run's own training objective, the weighted sum of the recipe's
``[losses]`` built by :func:`kdforge.engine.trainer.build_objective` exactly as the trainer builds it, with the
weights ``w + alpha * d1 + beta * d2``, averaged over a fixed set of batches: training images chosen by the seed,
under the evaluation transform (resize, centre crop: no random augmentation), teacher outputs computed once and
reused at every point, masks (for masked-view losses) drawn once per batch from the seed. The student runs in eval
mode (no drop path) at the recipe's training precision, so every point is deterministic and the centre is the loss
of the final weights exactly. FD's figure 5 draws the *fine-tuning* loss / accuracy of the distilled models; a fine-
tuning objective is task-specific, so kdforge draws the distillation objective, which is enough to compare the
flatness of runs of one recipe (for a fair comparison across methods, fine-tune each and compare those losses).

Points are evaluated from the centre outwards (ring by ring), so a run stopped by its time budget still holds the
neighbourhood of the final weights. The weights are restored after the last point, and the run's files are only
read: the checkpoint is loaded with weights_only and nothing in the run directory but the outputs is written.

:func:`loss_landscape` works on any module and loss function (tests use toy models); :func:`landscape_run` is
``kdforge diagnose landscape RUN_DIR``, writing ``landscape.json`` and ``landscape.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from kdforge.engine.checkpoint import atomic_path
from kdforge.errors import CheckpointError, KdforgeError

LANDSCAPE_JSON = "landscape.json"
LANDSCAPE_PNG = "landscape.png"
#: Li et al.'s guard against a zero-norm direction filter.
_EPS = 1e-10

#: (total loss, {term label: value}) at the model's current weights.
LossFn = Callable[[], tuple[float, dict[str, float]]]


def filter_normalised_direction(params: dict[str, Tensor], generator: torch.Generator) -> dict[str, Tensor]:
    """A random direction for ``params`` ({name: Tensor}): Gaussian, drawn on the CPU from ``generator`` in the
    dict's order, each filter (row along dim 0) rescaled to the norm of that filter of the weights; parameters with
    ``dim() <= 1`` get zeros. Returns {name: Tensor} like each parameter (device and dtype)."""
    direction = {}
    for name, w in params.items():
        d = torch.randn(w.shape, generator=generator, dtype=torch.float32)
        w = w.detach().to("cpu", torch.float32)
        if w.dim() <= 1:
            d.zero_()
        else:
            d_rows, w_rows = d.reshape(d.shape[0], -1), w.reshape(w.shape[0], -1)
            d_rows.mul_((w_rows.norm(dim=1) / (d_rows.norm(dim=1) + _EPS)).unsqueeze(1))
        direction[name] = d.to(params[name].device, params[name].dtype)
    return direction


@dataclasses.dataclass
class Landscape:
    """The loss on a grid around the final weights. ``loss[i][j]`` is at (alpha = ``alphas[j]``, beta =
    ``betas[i]``): rows follow beta, columns alpha (matplotlib's contour(X, Y, Z) layout)."""

    alphas: list[float]
    betas: list[float]
    loss: Tensor
    """Tensor[N, N] float64; nan where not evaluated (see ``evaluated``) and where the loss was not finite."""
    terms: dict[str, Tensor]
    """{loss label: Tensor[N, N]}: each term of the objective, unweighted."""
    evaluated: Tensor
    """BoolTensor[N, N]: the points computed before the time budget ran out."""
    centre_loss: float
    """The loss at the final weights (alpha = beta = 0)."""
    grid_requested: int
    seconds: float
    """Wall time of :func:`loss_landscape`: the directions and the grid (not building the models or the batches)."""
    seconds_per_point: float
    note: str = ""
    """What the time budget changed, if anything."""
    direction_cosine: float = float("nan")
    """Cosine between d1 and d2 (near 0 for random high-dimensional directions)."""

    @property
    def complete(self) -> bool:
        return bool(self.evaluated.all())

    def to_json(self) -> dict[str, Any]:
        """Plain data: grids as nested lists, ``None`` where not evaluated and non-finite losses as the strings
        "nan" / "inf" / "-inf" (as metrics.jsonl writes them), so that the file is strict JSON."""
        finite = self.loss[self.evaluated & torch.isfinite(self.loss)]
        return {
            "alphas": self.alphas,
            "betas": self.betas,
            "loss": _grid_json(self.loss, self.evaluated),
            "terms": {k: _grid_json(v, self.evaluated) for k, v in self.terms.items()},
            "centre_loss": _number_json(self.centre_loss),
            "min_loss": float(finite.min()) if finite.numel() else None,
            "max_loss": float(finite.max()) if finite.numel() else None,
            "grid": len(self.alphas),
            "grid_requested": self.grid_requested,
            "points": self.loss.numel(),
            "evaluated": int(self.evaluated.sum()),
            "complete": self.complete,
            "note": self.note,
            "wall_seconds": round(self.seconds, 3),
            "seconds_per_point": round(self.seconds_per_point, 4),
            "direction_cosine": _number_json(self.direction_cosine),
        }


def _number_json(v: float) -> float | str:
    return v if math.isfinite(v) else str(v)


def _grid_json(values: Tensor, evaluated: Tensor) -> list[list[float | str | None]]:
    return [[_number_json(float(v)) if ok else None for v, ok in zip(row, oks)]
            for row, oks in zip(values.tolist(), evaluated.tolist())]


def _ring_order(n: int) -> list[tuple[int, int]]:
    """Every (i, j) of an n x n grid (n odd), the centre first, then ring after ring (Chebyshev distance)."""
    c = n // 2
    return sorted(((i, j) for i in range(n) for j in range(n)), key=lambda ij: (max(abs(ij[0] - c), abs(ij[1] - c)),
                                                                                   ij))


def _check_lattice(grid: int, radius: float) -> None:
    if grid < 3 or grid % 2 == 0:
        raise KdforgeError(f"--grid must be odd and >= 3 (the final weights are its centre), got {grid}")
    if not (radius > 0 and math.isfinite(radius)):
        raise KdforgeError(f"--range must be a positive number, got {radius}")


def _fitting_grid(requested: int, per_point: float, seconds_left: float) -> int:
    """The largest odd n <= requested (and >= 3) whose n * n - 1 remaining points fit into ``seconds_left``."""
    n = requested
    while n > 3 and (n * n - 1) * per_point > seconds_left:
        n -= 2
    return n


def trainable_parameters(module: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of ``module``'s floating-point parameters that require gradients (what training moved)."""
    return {n: p for n, p in module.named_parameters() if p.requires_grad and p.is_floating_point()}


@torch.no_grad()
def loss_landscape(
    loss_fn: LossFn, params: dict[str, nn.Parameter], *, grid: int = 21, radius: float = 1.0, seed: int = 0,
    max_seconds: float | None = None, deadline: float | None = None, show_progress: bool = True,
) -> Landscape:
    """The loss ``loss_fn()`` on a ``grid`` x ``grid`` lattice of (alpha, beta) in [-radius, radius]^2, the
    parameters ``params`` set to ``w + alpha * d1 + beta * d2`` in place for each point (see the module docstring
    for d1, d2) and restored to ``w`` afterwards, whatever happens.

    ``grid`` must be odd (the centre, the final weights, is a grid point). Time is bounded by ``max_seconds`` from
    this call, or by ``deadline`` (a :func:`time.perf_counter` value, for a caller that started the clock earlier):
    the centre is evaluated first and its cost sets the grid to the largest odd size that fits (the same range,
    coarser); if time still runs out, the evaluation stops and the points not reached are nan, ``evaluated`` False,
    and ``note`` says so. ``show_progress``: a tqdm bar with the points done, their rate and the ETA.
    """
    from tqdm.auto import tqdm

    _check_lattice(grid, radius)
    if not params:
        raise KdforgeError("the model has no trainable parameters to move along a direction")
    start = time.perf_counter()
    if deadline is None and max_seconds is not None:
        deadline = start + max_seconds
    origin = {name: p.detach().clone() for name, p in params.items()}
    generator = torch.Generator().manual_seed(seed)  # d1, then d2, from one stream (as Li et al. draw them)
    d1 = filter_normalised_direction(origin, generator)
    d2 = filter_normalised_direction(origin, generator)
    cosine = _cosine(d1, d2)

    def move_to(alpha: float, beta: float) -> None:
        for name, p in params.items():
            p.copy_(origin[name] + alpha * d1[name] + beta * d2[name])

    n, note = grid, ""
    values: dict[tuple[int, int], tuple[float, dict[str, float]]] = {}
    bar = tqdm(total=grid * grid, desc="landscape", unit="point", dynamic_ncols=True, disable=not show_progress)
    try:
        move_to(0.0, 0.0)
        t0 = time.perf_counter()
        centre = loss_fn()
        per_point = next_cost = time.perf_counter() - t0
        bar.update(1)
        if deadline is not None:
            n = _fitting_grid(grid, per_point, deadline - time.perf_counter())
            if n != grid:
                note = (f"grid shrunk from {grid} x {grid} to {n} x {n} (same range) to fit --max-seconds: "
                        f"{per_point:.3g} s per point")
                bar.total = n * n
                bar.refresh()
        axis = [radius * (k - n // 2) / (n // 2) for k in range(n)]  # the centre exactly 0.0
        values[(n // 2, n // 2)] = centre
        for i, j in _ring_order(n)[1:]:
            if deadline is not None and time.perf_counter() + next_cost > deadline:
                note = ((note + "; ") if note else "") + (
                    f"stopped by --max-seconds after {len(values)} of {n * n} points (the centre outwards): the "
                    "rest are null")
                break
            t_point = time.perf_counter()
            move_to(axis[j], axis[i])
            values[(i, j)] = loss_fn()
            bar.update(1)
            per_point = (time.perf_counter() - t0) / len(values)
            next_cost = max(per_point, time.perf_counter() - t_point)  # a cost that grows is not averaged away
    finally:
        bar.close()
        for name, p in params.items():
            p.copy_(origin[name])
    loss = torch.full((n, n), float("nan"), dtype=torch.float64)
    evaluated = torch.zeros(n, n, dtype=torch.bool)
    labels = list(centre[1])
    terms = {k: loss.clone() for k in labels}
    for (i, j), (total, parts) in values.items():
        loss[i, j], evaluated[i, j] = total, True
        for k in labels:
            terms[k][i, j] = parts[k]
    return Landscape(
        alphas=axis, betas=list(axis), loss=loss, terms=terms, evaluated=evaluated, centre_loss=float(centre[0]),
        grid_requested=grid, seconds=time.perf_counter() - start, seconds_per_point=per_point, note=note,
        direction_cosine=cosine,
    )


def _cosine(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    dot = sum(float((a[k].double() * b[k].double()).sum()) for k in a)
    na = math.sqrt(sum(float(a[k].double().square().sum()) for k in a))
    nb = math.sqrt(sum(float(b[k].double().square().sum()) for k in b))
    return dot / (na * nb) if na > 0 and nb > 0 else float("nan")


# ------------------------------------------------------------------------------------------------- a run's objective
class FixedBatchLoss:
    """A run's training objective at the current weights of its student, on fixed batches: callable as a
    :data:`LossFn`. ``objective`` is a :class:`kdforge.engine.trainer.Objective` holding the run's weights;
    ``batches`` collated batches on its device. Teacher outputs and masks are computed once, here."""

    def __init__(self, objective, batches: list[dict], *, mask_seed: int):
        self.objective = objective
        self.model = objective.model.eval()
        self.prepared = []
        with torch.no_grad():
            for index, batch in enumerate(batches):
                images = batch["image"]
                mask = None
                if objective.masker is not None and "masked" in self.model.views:
                    g = torch.Generator().manual_seed((mask_seed * 1_000_003 + index * 1009) % (2**63))
                    mask = objective.masker(images.shape[0], objective.grid, g).to(images.device)
                self.prepared.append((images, mask, objective.teacher_forward(images), batch))
        self.images = sum(int(p[0].shape[0]) for p in self.prepared)

    @torch.no_grad()
    def __call__(self) -> tuple[float, dict[str, float]]:
        """(weighted total, {label: term}), each the mean over the batches weighted by their sizes."""
        total, terms = 0.0, {}
        for images, mask, teacher_out, batch in self.prepared:
            with self.objective.autocast():
                loss, parts = self.model(images, mask, teacher_out, batch)
            share = images.shape[0] / self.images
            total += float(loss) * share
            for k, v in parts.items():
                terms[k] = terms.get(k, 0.0) + float(v) * share
        return total, terms


def _fixed_batches(recipe, count: int, seed: int, device: torch.device) -> list[dict]:
    """``count`` batches of ``train.batch_size`` training images (fewer if the data set is smaller), chosen by a
    permutation seeded with ``seed``, under the evaluation transform; a streaming source gives its first items."""
    import itertools

    from kdforge.data import collate
    from kdforge.data.transforms import build_transform
    from kdforge.plugins import get_registry

    dataset = get_registry().create("data_sources", recipe.data, "data").build(
        "train", build_transform(recipe.augment, train=False))
    size = recipe.train.batch_size
    if isinstance(dataset, torch.utils.data.IterableDataset):
        items = list(itertools.islice(iter(dataset), count * size))
    else:
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: count * size]
        items = [dataset[i] for i in order.tolist()]
    batches = [collate(items[k: k + size]) for k in range(0, len(items), size)]
    batches = [dict(b, image=b["image"].to(device)) for b in batches if len(b["image"])]
    if not batches:
        raise KdforgeError("the run's [data] gave no readable training image to evaluate the loss on")
    return batches


def run_objective(state: dict, recipe, device: torch.device):
    """The run's :class:`kdforge.engine.trainer.Objective` with the checkpoint ``state``'s weights (student and loss
    modules) on ``device``, in eval mode."""
    from kdforge.engine.trainer import build_objective

    objective = build_objective(recipe, device)
    try:
        objective.model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"the checkpoint does not fit the run's recipe ({str(exc).splitlines()[0]})") from None
    objective.model.eval()
    return objective


def landscape_run(
    run_dir: str | Path, *, checkpoint: str | Path | None = None, grid: int = 21, radius: float = 1.0,
    batches: int = 4, seed: int = 0, max_seconds: float | None = 600.0, out: str | Path | None = None,
    show_progress: bool = True, trust: bool = False,
) -> tuple[Path, Path, Landscape]:
    """The loss landscape of a run's student (``run_dir``: recipe.toml and last.pt, or ``checkpoint``) on
    ``batches`` training batches: writes landscape.json and the plot (default RUN_DIR/landscape.png; the JSON goes
    beside it). ``max_seconds`` bounds the time from the moment the models are built (the teacher forwards of the
    fixed batches included). Returns (json path, image path, landscape). ``trust``: see
    :func:`kdforge.engine.runs.read_run`."""
    from kdforge.engine.distributed import pick_device
    from kdforge.engine.runs import read_run

    if batches < 1:
        raise KdforgeError(f"--batches must be >= 1, got {batches}")
    if max_seconds is not None and not max_seconds > 0:
        raise KdforgeError(f"--max-seconds must be > 0, got {max_seconds}")
    _check_lattice(grid, radius)
    checkpoint = Path(checkpoint) if checkpoint else Path(run_dir) / "last.pt"
    state, recipe = read_run(run_dir, checkpoint, builds=("teacher", "student", "data"), trust=trust)
    device = pick_device(recipe.run.device)
    objective = run_objective(state, recipe, device)
    deadline = time.perf_counter() + max_seconds if max_seconds is not None else None
    loss_fn = FixedBatchLoss(objective, _fixed_batches(recipe, batches, seed, device), mask_seed=seed)
    params = trainable_parameters(objective.model.student)
    landscape = loss_landscape(loss_fn, params, grid=grid, radius=radius, seed=seed, deadline=deadline,
                               show_progress=show_progress)

    if landscape.note:  # the CLI prints warnings as "kdforge: warning: ..."
        warnings.warn(landscape.note, stacklevel=2)
    out = Path(out) if out else Path(run_dir) / LANDSCAPE_PNG
    json_path = out.with_name(LANDSCAPE_JSON) if out.name == LANDSCAPE_PNG else out.with_suffix(".json")
    report = {
        "run": str(run_dir), "checkpoint": str(checkpoint), "step": int(state["step"]), "name": recipe.run.name,
        "objective": {label: float(w) for label, w in objective.model.weights.items()},
        **landscape.to_json(),
        "settings": {
            "range": radius, "batches": len(loss_fn.prepared), "images": loss_fn.images,
            "batch_size": recipe.train.batch_size, "max_seconds": max_seconds, "device": str(device),
            "precision": recipe.train.precision, "normalisation": "filter (Li et al. 2018); 1-d parameters not moved",
            "directions_over": "student trainable parameters",
            "parameters": sum(p.numel() for p in params.values()),
            "moved": sum(p.numel() for p in params.values() if p.dim() > 1),
        },
        "seeds": {"directions": seed, "batches": seed, "masks": seed, "run": recipe.run.seed},
    }
    with atomic_path(json_path) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    title = (f"{recipe.run.name}, step {report['step']}: {recipe.train.precision} distillation loss on "
             f"{loss_fn.images} training images")
    return json_path, plot_landscape(landscape, out, title), landscape


# ------------------------------------------------------------------------------------------------- the plot
def plot_landscape(landscape: Landscape, out: str | Path, title: str = "") -> Path:
    """Contour map (the centre marked), 3-D surface and the two axis cross-sections (FD's figure-5 view: the loss
    along one direction) of ``landscape``, written atomically to ``out`` (the suffix picks the format)."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    a, b = np.array(landscape.alphas), np.array(landscape.betas)
    z = landscape.loss.numpy()
    shown = np.ma.masked_invalid(z)
    fig = Figure(figsize=(16.0, 4.6), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 3, 1)
    mesh = ax.pcolormesh(a, b, shown, shading="nearest", cmap="viridis")
    fig.colorbar(mesh, ax=ax, label="loss")
    if landscape.complete and np.isfinite(z).all() and np.ptp(z) > 0:
        lines = ax.contour(a, b, z, levels=12, colors="white", linewidths=0.7)
        ax.clabel(lines, fontsize=6, fmt="%.3g")
    ax.plot([0], [0], marker="*", color="red", markersize=10, label=f"final weights ({landscape.centre_loss:.4g})")
    ax.set(xlabel="alpha (direction 1)", ylabel="beta (direction 2)", title="loss around the final weights",
           aspect="equal")
    ax.legend(fontsize=7, loc="upper right")

    ax3 = fig.add_subplot(1, 3, 2, projection="3d")
    if landscape.complete and np.isfinite(z).all():
        xx, yy = np.meshgrid(a, b)
        ax3.plot_surface(xx, yy, z, cmap="viridis", linewidth=0, antialiased=True)
        ax3.set(xlabel="alpha", ylabel="beta", zlabel="loss", title="surface")
    else:
        ax3.set_axis_off()
        ax3.set_title("surface: not drawn (grid incomplete or not finite)")

    ax1 = fig.add_subplot(1, 3, 3)
    c = len(a) // 2
    for label, values, axis in (("along direction 1 (beta = 0)", z[c, :], a), ("along direction 2 (alpha = 0)",
                                                                                z[:, c], b)):
        ok = np.isfinite(values)
        ax1.plot(axis[ok], values[ok], marker="o", markersize=3, label=label)
    ax1.set(xlabel="step along the direction", ylabel="loss", title="cross-sections")
    ax1.grid(True, alpha=0.3)
    ax1.legend(fontsize=7)
    suptitle = title + (f"\n{landscape.note}" if landscape.note else "")
    if suptitle:
        fig.suptitle(suptitle, fontsize=10)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".").lower() or "png")
    return out


__all__ = ["FixedBatchLoss", "Landscape", "filter_normalised_direction", "landscape_run", "loss_landscape",
           "plot_landscape", "run_objective", "trainable_parameters"]
