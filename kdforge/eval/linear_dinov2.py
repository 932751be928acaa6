"""The DINOv2 linear evaluation: linear heads on the last blocks' CLS tokens, one per learning rate, the best
chosen on held-out train data.

An image is represented by the CLS tokens of the encoder's last ``n_last_blocks`` blocks (each after the final
norm, oldest block first), concatenated, followed by the average of the last block's patch tokens when
``avgpool`` is set: a vector of (n_last_blocks + avgpool) * D. These features are extracted once. A fraction
``val_fraction`` of the train set is held out; on the rest, one linear head per learning rate is trained with SGD
(momentum, cosine decay to zero, DINOv2's lr scaling by batch size / 256), all heads in the same pass over the
same mini-batches from the same initialisation, so that the learning rate is the only difference between them.
The head with the best held-out top-1 (ties: the lower held-out cross-entropy) is scored on the test set.

Unlike :mod:`kdforge.eval.linear` (L-BFGS on standardised pooled features), this measures what DINOv2's papers
report; the two agree on which features are better, not on the numbers.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Sequence

import torch
import torch.nn.functional as F

from kdforge.errors import DataError, KdforgeError
from kdforge.eval import Evaluator
from kdforge.eval.metrics import check_labelled, topk_accuracy
from kdforge.ranges import NonNegativeFloat, PositiveFloat, PositiveInt, Range, Seed, Workers

__all__ = ["DinoV2LinearEvaluator", "block_features", "linear_dinov2", "train_linear_heads"]

#: DINOv2's learning-rate grid (dinov2/eval/linear.py), before the batch-size scaling.
DINOV2_LRS = [1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2, 1e-1]

# rows of features scored at once: bounds the [heads, rows, classes] logits when scoring large sets
_SCORE_ROWS = 4096


def block_features(layers: Sequence[Any], *, n_last_blocks: int, avgpool: bool) -> torch.Tensor:
    """One vector per image from block outputs (``.cls`` Tensor[B, D], ``.patches`` Tensor[B, N, D]), oldest block
    first: the CLS tokens of the last ``n_last_blocks`` in that order, then (``avgpool``) the mean patch token of the
    last block. Returns float32 Tensor[B, (n_last_blocks + avgpool) * D]."""
    if len(layers) < n_last_blocks:
        raise KdforgeError(f"block_features: {n_last_blocks} blocks asked for, {len(layers)} given")
    parts = [layer.cls for layer in layers[len(layers) - n_last_blocks :]]
    if avgpool:
        parts.append(layers[-1].patches.mean(dim=1))
    return torch.cat(parts, dim=-1).float()


def _scores(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Logits of every head, Tensor[L, M, C], for features Tensor[M, F], weights Tensor[L, F, C], biases [L, C]."""
    return torch.cat([x[s : s + _SCORE_ROWS] @ w + b[:, None] for s in range(0, len(x), _SCORE_ROWS)], dim=1)


def train_linear_heads(
    features: torch.Tensor,
    labels: torch.Tensor,
    num_classes: int,
    lrs: Sequence[float],
    *,
    epochs: int = 10,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Train one linear head per learning rate on the same mini-batches: (W Tensor[L, F, C], b Tensor[L, C]).

    ``features`` Tensor[N, F] and ``labels`` LongTensor[N] on the device to train on. Each head starts from the same
    weights (normal, std 0.01; zero bias) and takes SGD steps with momentum on its mean cross-entropy (+ weight
    decay on W), its learning rate ``lrs[l] * batch_size / 256`` decayed to 0 on a cosine over all steps. The heads
    are trained as one batched tensor; their losses are summed, which leaves each head's gradient its own. The
    mini-batch order and the initialisation come from ``seed``.
    """
    n, dim = features.shape
    device = features.device
    g = torch.Generator().manual_seed(seed)
    heads = len(lrs)
    w = (torch.randn(dim, num_classes, generator=g) * 0.01).to(device).expand(heads, -1, -1).clone()
    b = torch.zeros(heads, num_classes, device=device)
    w.requires_grad_(True)
    b.requires_grad_(True)
    buffers = [torch.zeros_like(w), torch.zeros_like(b)]
    base = torch.tensor([float(lr) * batch_size / 256 for lr in lrs], device=device)
    steps_per_epoch = math.ceil(n / batch_size)
    total = epochs * steps_per_epoch
    step = 0
    with torch.enable_grad():
        for _ in range(epochs):
            order = torch.randperm(n, generator=g).to(device)
            for start in range(0, n, batch_size):
                idx = order[start : start + batch_size]
                logits = features[idx] @ w + b[:, None]  # [L, B, C]
                loss = F.cross_entropy(logits.flatten(0, 1), labels[idx].repeat(heads), reduction="sum") / len(idx)
                gw, gb = torch.autograd.grad(loss, (w, b))
                lr = base * 0.5 * (1 + math.cos(math.pi * step / total))
                with torch.no_grad():
                    gw = gw + weight_decay * w
                    for param, grad, buf, shape in ((w, gw, buffers[0], (-1, 1, 1)), (b, gb, buffers[1], (-1, 1))):
                        buf.mul_(momentum).add_(grad)
                        param.sub_(lr.view(shape) * buf)
                step += 1
    return w.detach(), b.detach()


def linear_dinov2(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    lrs: Sequence[float] = DINOV2_LRS,
    epochs: int = 10,
    batch_size: int = 128,
    momentum: float = 0.9,
    weight_decay: float = 0.0,
    val_fraction: float = 0.2,
    seed: int = 0,
    device: torch.device | str | None = None,
) -> dict[str, float]:
    """Metrics of the best head: ``{"linear_dinov2_top1": %, "linear_dinov2_top5": % (5+ classes),
    "linear_dinov2_lr": its lr (unscaled, as in ``lrs``), "linear_dinov2_top1_val": % on the held-out split}``.

    Args:
        train_features: Tensor[N, F]; train_labels: LongTensor[N]; test_features: Tensor[Q, F];
        test_labels: LongTensor[Q] (features from :func:`block_features`, or any other).
        lrs: base learning rates, one head each (see :func:`train_linear_heads` for the rest).
        val_fraction: share of the train set (chosen at random with ``seed``) held out to pick the head; the heads
            are trained on the rest. The test set plays no part in the choice.
    """
    check_labelled(train_labels, "train")
    check_labelled(test_labels, "test")
    device = torch.device(device) if device is not None else train_features.device
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    n_val = int(round(val_fraction * len(train_labels)))
    if not 1 <= n_val < len(train_labels):
        raise DataError(
            f"linear_dinov2 holds out val_fraction = {val_fraction} of the {len(train_labels)} train images to "
            f"pick the learning rate, which leaves {n_val} to choose on and {len(train_labels) - n_val} to train: "
            "both need at least one; use more train images or another val_fraction"
        )
    x = train_features.to(device, torch.float32)
    y = train_labels.to(device)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)).to(device)
    val, fit = perm[:n_val], perm[n_val:]
    # the heads draw their initialisation and batch order from a stream of their own, apart from the split's
    w, b = train_linear_heads(
        x[fit], y[fit], num_classes, lrs, epochs=epochs, batch_size=batch_size, momentum=momentum,
        weight_decay=weight_decay, seed=seed + 1,
    )
    val_logits = _scores(x[val], w, b)  # [L, n_val, C]
    y_val = y[val]
    val_top1 = [topk_accuracy(s.cpu(), y_val.cpu(), 1) for s in val_logits]
    val_loss = [F.cross_entropy(s, y_val).item() for s in val_logits]
    best = max(range(len(lrs)), key=lambda i: (val_top1[i], -val_loss[i]))
    scores = _scores(test_features.to(device, torch.float32), w[best : best + 1], b[best : best + 1])[0].cpu()
    labels = test_labels.cpu()
    metrics = {"linear_dinov2_top1": topk_accuracy(scores, labels, 1)}
    if num_classes >= 5:
        metrics["linear_dinov2_top5"] = topk_accuracy(scores, labels, 5)
    metrics["linear_dinov2_lr"] = float(lrs[best])
    metrics["linear_dinov2_top1_val"] = val_top1[best]
    return metrics


class DinoV2LinearEvaluator(Evaluator):
    """DINOv2's linear evaluation: heads on the last blocks' CLS tokens (+ mean patch token), one per learning rate,
    the best on held-out train data: linear_dinov2_top1 in percent, with the chosen lr and its held-out top-1.

    Reads the encoder's :meth:`kdforge.eval.Encoder.intermediate_layers` rather than its pooled features, so the
    encoder must be a student or teacher that gives them (timm ViTs do).
    """

    name = "linear_dinov2"
    progress_label = "DINOv2 linear"

    @dataclasses.dataclass
    class Config:
        n_last_blocks: PositiveInt = 4
        "CLS tokens of this many last blocks are concatenated (DINOv2 tries 1 and 4)"
        avgpool: bool = True
        "also append the average of the last block's patch tokens"
        lrs: list[PositiveFloat] = dataclasses.field(default_factory=lambda: list(DINOV2_LRS))
        "base learning rates, one head each, scaled by batch_size / 256; the best on the held-out split is reported"
        epochs: Annotated[int, Range(ge=1, le=10_000)] = 10
        "passes over the (cached) train features"
        batch_size: Annotated[int, Range(ge=1, le=1 << 20)] = 128
        "features per SGD step of the heads (feature extraction uses eval.batch_size)"
        momentum: Annotated[float, Range(ge=0, lt=1)] = 0.9
        "SGD momentum"
        weight_decay: NonNegativeFloat = 0.0
        "L2 penalty on the head weights (DINOv2: 0)"
        val_fraction: Annotated[float, Range(gt=0, lt=1)] = 0.2
        "fraction of the train set held out to pick the learning rate"
        seed: Seed = 0
        "seed of the held-out split, the initialisation and the mini-batch order"
        num_workers: Workers = 0
        "DataLoader workers for feature extraction"

        def __post_init__(self) -> None:
            if not self.lrs:
                raise ValueError("lrs must list at least one learning rate, e.g. [1e-3, 1e-2, 1e-1]")

    def run(self, encoder, train_set, test_set, *, device, batch_size=256):
        """Extract :func:`block_features` of the train and test sets once, then :meth:`evaluate` them."""
        n, avgpool = self.cfg.n_last_blocks, self.cfg.avgpool
        layers_of = getattr(encoder, "intermediate_layers", None)
        if layers_of is None:
            raise KdforgeError(
                f"evaluator '{self.name}' reads the last blocks' tokens, but got a plain feature function: pass a "
                "kdforge.eval.Encoder around a student or teacher"
            )

        def features(images: torch.Tensor) -> torch.Tensor:
            try:
                layers = layers_of(images, n)
            except KdforgeError as exc:
                raise KdforgeError(
                    f"evaluator '{self.name}' reads the CLS tokens of the last {n} blocks (n_last_blocks), but {exc}: "
                    f"lower n_last_blocks, measure this encoder with 'knn' or 'linear_probe' instead, or, for the "
                    "teacher, set eval.teacher = false"
                ) from exc
            return block_features(layers, n_last_blocks=n, avgpool=avgpool)

        return super().run(features, train_set, test_set, device=device, batch_size=batch_size)

    def evaluate(self, train_features, train_labels, test_features, test_labels, *, device):
        c = self.cfg
        return linear_dinov2(
            train_features, train_labels, test_features, test_labels,
            lrs=c.lrs, epochs=c.epochs, batch_size=c.batch_size, momentum=c.momentum, weight_decay=c.weight_decay,
            val_fraction=c.val_fraction, seed=c.seed, device=device,
        )
