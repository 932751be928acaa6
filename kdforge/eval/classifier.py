"""Top-1 / top-5 accuracy of a trained classifier (a supervised loss's head on the student) on the test set: the
fine-tuning result, as FD reports it (papers/004, "fine-tuning"), beside the kNN and linear-probe measurements of
frozen features."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

from kdforge.eval import Evaluator
from kdforge.eval.features import extract_features
from kdforge.eval.metrics import check_labelled, topk_accuracy
from kdforge.ranges import Workers

__all__ = ["ClassifierEvaluator"]


class ClassifierEvaluator(Evaluator):
    """``classifier_top1`` (and ``classifier_top5`` with 5+ classes), in %, of the logits on the test set; the
    train set is not read."""

    name = "classifier"
    reads: ClassVar[str] = "logits"
    progress_label = "classifier"

    @dataclasses.dataclass
    class Config:
        num_workers: Workers = 0
        """DataLoader workers for the test pass."""

    def run(self, encoder, train_set, test_set, *, device, batch_size=256):
        logits, labels = extract_features(encoder, test_set, device=device, batch_size=batch_size,
                                          num_workers=self.cfg.num_workers, desc="classifier test set")
        check_labelled(labels, "test")
        out = {"classifier_top1": topk_accuracy(logits, labels, 1)}
        if logits.shape[1] >= 5:
            out["classifier_top5"] = topk_accuracy(logits, labels, 5)
        return out
