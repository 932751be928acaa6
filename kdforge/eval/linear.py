"""Linear probe: multinomial logistic regression on frozen, cached features.

Features are extracted once, standardised with the train set's mean and std, and a linear classifier is fitted
full-batch with L-BFGS (strong Wolfe line search) on ``mean cross-entropy + wd / 2 * ||W||^2``. The weight decay
is picked from a short list on a held-out part of the train set, then the probe is refitted on the whole train
set with it and scored on the test set. Full-batch L-BFGS on a convex problem has no learning rate or schedule to
tune, which is what a probe should be: a measurement of the features, not of the optimiser.
"""

from __future__ import annotations

import dataclasses
from typing import Annotated, Sequence

import torch
import torch.nn.functional as F

from kdforge.eval import Evaluator
from kdforge.eval.metrics import check_labelled, topk_accuracy
from kdforge.ranges import Range, Seed, Workers

__all__ = ["LinearProbeEvaluator", "fit_logistic", "linear_probe"]


def fit_logistic(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    *,
    weight_decay: float,
    max_iter: int = 200,
    chunk_rows: int = 65536,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit ``logits = features @ W + b``: returns (W Tensor[D, C], b Tensor[C]) on the features' device.

    The loss is summed chunk by chunk (``chunk_rows`` rows at a time) with a backward per chunk, so the [N, C]
    logits never exist at once. The bias is not decayed.
    """
    n, d = features.shape
    w = torch.zeros(d, num_classes, device=features.device, requires_grad=True)
    b = torch.zeros(num_classes, device=features.device, requires_grad=True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe",
        tolerance_grad=1e-6, tolerance_change=1e-9,
    )

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = 0.0
        for start in range(0, n, chunk_rows):
            logits = features[start : start + chunk_rows] @ w + b
            loss = F.cross_entropy(logits, labels[start : start + chunk_rows], reduction="sum") / n
            loss.backward()
            total += loss.item()
        reg = 0.5 * weight_decay * w.pow(2).sum()
        reg.backward()
        return torch.tensor(total + reg.item())

    opt.step(closure)
    return w.detach(), b.detach()


def _scores(features: torch.Tensor, w: torch.Tensor, b: torch.Tensor, chunk_rows: int = 65536) -> torch.Tensor:
    return torch.cat([features[s : s + chunk_rows] @ w + b for s in range(0, len(features), chunk_rows)]).cpu()


def linear_probe(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    weight_decays: Sequence[float] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1),
    holdout_fraction: float = 0.2,
    max_iter: int = 200,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """``{"linear_top1": %, "linear_top5": % (5+ classes), "linear_weight_decay": chosen}`` of a logistic probe.

    Args:
        train_features: Tensor[N, D]; train_labels: LongTensor[N]; test_features: Tensor[Q, D];
        test_labels: LongTensor[Q].
        weight_decays: candidates, each fitted on (1 - holdout_fraction) of the train set and scored on the rest;
            the best (the larger one on a tie) is refitted on the whole train set.
    """
    check_labelled(train_labels, "train")
    check_labelled(test_labels, "test")
    device = torch.device(device) if device is not None else train_features.device
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    x = train_features.to(device, torch.float32)
    y = train_labels.to(device)
    # standardise with train statistics: L-BFGS converges far faster on well-conditioned inputs, and the weight
    # decay then means the same thing for every encoder's feature scale
    mean = x.mean(dim=0)
    std = x.std(dim=0, unbiased=False).clamp_min(1e-6)
    x = (x - mean) / std
    xt = (test_features.to(device, torch.float32) - mean) / std

    candidates = sorted(set(float(wd) for wd in weight_decays), reverse=True)
    best_wd = candidates[0]
    n_hold = int(round(holdout_fraction * len(x)))
    if len(candidates) > 1 and n_hold >= 1 and len(x) - n_hold >= 1:
        g = torch.Generator().manual_seed(seed)
        perm = torch.randperm(len(x), generator=g).to(device)
        hold, fit = perm[:n_hold], perm[n_hold:]
        best_acc = -1.0
        for wd in candidates:  # largest first: on a tie the simpler model is kept
            w, b = fit_logistic(x[fit], y[fit], num_classes, weight_decay=wd, max_iter=max_iter)
            acc = topk_accuracy(_scores(x[hold], w, b), y[hold].cpu(), 1)
            if acc > best_acc:
                best_acc, best_wd = acc, wd
    w, b = fit_logistic(x, y, num_classes, weight_decay=best_wd, max_iter=max_iter)
    scores = _scores(xt, w, b)
    labels = test_labels.cpu()
    metrics = {"linear_top1": topk_accuracy(scores, labels, 1)}
    if num_classes >= 5:
        metrics["linear_top5"] = topk_accuracy(scores, labels, 5)
    metrics["linear_weight_decay"] = best_wd
    return metrics


class LinearProbeEvaluator(Evaluator):
    """Logistic regression on frozen features, weight decay picked on held-out train data: linear_top1 in percent."""

    name = "linear_probe"
    progress_label = "probe"

    @dataclasses.dataclass
    class Config:
        weight_decays: list[float] = dataclasses.field(default_factory=lambda: [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1])
        "L2 penalties tried (on standardised features); the best on the held-out split is used"
        holdout_fraction: float = 0.2
        "fraction of the train set held out to pick the weight decay"
        max_iter: Annotated[int, Range(ge=1, le=100_000)] = 200
        "L-BFGS iterations per fit"
        seed: Seed = 0
        "seed of the held-out split"
        num_workers: Workers = 0
        "DataLoader workers for feature extraction"

        def __post_init__(self) -> None:
            if not self.weight_decays or any(wd < 0 for wd in self.weight_decays):
                raise ValueError(f"weight_decays must be a non-empty list of values >= 0, got {self.weight_decays}")
            if not 0 <= self.holdout_fraction < 1:
                raise ValueError(f"holdout_fraction must be in [0, 1), got {self.holdout_fraction}")
            if self.max_iter < 1:
                raise ValueError(f"max_iter must be >= 1, got {self.max_iter}")

    def evaluate(self, train_features, train_labels, test_features, test_labels, *, device):
        return linear_probe(
            train_features, train_labels, test_features, test_labels,
            weight_decays=self.cfg.weight_decays, holdout_fraction=self.cfg.holdout_fraction,
            max_iter=self.cfg.max_iter, seed=self.cfg.seed, device=device,
        )
