"""Small helpers shared by the evaluators: label checks and top-k accuracy."""

from __future__ import annotations

import torch

from kdforge.errors import DataError

__all__ = ["check_labelled", "topk_accuracy"]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percentage of rows of ``scores`` (Tensor[Q, C]) whose label (LongTensor[Q]) is among the k highest."""
    if len(labels) == 0:
        return float("nan")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()


def check_labelled(labels: torch.Tensor, which: str) -> None:
    """Raise DataError when a set meant for classification metrics is empty or has unlabelled (-1) items."""
    if len(labels) == 0:
        raise DataError(f"the {which} set is empty (or every image in it was unreadable): nothing to evaluate")
    if (labels < 0).any():
        raise DataError(
            f"{int((labels < 0).sum())} of {len(labels)} images in the {which} set are unlabelled (label -1): "
            "kNN and linear-probe evaluation need a labelled data source (e.g. image_folder with class folders, "
            "digits or procedural)"
        )
