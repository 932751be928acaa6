"""extract_features and the registered evaluators end to end on real (embedded) data sets."""

import dataclasses

import pytest
import torch

from kdforge.data import Skipped
from kdforge.data.procedural import ProceduralSource
from kdforge.errors import ShapeError
from kdforge.eval import Evaluator
from kdforge.eval.features import extract_features
from kdforge.recipe.schema import field_docs

pytestmark = pytest.mark.usefixtures("single_thread")


class _Items(torch.utils.data.Dataset):
    """Image i is filled with the value i / 100; items listed in ``bad`` are unreadable."""

    def __init__(self, n, bad=()):
        self.n, self.bad = n, set(bad)

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if i in self.bad:
            return Skipped(f"/data/{i}.jpg", "OSError: broken")
        return {"image": torch.full((3, 4, 4), i / 100), "label": i % 3, "index": i}


def test_features_keep_dataset_order_and_drop_unreadable_items():
    encoder = lambda x: x.mean(dim=(2, 3))  # noqa: E731  [B, 3, H, W] -> [B, 3]
    feats, labels = extract_features(encoder, _Items(23, bad={4, 17}), batch_size=5)
    kept = [i for i in range(23) if i not in {4, 17}]
    assert feats.shape == (21, 3) and feats.dtype == torch.float32
    torch.testing.assert_close(feats[:, 0], torch.tensor(kept) / 100)
    assert labels.tolist() == [i % 3 for i in kept]


def test_module_encoders_run_in_eval_and_inference_mode_and_are_restored():
    seen = {}

    class Enc(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(3, 2)

        def forward(self, x):
            seen["training"] = self.training
            seen["grad"] = torch.is_grad_enabled()
            return self.lin(x.mean(dim=(2, 3)))

    enc = Enc().train()
    feats, _ = extract_features(enc, _Items(6), batch_size=4)
    assert seen == {"training": False, "grad": False}
    assert enc.training  # restored
    # features leave inference mode usable for training a probe on them
    w = torch.zeros(2, requires_grad=True)
    (feats @ w).sum().backward()


def test_encoder_with_the_wrong_output_shape_is_explained():
    with pytest.raises(ShapeError, match=r"features \[B, D\].*CLS"):
        extract_features(lambda x: x, _Items(4), batch_size=2)


def test_builtin_evaluators_are_registered_with_documented_configs(registry):
    assert registry.names("evaluators") == ["classifier", "knn", "linear_dinov2", "linear_probe"]
    for comp in registry.components("evaluators"):
        assert issubclass(comp.cls, Evaluator)
        docs = field_docs(comp.cls.Config)
        assert all(docs.get(f.name) for f in dataclasses.fields(comp.cls.Config)), comp.name


def test_evaluators_separate_raw_pixels_of_digits_but_not_of_procedural_shapes(registry):
    """Raw pixels are a fine feature for digits and a poor one for the procedural shapes: the evaluators must
    say so, through the same DataLoader path the engine uses."""
    from kdforge.data.embedded import DigitsSource

    pytest.importorskip("sklearn", reason="scikit-learn is not installed: the digits source needs it")
    flatten = lambda x: x.flatten(1)  # noqa: E731
    knn = registry.create("evaluators", {"plugin": "knn"}, "eval.evaluators.knn")
    probe = registry.create("evaluators", {"plugin": "linear_probe", "weight_decays": [1e-3, 1e-1], "max_iter": 50},
                            "eval.evaluators.probe")
    digits = DigitsSource(DigitsSource.Config(image_size=8))
    d_train, d_val = digits.build("train", None), digits.build("val", None)
    d_knn = knn.run(flatten, d_train, d_val, device=torch.device("cpu"), batch_size=512)
    d_probe = probe.run(flatten, d_train, d_val, device=torch.device("cpu"), batch_size=512)
    shapes = ProceduralSource(ProceduralSource.Config(num_train=1500, num_val=500, image_size=32))
    s_train, s_val = shapes.build("train", None), shapes.build("val", None)
    s_knn = knn.run(flatten, s_train, s_val, device=torch.device("cpu"), batch_size=512)
    print(f"raw pixels, kNN top-1: digits {d_knn['knn_top1']:.1f}%, procedural {s_knn['knn_top1']:.1f}%; "
          f"linear probe on digits {d_probe['linear_top1']:.1f}%")
    assert set(d_knn) == {"knn_top1", "knn_top5"}
    assert d_knn["knn_top1"] > 90.0 and d_probe["linear_top1"] > 85.0
    assert s_knn["knn_top1"] < 30.0
