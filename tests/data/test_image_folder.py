"""image_folder: ImageNet layout and flat folders on files written here; broken files skipped, counted, listed."""

import json

import pytest
import torch

from kdforge.data import Skipped, collate
from kdforge.data.image_folder import ImageFolderSource
from kdforge.data.skips import SkipCounter
from kdforge.data.transforms import TransformConfig, build_transform
from kdforge.errors import DataError
from kdforge.recipe.schema import build

EVAL = build_transform(TransformConfig(image_size=12, crop_pct=1.0), train=False)


def source(**table):
    return ImageFolderSource(build(ImageFolderSource.Config, table, "data"))


def test_imagenet_layout_labels_follow_sorted_class_folders(imagenet_tree):
    src = source(root=str(imagenet_tree))
    assert src.num_classes == 3
    train = src.build("train", EVAL)
    assert len(train) == 12  # notes.txt is not an image
    assert train.classes == ["ant", "bee", "cat"]
    for i in range(len(train)):
        item = train[i]
        path, label = train.sample(i)
        assert item["label"] == label == ["ant", "bee", "cat"].index(path.split("/")[-2])
        assert item["index"] == i
        assert item["image"].shape == (3, 12, 12) and item["image"].dtype == torch.float32
        assert 0 <= item["image"].min() and item["image"].max() <= 1
    batch = collate([train[i] for i in range(5)])
    assert batch["image"].shape == (5, 3, 12, 12) and batch["skipped"] == []


def test_pixels_come_from_the_file(tmp_path, image_writer):
    arr = image_writer(tmp_path / "d" / "train" / "a" / "x.png", seed=3, size=(12, 12))
    item = source(root=str(tmp_path / "d")).build("train", None)[0]
    assert torch.equal((item["image"] * 255).round().to(torch.uint8), torch.from_numpy(arr).permute(2, 0, 1))


def test_val_split_uses_the_train_class_indices(imagenet_tree):
    # val lacks "ant": "bee" must still be label 1, not 0
    for p in (imagenet_tree / "val" / "ant").iterdir():
        p.unlink()
    (imagenet_tree / "val" / "ant").rmdir()
    val = source(root=str(imagenet_tree)).build("val", EVAL)
    assert sorted({label for _, label in val.samples}) == [1, 2]
    assert {p.split("/")[-2] for p, label in val.samples if label == 1} == {"bee"}


def test_val_class_unknown_to_train_is_an_error(imagenet_tree, image_writer):
    image_writer(imagenet_tree / "val" / "dog" / "d.png", seed=1)
    with pytest.raises(DataError, match="dog"):
        source(root=str(imagenet_tree)).build("val", EVAL)


def test_custom_split_folder_names_and_extensions(imagenet_tree):
    (imagenet_tree / "train").rename(imagenet_tree / "training")
    src = source(root=str(imagenet_tree), train_dir="training", extensions=["JPEG"])
    ds = src.build("train", EVAL)
    assert len(ds) == 3 and all(p.endswith(".JPEG") for p, _ in ds.samples)


def test_flat_folder_is_unlabelled_and_serves_both_splits(tmp_path, image_writer):
    for i in range(5):
        image_writer(tmp_path / "flat" / f"img_{i}.jpg", seed=i)
    src = source(root=str(tmp_path / "flat"))
    assert src.num_classes is None
    for split in ("train", "val"):
        ds = src.build(split, EVAL)
        assert len(ds) == 5
        assert {ds[i]["label"] for i in range(5)} == {-1}


def test_flat_split_folder_is_unlabelled(tmp_path, image_writer):
    for i in range(3):
        image_writer(tmp_path / "d" / "train" / f"img_{i}.png", seed=i)
    ds = source(root=str(tmp_path / "d")).build("train", EVAL)
    assert [ds[i]["label"] for i in range(3)] == [-1, -1, -1]


def test_missing_root_names_the_path_and_how_to_set_it(tmp_path):
    missing = tmp_path / "nowhere" / "imagenet"
    src = source(root=str(missing), dataset_name="ImageNet")
    with pytest.raises(DataError) as err:
        src.build("train", EVAL)
    msg = str(err.value)
    assert msg.startswith(f"ImageNet not found at '{missing / 'train'}'")
    assert "data.root" in msg and "--set data.root=" in msg and "export IMAGENET_DIR" in msg
    assert "\n" not in msg
    with pytest.raises(DataError, match="not found"):
        source(root="").build("train", EVAL)


def test_missing_val_split_names_the_val_folder(imagenet_tree):
    for p in sorted((imagenet_tree / "val").rglob("*"), reverse=True):
        p.rmdir() if p.is_dir() else p.unlink()
    (imagenet_tree / "val").rmdir()
    with pytest.raises(DataError, match=f"'{imagenet_tree / 'val'}'"):
        source(root=str(imagenet_tree)).build("val", EVAL)


def test_mixed_layout_and_empty_folders_are_explained(tmp_path, image_writer):
    image_writer(tmp_path / "mixed" / "train" / "a" / "1.png", seed=1)
    image_writer(tmp_path / "mixed" / "train" / "loose.png", seed=2)
    with pytest.raises(DataError, match="both class folders .* and loose images"):
        source(root=str(tmp_path / "mixed")).build("train", EVAL)
    (tmp_path / "empty" / "train" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match="no images with endings"):
        source(root=str(tmp_path / "empty")).build("train", EVAL)


def _folder_with_corrupt_files(tmp_path, image_writer, corrupt_writer, good: int):
    folder = tmp_path / "imgs"
    for i in range(good):
        image_writer(folder / f"good_{i:02d}.jpg", seed=i)
    bad = corrupt_writer(folder, folder / "good_00.jpg")
    return folder, bad


def test_corrupt_images_come_back_as_skipped_records(tmp_path, image_writer, corrupt_writer):
    folder, bad = _folder_with_corrupt_files(tmp_path, image_writer, corrupt_writer, good=4)
    ds = source(root=str(folder)).build("train", EVAL)
    items = {ds.sample(i)[0]: ds[i] for i in range(len(ds))}
    assert len(items) == 7
    for name, path in bad.items():
        assert isinstance(items[path], Skipped), name
        assert items[path].path == path and items[path].reason  # a reason a person can read
    assert "truncated" in items[bad["truncated.jpg"]].reason.lower()
    assert "UnidentifiedImageError" in items[bad["random.png"]].reason
    assert sum(isinstance(v, dict) for v in items.values()) == 4


def test_loader_collate_and_counter_report_every_bad_file(tmp_path, image_writer, corrupt_writer):
    folder, bad = _folder_with_corrupt_files(tmp_path, image_writer, corrupt_writer, good=13)
    ds = source(root=str(folder)).build("train", EVAL)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    counter = SkipCounter(max_bad_fraction=0.25, min_items=0)
    images = 0
    for batch in loader:
        assert batch["image"].shape[0] == len(batch["label"]) == len(batch["index"])
        images += batch["image"].shape[0]
        counter.add_batch(batch)
    counter.check()  # 3 / 16 is below 25 %
    assert images == 13
    assert (counter.count, counter.seen) == (3, 16)
    assert {s.path for s in counter.report()} == set(bad.values())
    assert json.loads(json.dumps(counter.report()))[0][0] in bad.values()  # JSON-friendly [path, reason] pairs
    assert all(p in counter.summary() for p in bad.values())


def test_too_many_bad_files_raise_with_the_list(tmp_path, image_writer, corrupt_writer):
    folder, bad = _folder_with_corrupt_files(tmp_path, image_writer, corrupt_writer, good=5)
    ds = source(root=str(folder)).build("train", EVAL)
    counter = SkipCounter(max_bad_fraction=0.1)  # min_items 1000: no early stop in a run this small
    for batch in torch.utils.data.DataLoader(ds, batch_size=3, collate_fn=collate):
        counter.add_batch(batch)
    with pytest.raises(DataError) as err:
        counter.check()
    msg = str(err.value)
    assert "3 of 8 images" in msg and "train.max_bad_fraction" in msg
    assert all(p in msg for p in bad.values())


def test_counter_stops_a_run_early_only_after_min_items():
    counter = SkipCounter(max_bad_fraction=0.01, min_items=100)
    bad = [Skipped(f"/d/{i}.jpg", "OSError: broken") for i in range(5)]
    counter.update(bad, seen=50)  # 10 % bad, but only 50 seen: no verdict yet
    with pytest.raises(DataError, match="5 of 100 images"):
        counter.update([], seen=50)  # min_items reached: the verdict comes with this batch
    counter2 = SkipCounter(max_bad_fraction=0.01, min_items=100)
    counter2.update(bad[:1], seen=60)
    with pytest.raises(DataError, match="2 of 120"):
        counter2.update(bad[1:2], seen=60)  # past min_items with a new bad file: stops right here
    counter3 = SkipCounter(max_bad_fraction=0.01, min_items=100)
    counter3.update(bad[:1], seen=500)  # 0.2 %: fine
    counter3.check()


def test_counter_counts_repeats_but_lists_each_file_once_and_resumes():
    counter = SkipCounter(max_bad_fraction=1.0, min_items=0)
    for _ in range(3):  # the same broken file met in three epochs
        counter.update([Skipped("/d/a.jpg", "OSError: truncated")], seen=10)
    assert counter.count == 3 and counter.report() == [Skipped("/d/a.jpg", "OSError: truncated")]
    resumed = SkipCounter(max_bad_fraction=1.0)
    resumed.load_state_dict(json.loads(json.dumps(counter.state_dict())))
    assert (resumed.count, resumed.seen, resumed.report()) == (3, 30, counter.report())
    with pytest.raises(ValueError, match="cannot be below"):
        counter.update([Skipped("/d/b.jpg", "x")] * 2, seen=1)
    assert SkipCounter().summary() == "" and SkipCounter().report() == []


def test_default_threshold_is_one_percent():
    counter = SkipCounter(min_items=0)
    counter.update([Skipped("/d/a.jpg", "x")], seen=100)
    counter.check()  # exactly 1 %: allowed
    with pytest.raises(DataError):
        counter.update([Skipped("/d/b.jpg", "x")], seen=1)
