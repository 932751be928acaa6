"""Weighted k-nearest-neighbour classification on frozen features (the DINO protocol).

Features are L2-normalised; each test image takes its k most cosine-similar train images, each votes for its
label with weight exp(similarity / T), and the class with the largest summed vote wins. DINO uses k = 20 and
T = 0.07. The test set is processed in chunks so that the similarity block stays small whatever the train size.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from kdforge.eval import Evaluator
from kdforge.eval.metrics import check_labelled, topk_accuracy
from kdforge.ops import knn
from kdforge.ranges import Workers

__all__ = ["KnnEvaluator", "knn_classify", "knn_predict_scores"]

# elements of one [chunk, N_train] similarity block (256 MiB in fp32): bounds memory for ImageNet-sized galleries
_BLOCK_ELEMENTS = 1 << 26


def knn_predict_scores(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    *,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Summed neighbour votes per class: float32 Tensor[Q, num_classes] on the CPU.

    Args:
        train_features: Tensor[N, D] (any scale; normalised here).
        train_labels: LongTensor[N] in [0, num_classes).
        test_features: Tensor[Q, D].
        k: neighbours per query (clamped to N).
        temperature: vote weight exp(cos / temperature).
        chunk_size: most queries per similarity block (smaller when N is large).
        device: where the similarities are computed (default: the features' device).
    """
    device = torch.device(device) if device is not None else train_features.device
    train = F.normalize(train_features.to(device, torch.float32), dim=1)
    labels = train_labels.to(device)
    k = min(k, train.shape[0])
    rows = max(1, min(chunk_size, _BLOCK_ELEMENTS // max(1, train.shape[0])))
    out = []
    for start in range(0, test_features.shape[0], rows):
        query = F.normalize(test_features[start : start + rows].to(device, torch.float32), dim=1)
        sims, idx = knn(query, train, k, metric="ip")  # [c, k], best first, streamed over the train set
        weights = (sims / temperature).exp()
        votes = torch.zeros(query.shape[0], num_classes, device=device)
        votes.scatter_add_(1, labels[idx], weights)
        out.append(votes.cpu())
    if not out:
        return torch.empty(0, num_classes)
    return torch.cat(out)


def knn_classify(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    k: int = 20,
    temperature: float = 0.07,
    chunk_size: int = 1024,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """``{"knn_top1": %, "knn_top5": %}`` (top-5 only with at least 5 classes) of the weighted kNN classifier."""
    check_labelled(train_labels, "train")
    check_labelled(test_labels, "test")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    scores = knn_predict_scores(
        train_features, train_labels, test_features,
        num_classes=num_classes, k=k, temperature=temperature, chunk_size=chunk_size, device=device,
    )
    test_labels = test_labels.cpu()
    metrics = {"knn_top1": topk_accuracy(scores, test_labels, 1)}
    if num_classes >= 5:
        metrics["knn_top5"] = topk_accuracy(scores, test_labels, 5)
    return metrics


class KnnEvaluator(Evaluator):
    """DINO's weighted kNN classifier on L2-normalised frozen features: knn_top1 and knn_top5 in percent."""

    name = "knn"
    progress_label = "kNN"

    @dataclasses.dataclass
    class Config:
        k: int = 20
        "neighbours that vote for each test image"
        temperature: float = 0.07
        "vote weight of a neighbour is exp(cosine similarity / temperature)"
        chunk_size: int = 1024
        "most test images per similarity block (fewer when the train set is large)"
        num_workers: Workers = 0
        "DataLoader workers for feature extraction"

        def __post_init__(self) -> None:
            if self.k < 1:
                raise ValueError(f"k must be >= 1, got {self.k}")
            if self.temperature <= 0:
                raise ValueError(f"temperature must be > 0, got {self.temperature}")
            if self.chunk_size < 1:
                raise ValueError(f"chunk_size must be >= 1, got {self.chunk_size}")

    def evaluate(self, train_features, train_labels, test_features, test_labels, *, device):
        return knn_classify(
            train_features, train_labels, test_features, test_labels,
            k=self.cfg.k, temperature=self.cfg.temperature, chunk_size=self.cfg.chunk_size, device=device,
        )
