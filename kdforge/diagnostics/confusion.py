"""A classifier's confusion matrix as an image: which true classes (rows) are taken for which (columns).

The matrix is what the classifier evaluator reports as ``classifier_confusion`` (:mod:`kdforge.eval.classifier`).
Colours are row-normalised (the share of each true class predicted as each class), so that a rare class is as
readable as a common one; the counts are written in the cells while there are few enough classes to read them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from kdforge.engine.checkpoint import atomic_path
from kdforge.errors import KdforgeError, ShapeError

__all__ = ["COUNTS_UP_TO", "plot_confusion", "row_normalised"]

#: Counts are written in the cells of matrices with at most this many classes (beyond, they no longer fit).
COUNTS_UP_TO = 30
# Class names on the axes for at most this many classes; beyond, every k-th index.
_NAMES_UP_TO = 60


def row_normalised(matrix: torch.Tensor) -> torch.Tensor:
    """float64 Tensor[C, C]: each row of ``matrix`` divided by its sum (a row without items stays 0)."""
    matrix = matrix.double()
    return matrix / matrix.sum(dim=1, keepdim=True).clamp_min(1)


def plot_confusion(matrix, path: str | Path, class_names: Sequence[str] | None = None, title: str = "") -> Path:
    """Draw the confusion matrix ``matrix`` (C x C counts, rows = true class, columns = predicted: a list of
    lists, an array or a tensor) into the image file ``path`` (format from the suffix, .png when it has none;
    replaced atomically) and return the path.

    Colours are the row-normalised shares; cells hold the counts when C <= :data:`COUNTS_UP_TO`. ``class_names``
    (C names) label the axes, else the class indices do. Uses matplotlib's Agg canvas: no display is needed.
    """
    counts = torch.as_tensor(matrix)
    if counts.ndim != 2 or counts.shape[0] != counts.shape[1] or counts.shape[0] == 0:
        raise ShapeError(f"a confusion matrix must be square, C x C with C >= 1 (rows = true class, columns = "
                         f"predicted), got shape {list(counts.shape)}")
    if counts.is_floating_point() or bool((counts < 0).any()):
        raise ShapeError("a confusion matrix holds counts: non-negative integers (the classifier evaluator's "
                         "classifier_confusion)")
    c = counts.shape[0]
    names = [str(n) for n in class_names] if class_names is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ShapeError(f"{len(names)} class names for a confusion matrix of {c} classes: give one name per class")
    path = Path(path)
    if not path.suffix:
        path = path.with_suffix(".png")

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    side = min(20.0, max(4.5, 0.32 * c + 2.5))
    fig = Figure(figsize=(side + 1.2, side), dpi=100, layout="constrained")
    canvas = FigureCanvasAgg(fig)
    fmt = path.suffix.lstrip(".").lower()
    if fmt not in canvas.get_supported_filetypes():
        raise KdforgeError(f"cannot write '{path}': unknown image format '.{fmt}' "
                           f"(use one of {', '.join('.' + f for f in sorted(canvas.get_supported_filetypes()))})")
    ax = fig.add_subplot(1, 1, 1)
    shares = row_normalised(counts).numpy()
    image = ax.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, shrink=0.8, label="share of the true class")
    if c <= COUNTS_UP_TO:
        size = 9 if c <= 10 else 7 if c <= 20 else 5
        for r in range(c):
            for p in range(c):
                ax.text(p, r, str(int(counts[r, p])), ha="center", va="center", fontsize=size,
                        color="white" if shares[r, p] > 0.5 else "black")
    ticks = list(range(0, c, 1 if c <= _NAMES_UP_TO else -(-c // _NAMES_UP_TO)))
    ax.set_xticks(ticks, [names[i] for i in ticks], rotation=90 if c > 10 or max(map(len, names)) > 3 else 0,
                  fontsize=8)
    ax.set_yticks(ticks, [names[i] for i in ticks], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    total = int(counts.sum())
    correct = int(counts.diagonal().sum())
    summary = f"{c} classes, {total} images, top-1 {100.0 * correct / total:.2f} %" if total else f"{c} classes"
    ax.set_title(f"{title}\n{summary}" if title else summary, fontsize=10)

    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=fmt)
    return path
