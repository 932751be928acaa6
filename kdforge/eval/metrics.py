"""Small helpers shared by the evaluators: label checks, top-k accuracy, the confusion matrix and per-class
accuracy."""

from __future__ import annotations

import torch

from kdforge.errors import DataError

__all__ = ["check_labelled", "confusion_matrix", "per_class_accuracy", "topk_accuracy"]


def topk_accuracy(scores: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Percentage of rows of ``scores`` (Tensor[Q, C]) whose label (LongTensor[Q]) is among the k highest."""
    if len(labels) == 0:
        return float("nan")
    top = scores.topk(min(k, scores.shape[1]), dim=1).indices
    return 100.0 * (top == labels[:, None]).any(dim=1).float().mean().item()


def confusion_matrix(predicted: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """LongTensor[C, C] counting the items of true class r (row, ``labels``) predicted as class c (column,
    ``predicted``); both LongTensor[Q] with values in [0, ``num_classes``)."""
    flat = labels.long() * num_classes + predicted.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(confusion: torch.Tensor) -> list[float]:
    """Top-1 accuracy in % of each true class (row) of a confusion matrix: its diagonal count over its row's sum;
    nan for a class with no items."""
    totals = confusion.sum(dim=1).double()
    correct = confusion.diagonal().double()
    return (100.0 * correct / totals).tolist()  # 0 / 0 is nan: a class that was never seen has no accuracy


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
