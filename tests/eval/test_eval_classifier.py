"""The classifier evaluator's per-class results: confusion matrix, per-class and mean per-class top-1."""

import math

import pytest
import torch

from kdforge.eval.classifier import ClassifierEvaluator
from kdforge.eval.metrics import confusion_matrix, per_class_accuracy

pytestmark = pytest.mark.usefixtures("single_thread")

# Six test images of three classes, and the class each is predicted as:
#   true      0  0  0  1  1  2
#   predicted 0  1  0  1  2  0
TRUE = [0, 0, 0, 1, 1, 2]
PREDICTED = [0, 1, 0, 1, 2, 0]
CONFUSION = [[2, 1, 0],   # class 0: two right, one taken for 1
             [0, 1, 1],   # class 1: one right, one taken for 2
             [1, 0, 0]]   # class 2: its one image taken for 0


class _Images(torch.utils.data.Dataset):
    """Image i holds the value i everywhere; its label is labels[i]."""

    def __init__(self, labels):
        self.labels_ = labels

    def __len__(self):
        return len(self.labels_)

    def __getitem__(self, i):
        return {"image": torch.full((3, 2, 2), float(i)), "label": self.labels_[i], "index": i}


def _logits_predicting(predicted, num_classes):
    """A classifier (images -> Tensor[B, C]) that predicts predicted[i] for image i, with a runner-up after it."""
    def classify(images):
        i = images[:, 0, 0, 0].round().long()
        pred = torch.tensor(predicted)[i]
        logits = torch.zeros(len(i), num_classes)
        logits[torch.arange(len(i)), (pred + 1) % num_classes] = 1.0
        logits[torch.arange(len(i)), pred] = 2.0
        return logits
    return classify


def test_confusion_matrix_and_per_class_accuracy_of_a_hand_case():
    confusion = confusion_matrix(torch.tensor(PREDICTED), torch.tensor(TRUE), 3)
    assert confusion.tolist() == CONFUSION
    per_class = per_class_accuracy(confusion)
    assert per_class == pytest.approx([200 / 3, 50.0, 0.0], rel=1e-12)


def test_the_evaluator_reports_per_class_results_beside_top1():
    evaluator = ClassifierEvaluator(ClassifierEvaluator.Config())
    out = evaluator.run(_logits_predicting(PREDICTED, 3), None, _Images(TRUE), device=torch.device("cpu"),
                        batch_size=4)
    assert out["classifier_confusion"] == CONFUSION
    assert all(isinstance(v, int) for row in out["classifier_confusion"] for v in row)
    assert out["classifier_per_class"] == pytest.approx([200 / 3, 50.0, 0.0], rel=1e-9)
    assert out["classifier_mean_per_class"] == pytest.approx((200 / 3 + 50.0) / 3, rel=1e-9)
    assert out["classifier_top1"] == pytest.approx(100 * 3 / 6, rel=1e-6)  # the diagonal over all images
    assert "classifier_top5" not in out


def test_a_class_without_test_images_has_no_accuracy_and_is_left_out_of_the_mean():
    evaluator = ClassifierEvaluator(ClassifierEvaluator.Config())
    true, predicted = [0, 0, 2, 2, 2, 4], [0, 1, 2, 2, 0, 4]  # classes 1 and 3 have no test image
    out = evaluator.run(_logits_predicting(predicted, 5), None, _Images(true), device=torch.device("cpu"))
    per_class = out["classifier_per_class"]
    assert len(per_class) == 5 and math.isnan(per_class[1]) and math.isnan(per_class[3])
    assert per_class[0] == pytest.approx(50.0) and per_class[2] == pytest.approx(200 / 3) and per_class[4] == 100.0
    assert out["classifier_mean_per_class"] == pytest.approx((50.0 + 200 / 3 + 100.0) / 3, rel=1e-9)
    assert out["classifier_top5"] == 100.0
    assert sum(map(sum, out["classifier_confusion"])) == 6


def test_a_test_label_beyond_the_classifiers_outputs_gets_a_row_and_counts_as_wrong():
    evaluator = ClassifierEvaluator(ClassifierEvaluator.Config())
    out = evaluator.run(_logits_predicting([0, 1, 1], 2), None, _Images([0, 1, 2]), device=torch.device("cpu"))
    assert out["classifier_confusion"] == [[1, 0, 0], [0, 1, 0], [0, 1, 0]]
    assert out["classifier_per_class"] == [100.0, 100.0, 0.0]
