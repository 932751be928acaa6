"""Evaluators: measure frozen features (kNN classifier, linear probes). Built-ins in :mod:`kdforge.eval.builtin`.

Contract: class attribute ``name``, a ``Config`` dataclass, ``__init__(cfg)`` and
``run(encoder, train_set, test_set, *, device, batch_size) -> dict[str, float]`` where ``encoder`` maps
``Tensor[B, 3, H, W]`` (float in [0, 1]) to ``Tensor[B, D]`` features and the datasets follow the
:mod:`kdforge.data` item contract with labels. Metric names are prefixed by the evaluator (``knn_top1``). A result
may also be a list (the classifier's per-class accuracy and confusion matrix): the engine keeps it in summary.json
and the checkpoint but logs only the float results as scalars.
The engine and ``kdforge eval`` pass an :class:`Encoder`, which can also give the last blocks' tokens.
An evaluator with ``reads = "logits"`` (the classifier evaluator) gets, instead of features, the logits
``Tensor[B, C]`` of the classifier trained with the encoder (a supervised loss's head), and runs only for encoders
that have one.

An evaluator of frozen features (all built-ins) implements :meth:`Evaluator.evaluate` instead of ``run``: the base
class's ``run`` extracts the train and test features once and passes them on.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, ClassVar

import torch

from kdforge.errors import KdforgeError
from kdforge.eval.features import extract_features


class Evaluator:
    name: ClassVar[str]
    #: What ``run``'s encoder gives: "features" (frozen features, Tensor[B, D]) or "logits" (Tensor[B, C] of the
    #: classifier trained with the encoder; evaluators of logits run only for encoders that have a classifier).
    reads: ClassVar[str] = "features"
    #: Prefix of the feature-extraction progress bars in :meth:`run` ("kNN" -> "kNN train features").
    progress_label: ClassVar[str] = "eval"

    @dataclasses.dataclass
    class Config:
        pass

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def run(
        self,
        encoder: Callable[[torch.Tensor], torch.Tensor],
        train_set: torch.utils.data.Dataset,
        test_set: torch.utils.data.Dataset,
        *,
        device: torch.device,
        batch_size: int = 256,
    ) -> dict[str, float]:
        """Extract the train and test features (DataLoader workers: the config's ``num_workers``, 0 without one),
        then return :meth:`evaluate` of them."""
        common = dict(device=device, batch_size=batch_size, num_workers=getattr(self.cfg, "num_workers", 0))
        train_x, train_y = extract_features(encoder, train_set, desc=f"{self.progress_label} train features", **common)
        test_x, test_y = extract_features(encoder, test_set, desc=f"{self.progress_label} test features", **common)
        return self.evaluate(train_x, train_y, test_x, test_y, device=device)

    def evaluate(
        self,
        train_features: torch.Tensor,
        train_labels: torch.Tensor,
        test_features: torch.Tensor,
        test_labels: torch.Tensor,
        *,
        device: torch.device,
    ) -> dict[str, float]:
        """Metrics of frozen features: float32 Tensor[N, D] and LongTensor[N] of the train set, Tensor[Q, D] and
        LongTensor[Q] of the test set, all on the CPU; ``device`` is where the evaluator may compute."""
        raise NotImplementedError


class Encoder:
    """What the engine and ``kdforge eval`` hand to the evaluators: a student or teacher (``model``) with the way
    one vector per image is taken from it (``features``, the recipe's ``eval.features``).

    ``encoder(images)`` maps Tensor[B, 3, H, W] in [0, 1] to float32 Tensor[B, D]; evaluators that read more than
    one vector per image (linear_dinov2) call :meth:`intermediate_layers`. ``autocast``: a function returning the
    context (e.g. the trainer's mixed precision) both run under; ``role`` names the model in messages.
    """

    def __init__(
        self,
        model: Callable[[torch.Tensor], Any],
        features: str = "cls",
        *,
        role: str = "student",
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ):
        self.model, self.features, self.role, self.autocast = model, features, role, autocast

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return pooled(self.model(images), self.features).float()

    def intermediate_layers(self, images: torch.Tensor, n: int) -> list[Any]:
        """The model's ``intermediate_layers(images, n)``: its last n blocks' outputs (``.cls`` Tensor[B, D],
        ``.patches`` Tensor[B, N, D]), oldest first, after the final norm. KdforgeError if the model has none."""
        layers = getattr(self.model, "intermediate_layers", None)
        if layers is None:
            name = getattr(self.model, "model_name", type(self.model).__name__)
            raise KdforgeError(
                f"{self.role} {name} gives no per-block outputs (it has no intermediate_layers(images, n) method)"
            )
        with self.autocast():
            return layers(images, n)


def pooled(out: Any, how: str) -> torch.Tensor:
    """One vector per image from a student's or teacher's output (``.cls`` / ``.patches``): the CLS token
    (``how`` = "cls") or the mean patch token ("mean_patch"), as the recipe's ``eval.features`` says."""
    return out.cls if how == "cls" else out.patches.mean(dim=1)


def build_eval_sets(eval_cfg: Any, augment: Any) -> tuple[torch.utils.data.Dataset, torch.utils.data.Dataset]:
    """(train set, test set) of a recipe's ``eval.data`` (``eval_cfg``: its EvalConfig) with the evaluation
    transform of ``augment`` (the recipe's TransformConfig): the kNN bank / probe train set and the test set."""
    from kdforge.data.transforms import build_transform
    from kdforge.plugins import get_registry

    source = get_registry().create("data_sources", eval_cfg.data, "eval.data")
    transform = build_transform(augment, train=False)
    return source.build("train", transform), source.build("val", transform)


def evaluate_encoders(
    encoders: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    eval_cfg: Any,
    augment: Any,
    *,
    device: torch.device,
    sets: tuple[torch.utils.data.Dataset, torch.utils.data.Dataset] | None = None,
    logits: dict[str, Callable[[torch.Tensor], torch.Tensor]] | None = None,
) -> dict[str, dict[str, float]]:
    """Every evaluator of a recipe's ``[eval]`` (``eval_cfg``: its EvalConfig) on every encoder, by name:
    ``{name: {metric: value}}``, on ``sets`` (default: :func:`build_eval_sets`, built once for all encoders).
    ``logits``: by the same names, the encoders' classifiers (images -> Tensor[B, C]) for the evaluators that read
    logits; an encoder without one is not scored by them."""
    from kdforge.plugins import get_registry

    registry = get_registry()
    train_set, test_set = sets if sets is not None else build_eval_sets(eval_cfg, augment)
    results: dict[str, dict[str, float]] = {}
    for who, encoder in encoders.items():
        results[who] = {}
        for label, table in eval_cfg.evaluators.items():
            evaluator = registry.create("evaluators", table, f"eval.evaluators.{label}")
            fn = encoder if evaluator.reads == "features" else (logits or {}).get(who)
            if fn is None:
                continue
            metrics = evaluator.run(fn, train_set, test_set, device=device, batch_size=eval_cfg.batch_size)
            results[who].update(metrics)
    return results
