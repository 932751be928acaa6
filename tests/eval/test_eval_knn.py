"""Weighted kNN (DINO protocol) on features whose answer is known."""

import pytest
import torch
import torch.nn.functional as F

from kdforge.errors import DataError
from kdforge.eval.knn import knn_classify, knn_predict_scores


def _onehot_features(labels, num_classes, noise, dims=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(labels), dims)
    x[torch.arange(len(labels)), labels] = 1.0
    return x + noise * torch.randn(len(labels), dims, generator=g)


def _dense_reference(train, train_y, test, num_classes, k, t):
    """Straightforward DINO kNN: the whole similarity matrix at once, votes as one-hot times weight."""
    sims = F.normalize(test, dim=1) @ F.normalize(train, dim=1).T
    top, idx = sims.topk(k, dim=1)
    onehot = F.one_hot(train_y[idx], num_classes).float()  # [Q, k, C]
    return (onehot * (top / t).exp()[..., None]).sum(1)


def test_separable_features_score_near_100_and_random_ones_near_chance():
    y_train, y_test = torch.arange(1000) % 10, torch.arange(400) % 10
    good = knn_classify(_onehot_features(y_train, 10, 0.1), y_train, _onehot_features(y_test, 10, 0.1, seed=1), y_test)
    assert good["knn_top1"] > 99.0 and good["knn_top5"] == 100.0
    g = torch.Generator().manual_seed(2)
    rand = knn_classify(torch.randn(1000, 32, generator=g), y_train, torch.randn(400, 32, generator=g), y_test)
    assert 3.0 < rand["knn_top1"] < 18.0  # chance is 10 %
    assert 38.0 < rand["knn_top5"] < 62.0  # chance is 50 %


def test_matches_a_dense_reference_and_chunking_changes_nothing():
    g = torch.Generator().manual_seed(0)
    train, test = torch.randn(300, 16, generator=g), torch.randn(77, 16, generator=g)
    train_y = torch.randint(0, 7, (300,), generator=g)
    ref = _dense_reference(train, train_y, test, 7, k=20, t=0.07)
    for chunk in (1, 10, 1024):
        scores = knn_predict_scores(train, train_y, test, num_classes=7, k=20, temperature=0.07, chunk_size=chunk)
        torch.testing.assert_close(scores, ref, rtol=1e-5, atol=1e-5)


def test_weights_favour_a_close_neighbour_over_a_far_majority():
    # one train point right at the query (class 0) against two at 60 degrees (class 1)
    train = torch.tensor([[1.0, 0.0], [0.5, 0.866], [0.5, -0.866]])
    train_y = torch.tensor([0, 1, 1])
    test, test_y = torch.tensor([[1.0, 0.0]]), torch.tensor([0])
    assert knn_classify(train, train_y, test, test_y, k=3, temperature=0.07)["knn_top1"] == 100.0
    # with a very high temperature the weights are nearly equal and the majority wins
    assert knn_classify(train, train_y, test, test_y, k=3, temperature=100.0)["knn_top1"] == 0.0


def test_scale_of_the_features_does_not_matter():
    y = torch.arange(200) % 4
    x = _onehot_features(y, 4, 0.5, dims=8)
    a = knn_classify(x, y, x[:50], y[:50])
    b = knn_classify(x * 1000, y, x[:50] * 0.001, y[:50])
    assert a == b
    assert "knn_top5" not in a  # fewer than 5 classes: no top-5


def test_k_larger_than_the_train_set_is_clamped():
    x, y = torch.eye(3), torch.tensor([0, 1, 2])
    assert knn_classify(x, y, x, y, k=20)["knn_top1"] == 100.0


def test_unlabelled_or_empty_sets_are_refused():
    x = torch.randn(4, 3)
    with pytest.raises(DataError, match="unlabelled"):
        knn_classify(x, torch.tensor([0, 1, -1, 0]), x, torch.tensor([0, 1, 1, 0]))
    with pytest.raises(DataError, match="empty"):
        knn_classify(x, torch.tensor([0, 1, 1, 0]), x[:0], torch.tensor([], dtype=torch.long))
