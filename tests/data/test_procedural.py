"""procedural: seeded shapes that raw pixels cannot separate but a small CNN learns; fast and deterministic."""

import time

import pytest
import torch
import torch.nn as nn

from kdforge.data import collate
from kdforge.data.procedural import SHAPES, ProceduralSource, generate
from kdforge.errors import RecipeError
from kdforge.eval.knn import knn_classify
from kdforge.recipe.schema import build

# compute-bound: one thread measures the work itself (and is fastest when other processes share the cores)
pytestmark = pytest.mark.usefixtures("single_thread")


def source(**table):
    return ProceduralSource(build(ProceduralSource.Config, table, "data"))


def test_items_follow_the_contract():
    src = source(num_train=40, num_val=20)
    assert src.num_classes == 10
    train, val = src.build("train", None), src.build("val", None)
    assert (len(train), len(val)) == (40, 20)
    item = train[3]
    assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert item["index"] == 3 and 0 <= item["label"] < 10
    batch = collate([train[i] for i in range(8)])
    assert batch["image"].shape == (8, 3, 32, 32)


def test_classes_are_balanced_and_all_shapes_are_available():
    _, labels = generate(1000, num_classes=10)
    counts = torch.bincount(labels, minlength=10)
    assert counts.min() >= 97 and counts.max() <= 103, counts.tolist()  # shuffled per chunk, truncated at 1000
    imgs, labels = generate(64, num_classes=len(SHAPES), image_size=16)
    assert imgs.shape == (64, 3, 16, 16) and int(labels.max()) == len(SHAPES) - 1
    with pytest.raises(RecipeError, match="num_classes must be between 2 and 12"):
        source(num_classes=13)


def test_same_seed_same_images_other_seed_other_images():
    a, la = generate(300, seed=1)
    b, lb = generate(300, seed=1)
    c, _ = generate(300, seed=2)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    val, _ = generate(300, seed=1, split="val")
    assert not torch.equal(a, val)


def test_image_i_does_not_depend_on_how_many_images_were_asked_for():
    small, ls = generate(100, seed=4)
    large, ll = generate(700, seed=4)
    assert torch.equal(small, large[:100]) and torch.equal(ls, ll[:100])


def test_generation_is_fast():
    generate(256)  # warm-up: first calls pay for thread pools and allocator growth
    best = float("inf")
    for seed in range(3):
        t = time.perf_counter()
        generate(2048, seed=100 + seed)
        best = min(best, time.perf_counter() - t)
    rate = 2048 / best
    print(f"procedural generation: {rate:.0f} images/s (32x32, one CPU thread, best of 3)")
    assert rate > 1000, f"only {rate:.0f} images/s"


def _small_cnn(width: int = 16) -> nn.Module:
    def block(i, o, k=3):
        return nn.Sequential(nn.Conv2d(i, o, k, padding=k // 2, bias=False), nn.BatchNorm2d(o), nn.ReLU())

    return nn.Sequential(
        block(3, width, 5), nn.MaxPool2d(2), block(width, 2 * width), nn.MaxPool2d(2), block(2 * width, 4 * width),
        nn.AdaptiveMaxPool2d(1), nn.Flatten(), nn.Linear(4 * width, 10),
    )


@pytest.mark.slow
def test_raw_pixels_fail_where_a_small_cnn_learns():
    """The data set's reason to exist: kNN on raw pixels is near chance, a small CNN trained for seconds is not."""
    torch.manual_seed(0)
    train_x, train_y = generate(3000, seed=0)
    val_x, val_y = generate(1000, seed=0, split="val")
    train_f, val_f = train_x.float() / 255, val_x.float() / 255

    raw = {k: knn_classify(train_f.flatten(1), train_y, val_f.flatten(1), val_y, k=k)["knn_top1"] for k in (1, 20)}

    net = _small_cnn()
    batch, epochs = 32, 3
    steps_per_epoch = len(train_f) // batch
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 1e-2, total_steps=steps_per_epoch * epochs, pct_start=0.2)
    for _ in range(epochs):
        perm = torch.randperm(len(train_f))
        for i in range(steps_per_epoch):
            idx = perm[i * batch : (i + 1) * batch]
            loss = nn.functional.cross_entropy(net(train_f[idx]), train_y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    net.eval()
    with torch.no_grad():
        cnn = 100 * (net(val_f).argmax(1) == val_y).float().mean().item()
    print(f"procedural, 10 classes: raw-pixel kNN top-1 {raw[1]:.1f}% (k=1), {raw[20]:.1f}% (k=20); "
          f"small CNN after {epochs} epochs of 3000 images: {cnn:.1f}%")
    assert max(raw.values()) < 40.0
    assert cnn > 35.0 and cnn > max(raw.values()) + 20.0


def test_first_class_draws_other_shapes_on_the_same_backgrounds():
    from kdforge.data.procedural import ProceduralSource, generate

    a, la = generate(64, num_classes=3, first_class=0)
    b, lb = generate(64, num_classes=3, first_class=6)
    assert torch.equal(la, lb)  # the same labels and layout ...
    differ = (a != b).flatten(1).any(1)
    assert differ.float().mean() > 0.9  # ... but star / crescent / frame instead of disc / square / triangle
    # most pixels are the background, which is the same
    assert (a == b).float().mean() > 0.5
    source = ProceduralSource(ProceduralSource.Config(num_classes=6, first_class=6))
    assert source.classes == ("star", "crescent", "frame", "l_shape", "t_shape", "half_disc")
    with pytest.raises(ValueError, match="between 2 and 6"):
        ProceduralSource.Config(num_classes=7, first_class=6)
