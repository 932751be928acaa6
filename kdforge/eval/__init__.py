"""Evaluators: measure frozen features (kNN classifier, linear probe). Built-ins in :mod:`kdforge.eval.builtin`.

Contract: class attribute ``name``, a ``Config`` dataclass, ``__init__(cfg)`` and
``run(encoder, train_set, test_set, *, device, batch_size) -> dict[str, float]`` where ``encoder`` maps
``Tensor[B, 3, H, W]`` (float in [0, 1]) to ``Tensor[B, D]`` features and the datasets follow the
:mod:`kdforge.data` item contract with labels. Metric names are prefixed by the evaluator (``knn_top1``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar

import torch


class Evaluator:
    name: ClassVar[str]

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
        raise NotImplementedError
