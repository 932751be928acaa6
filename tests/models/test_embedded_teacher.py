"""The embedded teacher: trained once on embedded labelled data, cached atomically, loaded without training after.

The default configuration's full training is exercised for real by tests/test_recipe_smoke.py; here the model and
data are tiny so that the cache logic is tested in seconds.
"""

import dataclasses
import json
import threading

import pytest
import torch

import kdforge.teachers.embedded as embedded
from kdforge.errors import DataError, ShapeError
from kdforge.plugins import create, get_registry
from kdforge.recipe.schema import build
from kdforge.teachers.embedded import EmbeddedTeacher, cache_file, cache_key, conv_stem_embed, train_classifier


def _table(tmp_path, **overrides):
    return {
        "plugin": "embedded",
        "model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
        "data": {"plugin": "procedural", "image_size": 16, "num_train": 256, "num_val": 64},
        "image_size": 16,
        "epochs": 1,
        "batch_size": 64,
        "cache_dir": str(tmp_path / "cache"),
        "progress": False,
        **overrides,
    }


def _images(b=4, size=16):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def train_calls(monkeypatch):
    """A list that gets one entry per call of embedded.train_classifier (which still trains)."""
    calls = []
    real_train = embedded.train_classifier

    def counting_train(*args, **kwargs):
        calls.append(1)
        return real_train(*args, **kwargs)

    monkeypatch.setattr(embedded, "train_classifier", counting_train)
    return calls


def test_trains_once_then_loads_from_the_cache(tmp_path, monkeypatch, train_calls):
    first = create("teachers", _table(tmp_path), "teacher")
    assert isinstance(first, EmbeddedTeacher) and len(train_calls) == 1
    path = first.cache_path
    assert path.is_file() and path.parent == tmp_path / "cache" / "teachers"
    assert sorted(p.name for p in path.parent.iterdir() if not p.name.endswith(".lock")) == sorted(
        [path.name, path.with_suffix(".json").name]
    ), "a temporary file was left behind"
    info = json.loads(path.with_suffix(".json").read_text())
    assert 0.0 <= info["val_accuracy"] <= 1.0 and info["num_classes"] == 10 and info["num_train"] == 256
    assert info["config"]["data"]["num_train"] == 256 and first.val_accuracy == info["val_accuracy"]

    # the second construction must not train: the cache file is the only source of its weights
    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the cache holds this teacher")

    monkeypatch.setattr(embedded, "train_classifier", no_training)
    second = create("teachers", _table(tmp_path, autocast="bf16", hidden_layers=1), "teacher")
    assert second.cache_path == path  # autocast and hidden layers do not change the weights
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert second.val_accuracy == first.val_accuracy

    # it is a teacher like the others: frozen, 4x4 grid, float32 outputs, hidden layers on request
    x = _images()
    out = second(x)
    assert out.cls.shape == (4, 32) and out.patches.shape == (4, 16, 32) and out.grid == (4, 4) == second.grid((16, 16))
    assert out.patches.dtype == torch.float32 and len(out.hidden) == 1 and out.hidden[0].shape == (4, 17, 32)
    second.train()
    assert not second.training and not any(p.requires_grad for p in second.parameters())
    torch.testing.assert_close(first(x).patches, out.patches, atol=0.1, rtol=0.1)  # first runs in fp32, second bf16


def test_trained_weights_differ_from_the_initialisation(tmp_path):
    import timm

    teacher = create("teachers", _table(tmp_path), "teacher")
    assert type(teacher.model.patch_embed).__name__ == "ConvStemPatchEmbed"  # the default conv stem
    with torch.random.fork_rng():  # the teacher's initialisation: seed 0
        torch.manual_seed(0)
        init = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=16, patch_size=4,
                                 embed_dim=32, depth=1, num_heads=2, embed_layer=conv_stem_embed(16))
    trained = teacher.model.state_dict()
    assert init.state_dict().keys() == trained.keys()
    changed = {k for k, v in init.state_dict().items() if not torch.equal(v, trained[k])}
    assert {"blocks.0.attn.qkv.weight", "head.weight", "patch_embed.proj.0.weight"} <= changed


def test_cache_key_follows_what_changes_the_weights(tmp_path):
    def cfg(**overrides):
        table = _table(tmp_path, **overrides)
        table.pop("plugin")
        return build(EmbeddedTeacher.Config, table, "teacher")

    base = cache_key(cfg())
    assert len(base) == 16 and base == cache_key(cfg())
    for changed in ({"seed": 1}, {"epochs": 2}, {"lr": 1e-3}, {"image_size": 32},
                    {"data": {"plugin": "procedural", "num_train": 512}}, {"model_kwargs": {"depth": 2}}):
        assert cache_key(cfg(**changed)) != base, changed
    for same in ({"autocast": "bf16"}, {"hidden_layers": 2}, {"cache_dir": "/elsewhere"}, {"progress": True},
                 {"device": "cpu"}):
        assert cache_key(cfg(**same)) == base, same
    assert cache_file(cfg()).name == f"embedded-vit_tiny_patch16_224-{base}.safetensors"


def test_concurrent_first_uses_train_once(tmp_path, train_calls):
    get_registry()  # build the registry once, outside the threads
    errors = []

    def construct():
        try:
            create("teachers", _table(tmp_path, seed=5), "teacher")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=construct) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(train_calls) == 1


def test_damaged_cache_file_says_how_to_recover(tmp_path):
    table = _table(tmp_path)
    cfg = build(EmbeddedTeacher.Config, {k: v for k, v in table.items() if k != "plugin"}, "teacher")
    path = cache_file(cfg)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(ShapeError, match=r"does not load.*delete the file to train it again"):
        create("teachers", table, "teacher")


def test_unlabelled_data_is_rejected(tmp_path):
    with pytest.raises(DataError, match="has no labels"):
        create("teachers", _table(tmp_path, data={"plugin": "single_image"}), "teacher")


def test_train_classifier_is_a_supervised_stage_of_the_engine_and_learns(tmp_path):
    """The teacher learns on the engine (one way to train with labels): its recipe is a supervised stage (the timm
    student with its own classifier, supervised.ce, the engine's weight-decay groups), the returned model is that
    student's timm model, its val accuracy is the classifier evaluator's, and the work directory is gone."""
    cfg = build(EmbeddedTeacher.Config, {"model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 1,
                                                          "num_heads": 2},
                                         "data": {"plugin": "digits", "image_size": 16}, "image_size": 16,
                                         "epochs": 3, "batch_size": 64, "lr": 3e-3, "progress": False}, "teacher")
    recipe = embedded.training_recipe(cfg, 10, 1438)
    assert recipe["losses"] == {"ce": {"plugin": "supervised.ce", "head": "student", "label_smoothing": 0.0}}
    assert recipe["student"]["plugin"] == "timm" and recipe["student"]["num_classes"] == 10
    source = create("data_sources", cfg.data, "teacher.data")
    model, info = train_classifier(cfg, source, 10, tmp_path / "work")
    assert not (tmp_path / "work").exists()
    assert info["num_train"] == 1438 and info["num_val"] == 359 and info["training_version"] == embedded.TRAINING_VERSION
    # the returned model's own accuracy on the val split is the one reported
    from kdforge.data import collate
    from kdforge.data.transforms import TransformConfig, build_transform

    val = source.build("val", build_transform(TransformConfig(image_size=16, crop_pct=1.0), train=False))
    batch = collate([val[i] for i in range(len(val))])
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    with torch.no_grad():
        correct = (model((batch["image"] - mean) / 0.5).argmax(1) == batch["label"]).float().mean()
    assert abs(float(correct) - info["val_accuracy"]) < 1e-6
    print(info)
    assert info["val_accuracy"] >= 0.5, info  # digits at 16 px, 3 epochs: measured 67.4 % (chance 10 %)


def test_first_use_training_leaves_the_global_generators_as_it_found_them(tmp_path):
    """A run that trains the teacher on first use must go on exactly as one that loads it from the cache."""
    import random

    import numpy as np

    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    create("teachers", _table(tmp_path, epochs=1), "teacher")  # trains
    after_training = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(123)
    random.seed(123)
    np.random.seed(123)
    create("teachers", _table(tmp_path, epochs=1), "teacher")  # loads
    after_loading = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(after_training[0], after_loading[0]) and after_training[1:] == after_loading[1:]
