"""digits and single_image: data that ships inside scikit-learn and scikit-image."""

import pytest
import torch

from kdforge.data.embedded import DigitsSource, SingleImageSource, crop_boxes
from kdforge.errors import DataError, RecipeError
from kdforge.eval.knn import knn_classify
from kdforge.recipe.schema import build

pytest.importorskip("sklearn", reason="scikit-learn is not installed: the digits source needs it")


def digits(**table):
    return DigitsSource(build(DigitsSource.Config, table, "data"))


def single(**table):
    return SingleImageSource(build(SingleImageSource.Config, table, "data"))


def _stack(ds):
    items = [ds[i] for i in range(len(ds))]
    return torch.stack([it["image"] for it in items]), torch.tensor([it["label"] for it in items])


def test_digits_split_is_stratified_disjoint_and_seeded():
    src = digits(image_size=16)
    assert src.num_classes == 10
    train, val = src.build("train", None), src.build("val", None)
    assert len(train) + len(val) == 1797 and abs(len(val) - 0.2 * 1797) < 10
    tx, ty = _stack(train)
    vx, vy = _stack(val)
    assert tx.shape[1:] == (3, 16, 16) and torch.equal(tx[:, 0], tx[:, 2])  # grey repeated to three channels
    assert 0 <= tx.min() and tx.max() <= 1
    counts = torch.bincount(vy, minlength=10)
    assert counts.min() >= 34 and counts.max() <= 37  # every class ~20 % in val
    # disjoint: no val image appears in train
    as_bytes = lambda x: [bytes(row) for row in (x * 255).round().to(torch.uint8).flatten(1).numpy()]  # noqa: E731
    assert not set(as_bytes(vx)) & set(as_bytes(tx))
    again = _stack(digits(image_size=16).build("val", None))
    other = _stack(digits(image_size=16, seed=1).build("val", None))
    assert torch.equal(again[0], vx) and not torch.equal(other[0], vx)


def test_digits_images_match_their_labels():
    # raw-pixel kNN classifies digits well; a shuffled image/label pairing would score ~10 %
    src = digits(image_size=8)
    tx, ty = _stack(src.build("train", None))
    vx, vy = _stack(src.build("val", None))
    top1 = knn_classify(tx.flatten(1), ty, vx.flatten(1), vy, k=5)["knn_top1"]
    assert top1 > 90.0


def test_digits_upsampling_keeps_the_stroke_layout():
    from sklearn.datasets import load_digits

    src = digits(image_size=32, val_fraction=0.5, seed=3)
    item = src.build("train", None)[0]
    down = torch.nn.functional.adaptive_avg_pool2d(item["image"][:1][None], 8)[0, 0]
    originals = torch.as_tensor(load_digits().images, dtype=torch.float32) / 16
    # the downsampled image is closest to exactly one original: the one it was made from
    best = ((originals - down) ** 2).flatten(1).sum(1).argmin()
    assert int(load_digits().target[best]) == item["label"]


def test_single_image_crops_are_unlabelled_seeded_and_sized():
    pytest.importorskip("skimage", reason="scikit-image is not installed: single_image needs its sample photos")
    src = single(image="chelsea", num_train=30, num_val=7, crop_size=24)
    assert src.num_classes is None
    train, val = src.build("train", None), src.build("val", None)
    assert (len(train), len(val)) == (30, 7)
    item = train[4]
    assert item["image"].shape == (3, 24, 24) and item["label"] == -1 and item["index"] == 4
    same = single(image="chelsea", num_train=30, crop_size=24).build("train", None)[4]["image"]
    other_seed = single(image="chelsea", num_train=30, crop_size=24, seed=1).build("train", None)[4]["image"]
    assert torch.equal(item["image"], same) and not torch.equal(item["image"], other_seed)
    assert not torch.equal(train[0]["image"], val[0]["image"])
    assert not torch.equal(train[0]["image"], train[1]["image"])


def test_a_full_crop_is_the_whole_photo(tmp_path, image_writer):
    arr = image_writer(tmp_path / "big.png", seed=0, size=(30, 30))
    src = single(path=str(tmp_path / "big.png"), num_train=3, crop_size=30, scale=[1.0, 1.0], ratio=[1.0, 1.0])
    img = src.build("train", None)[2]["image"]
    assert torch.equal((img * 255).round().to(torch.uint8), torch.from_numpy(arr).permute(2, 0, 1))


def test_crop_boxes_stay_inside_and_follow_the_area_range():
    g = torch.Generator().manual_seed(0)
    boxes = crop_boxes(5000, 300, 451, (0.08, 1.0), (3 / 4, 4 / 3), g)
    top, left, h, w = boxes.T
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 300).all() and (left + w <= 451).all()
    frac = (h * w).float() / (300 * 451)
    assert frac.min() > 0.06 and frac.max() <= 1.0
    assert 0.4 < frac.median() < 0.6  # roughly uniform area fraction


def test_single_image_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="cannot read data.path"):
        single(path=str(tmp_path / "missing.png")).build("train", None)
    with pytest.raises(RecipeError, match="did you mean 'astronaut'"):
        single(image="astronot")
