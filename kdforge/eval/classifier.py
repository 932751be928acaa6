"""Top-1 / top-5 accuracy of a trained classifier (a supervised loss's head on the student) on the test set: the
fine-tuning result, as FD reports it (papers/004, "fine-tuning"), beside the kNN and linear-probe measurements of
frozen features."""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

from kdforge.eval import Evaluator
from kdforge.eval.features import extract_features
from kdforge.eval.metrics import check_labelled, confusion_matrix, per_class_accuracy, topk_accuracy
from kdforge.ranges import Workers

__all__ = ["ClassifierEvaluator"]


class ClassifierEvaluator(Evaluator):
    """``classifier_top1`` (and ``classifier_top5`` with 5+ classes), in %, of the logits on the test set, with
    ``classifier_mean_per_class`` (the mean over the classes that have test images of their top-1, in %),
    ``classifier_per_class`` (list: top-1 in % of each class, by class index; nan for a class without test images)
    and ``classifier_confusion`` (list of lists of ints: row = true class, column = predicted class; draw it with
    :func:`kdforge.diagnostics.confusion.plot_confusion`). The train set is not read."""

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
        # a test label the classifier has no output for gets a row (and a column) too: all of it counts as wrong
        num_classes = max(logits.shape[1], int(labels.max()) + 1)
        confusion = confusion_matrix(logits.topk(1, dim=1).indices[:, 0], labels, num_classes)
        per_class = per_class_accuracy(confusion)
        seen = [a for a in per_class if not math.isnan(a)]
        out["classifier_mean_per_class"] = sum(seen) / len(seen)
        out["classifier_per_class"] = per_class
        out["classifier_confusion"] = confusion.tolist()
        return out
