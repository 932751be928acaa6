"""Linear probe (logistic regression on frozen features) on features whose answer is known."""

import pytest
import torch

from kdforge.errors import DataError
from kdforge.eval.knn import knn_classify
from kdforge.eval.linear import fit_logistic, linear_probe

# L-BFGS on tiny matrices: one thread avoids paying for an idle thread pool
pytestmark = pytest.mark.usefixtures("single_thread")


def _argmax_task(n, seed, informative=10, nuisance=30):
    """Labels are argmax of the first 10 dims (a linear rule); 30 loud nuisance dims drown it for kNN."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, informative + nuisance, generator=g)
    x[:, informative:] *= 3.0
    return x, x[:, :informative].argmax(1)


def test_linear_rule_is_learned_where_knn_fails():
    xa, ya = _argmax_task(1500, 0)
    xb, yb = _argmax_task(400, 1)
    probe = linear_probe(xa, ya, xb, yb, weight_decays=[1e-4, 1e-2], max_iter=60)
    knn = knn_classify(xa, ya, xb, yb)
    assert probe["linear_top1"] > 80.0
    assert knn["knn_top1"] < 30.0
    assert probe["linear_weight_decay"] in (1e-4, 1e-2)
    assert probe["linear_top5"] >= probe["linear_top1"]


def test_random_features_score_near_chance():
    g = torch.Generator().manual_seed(3)
    y_train, y_test = torch.arange(600) % 10, torch.arange(400) % 10
    out = linear_probe(torch.randn(600, 20, generator=g), y_train, torch.randn(400, 20, generator=g), y_test,
                       weight_decays=[1e-3, 1e-1], max_iter=40)
    assert 3.0 < out["linear_top1"] < 18.0


def test_the_weight_decay_is_picked_on_held_out_data():
    # a huge penalty crushes the weights to zero (chance accuracy); the held-out split must reject it whatever
    # the order of the list
    xa, ya = _argmax_task(600, 0, nuisance=5)
    xb, yb = _argmax_task(300, 1, nuisance=5)
    for wds in ([1e3, 1e-4], [1e-4, 1e3]):
        out = linear_probe(xa, ya, xb, yb, weight_decays=wds, max_iter=50)
        assert out["linear_weight_decay"] == 1e-4 and out["linear_top1"] > 85.0
    crushed = linear_probe(xa, ya, xb, yb, weight_decays=[1e3], max_iter=50)
    assert crushed["linear_top1"] < 25.0


def test_fit_minimises_the_regularised_loss():
    xa, ya = _argmax_task(300, 0, nuisance=5)
    w, b = fit_logistic(xa, ya, 10, weight_decay=1e-3, max_iter=100)

    def objective(w, b):
        return torch.nn.functional.cross_entropy(xa @ w + b, ya) + 0.5e-3 * w.pow(2).sum()

    best = objective(w, b)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # any small step away from the solution is worse
        assert objective(w + 1e-2 * torch.randn(w.shape, generator=g), b) > best


def test_deterministic_and_refuses_unlabelled_data():
    xa, ya = _argmax_task(300, 0)
    a = linear_probe(xa, ya, xa[:50], ya[:50], weight_decays=[1e-3, 1e-2], max_iter=30)
    b = linear_probe(xa, ya, xa[:50], ya[:50], weight_decays=[1e-3, 1e-2], max_iter=30)
    assert a == b
    with pytest.raises(DataError, match="unlabelled"):
        linear_probe(xa, torch.full_like(ya, -1), xa, ya)
