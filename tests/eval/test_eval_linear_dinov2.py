"""The DINOv2 linear evaluation (linear_dinov2): its features, its learning-rate sweep and its place in a run."""

import json

import pytest
import torch

from cli_helpers import TINY, kdforge
from kdforge.errors import KdforgeError, RecipeError
from kdforge.eval import Encoder
from kdforge.eval.linear_dinov2 import DinoV2LinearEvaluator, linear_dinov2
from kdforge.recipe.schema import build
from kdforge.students.timm_student import TimmStudent

pytestmark = pytest.mark.usefixtures("single_thread")

CPU = torch.device("cpu")


def _student(depth=3, **kwargs):
    torch.manual_seed(0)
    model_kwargs = {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": depth, "num_heads": 2, **kwargs}
    cfg = build(TimmStudent.Config, {"model": "vit_tiny_patch16_224", "model_kwargs": model_kwargs}, "student")
    return TimmStudent(cfg).eval()


class _Images(torch.utils.data.Dataset):
    """Random 16 x 16 images, labels 0, 1, 2, 0, ..."""

    def __init__(self, n, seed):
        self.images = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": i % 3, "index": i}


def _features_seen(evaluator, encoder, train, test):
    """The train and test features ``evaluator.run`` hands to its head training."""
    seen = {}

    def spy(train_x, train_y, test_x, test_y, *, device):
        seen.update(train=train_x, test=test_x, train_labels=train_y)
        return {}

    evaluator.evaluate = spy
    evaluator.run(encoder, train, test, device=CPU, batch_size=4)
    return seen


def _by_hand(student, images, n_last_blocks, avgpool):
    """The timm model's blocks run one by one: each block's output through the final norm, its CLS token (index 0)
    for the last n blocks, oldest first, then the mean of the last block's patch tokens (registers left out)."""
    m = student.model
    tokens = m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed((images - 0.5) / 0.5))))  # the model's mean/std
    normed = []
    for blk in m.blocks:
        tokens = blk(tokens)
        normed.append(m.norm(tokens))
    parts = [h[:, 0] for h in normed[-n_last_blocks:]]
    if avgpool:
        parts.append(normed[-1][:, m.num_prefix_tokens :].mean(dim=1))
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize("n_last_blocks, avgpool", [(2, True), (3, False), (1, True)])
def test_features_are_the_last_blocks_cls_tokens_then_the_mean_patch_token(registry, n_last_blocks, avgpool):
    student = _student(depth=3, reg_tokens=2)
    table = {"plugin": "linear_dinov2", "n_last_blocks": n_last_blocks, "avgpool": avgpool}
    evaluator = registry.create("evaluators", table, "eval.evaluators.d")
    train, test = _Images(10, seed=1), _Images(6, seed=2)
    seen = _features_seen(evaluator, Encoder(student), train, test)
    assert seen["train"].shape == (10, (n_last_blocks + avgpool) * 24)
    with torch.no_grad():
        torch.testing.assert_close(seen["train"], _by_hand(student, train.images, n_last_blocks, avgpool))
        torch.testing.assert_close(seen["test"], _by_hand(student, test.images, n_last_blocks, avgpool))
    assert seen["train_labels"].tolist() == [i % 3 for i in range(10)]


def test_one_block_without_avgpool_is_the_students_own_cls_feature(registry):
    student = _student(depth=2)
    evaluator = registry.create("evaluators", {"plugin": "linear_dinov2", "n_last_blocks": 1, "avgpool": False}, "d")
    train = _Images(5, seed=3)
    seen = _features_seen(evaluator, Encoder(student), train, train)
    with torch.no_grad():
        torch.testing.assert_close(seen["train"], student(train.images).cls)


def _blobs(n, seed, flip=False):
    """Two well separated Gaussian blobs in 8 dimensions (class 0 around -1, class 1 around +1); ``flip`` swaps the
    labels, so a head that learnt the train set scores ~0 % on them."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = (2.0 * y[:, None] - 1.0) + 0.3 * torch.randn(n, 8, generator=g)
    return x, (1 - y) if flip else y


def test_the_head_is_chosen_on_the_held_out_split_never_on_the_test_set():
    """An lr too small to move the heads leaves them at chance; a good one separates the blobs. The test labels are
    flipped, so the best head on the test set is the untrained one: only a choice made on held-out train data picks
    the good lr, and then reports its (honest, near-zero) test accuracy."""
    x, y = _blobs(200, seed=0)
    xt, yt = _blobs(100, seed=1, flip=True)
    lrs = [1e-7, 1e-4, 1.0]
    kwargs = dict(epochs=3, batch_size=32, val_fraction=0.25, seed=5, device=CPU)
    sweep = linear_dinov2(x, y, xt, yt, lrs=lrs, **kwargs)
    assert sweep["linear_dinov2_lr"] == 1.0
    assert sweep["linear_dinov2_top1_val"] > 95.0 and sweep["linear_dinov2_top1"] < 5.0
    assert set(sweep) == {"linear_dinov2_top1", "linear_dinov2_lr", "linear_dinov2_top1_val"}  # 2 classes: no top5
    # the heads of one sweep are the heads trained one lr at a time: the sweep picks the best held-out one of them
    alone = {lr: linear_dinov2(x, y, xt, yt, lrs=[lr], **kwargs) for lr in lrs}
    assert sweep["linear_dinov2_top1_val"] == max(a["linear_dinov2_top1_val"] for a in alone.values())
    assert alone[1e-7]["linear_dinov2_top1"] > 30.0  # the head a choice on the test set would have taken
    assert sweep["linear_dinov2_top1"] == alone[1.0]["linear_dinov2_top1"]
    # deterministic given the seed
    assert linear_dinov2(x, y, xt, yt, lrs=lrs, **kwargs) == sweep


def test_five_classes_report_top5_and_the_run_is_fast_on_cached_features():
    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(5, 16, generator=g)
    y = torch.arange(300) % 5
    x = centres[y] + torch.randn(300, 16, generator=g)
    res = linear_dinov2(x[:200], y[:200], x[200:], y[200:], epochs=5, device=CPU)  # DINOv2's 13 lrs
    assert res["linear_dinov2_top1"] > 90.0 and res["linear_dinov2_top5"] == 100.0
    assert res["linear_dinov2_lr"] in DinoV2LinearEvaluator.Config().lrs


@pytest.mark.parametrize(
    "table, message",
    [
        ({"val_fraction": 1.0}, r"eval.evaluators.d.val_fraction = 1.0 is out of range: it must be in \(0, 1\)"),
        ({"val_fraction": 0.0}, r"val_fraction = 0.0 is out of range"),
        ({"n_last_blocks": 0}, r"eval.evaluators.d.n_last_blocks = 0 is out of range: it must be >= 1"),
        ({"lrs": [1e-3, -1.0]}, r"eval.evaluators.d.lrs\[1\] = -1.0 is out of range: it must be > 0"),
        ({"lrs": []}, r"\[eval.evaluators.d\]: lrs must list at least one learning rate"),
        ({"momentum": 1.0}, r"momentum = 1.0 is out of range: it must be in \[0, 1\)"),
        ({"epochs": 0}, r"epochs = 0 is out of range"),
        ({"n_last_block": 4}, r"unknown key 'n_last_block'.*did you mean 'n_last_blocks'"),
    ],
)
def test_bad_config_names_the_key_and_the_allowed_range(registry, table, message):
    with pytest.raises(RecipeError, match=message):
        registry.create("evaluators", {"plugin": "linear_dinov2", **table}, "eval.evaluators.d")


def test_encoders_without_enough_blocks_are_explained(registry):
    evaluator = registry.create("evaluators", {"plugin": "linear_dinov2", "n_last_blocks": 4}, "d")
    data = _Images(4, seed=0)
    with pytest.raises(KdforgeError, match=r"'linear_dinov2'.*last 4 blocks.*has 2 block\(s\).*lower n_last_blocks"):
        evaluator.run(Encoder(_student(depth=2)), data, data, device=CPU, batch_size=4)
    no_blocks = Encoder(torch.nn.Identity(), role="teacher")
    with pytest.raises(KdforgeError, match=r"teacher Identity gives no per-block outputs.*eval.teacher = false"):
        evaluator.run(no_blocks, data, data, device=CPU, batch_size=4)
    with pytest.raises(KdforgeError, match="plain feature function.*kdforge.eval.Encoder"):
        evaluator.run(lambda x: x.flatten(1), data, data, device=CPU, batch_size=4)


def test_a_run_reports_it_for_student_and_teacher(tmp_path):
    """Through a recipe: [eval.evaluators.<label>] plugin = "linear_dinov2" on the tiny recipe (depth-1 models)."""
    run = tmp_path / "run"
    evaluator = "{plugin = 'linear_dinov2', n_last_blocks = 1, lrs = [1e-2, 1e-1], epochs = 2, batch_size = 16}"
    res = kdforge(
        "train", TINY, "--output-dir", run, "--no-progress", "--set", "train.max_steps=2", "--set", "eval.before=false",
        "--set", "eval.data={plugin = 'procedural', num_train = 40, num_val = 20, image_size = 16}",
        "--set", f"eval.evaluators={{dino = {evaluator}}}",
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    for who, after in (("student", "_after"), ("teacher", "")):
        for metric in ("top1", "top1_val"):
            assert 0.0 <= summary[f"{who}_linear_dinov2_{metric}{after}"] <= 100.0, (who, metric)
        assert summary[f"{who}_linear_dinov2_lr{after}"] in (1e-2, 1e-1)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("student_linear_dinov2_top1_after" in row for row in logged)
