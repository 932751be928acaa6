"""image_folder: ImageNet layout and flat folders on files written here; broken files skipped, counted, listed."""

import errno
import json
import os
import re
import threading

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data import Skipped, collate
from kdforge.data.datasets import FileImageDataset, read_image
from kdforge.data.image_folder import ImageFolderSource
from kdforge.data.skips import SkipCounter
from kdforge.data.transforms import TransformConfig, build_transform, to_image_tensor
from kdforge.errors import DataError, RecipeError
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


def _listing(ds, root):
    """(path relative to ``root``, label) of every sample, in the dataset's order."""
    return [(os.path.relpath(p, root), label) for p, label in ds.samples]


def _scan_within(seconds, fn):
    """fn() run in a thread, failing the test if it does not return in time (a link loop followed forever);
    returns its result or raises its exception."""
    result = {}

    def run():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test's thread
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"scanning did not finish in {seconds} s: a link loop followed forever?"
    if "error" in result:
        raise result["error"]
    return result["value"]


def test_link_loops_and_repeated_links_list_each_image_once(tmp_path, image_writer):
    root = tmp_path / "d"
    for rel in ("train/a/x.png", "train/a/sub/y.png", "train/b/w.png", "shared/z.png", "elsewhere/c/v.png"):
        image_writer(root / rel, seed=len(rel))
    (root / "train/a/sub/back").symlink_to("..")  # loops: each link leads to a folder above it
    (root / "train/a/sub/self").symlink_to(".")
    (root / "train/a/l1").symlink_to(root / "shared")  # two links to one folder
    (root / "train/a/l2").symlink_to(root / "shared")
    (root / "train/c").symlink_to(root / "elsewhere/c")  # a class folder that is itself a link
    ds = _scan_within(30, lambda: source(root=str(root)).build("train", None))
    assert _listing(ds, root / "train") == [
        ("a/x.png", 0), ("a/l1/z.png", 0), ("a/sub/y.png", 0), ("b/w.png", 1), ("c/v.png", 2)
    ]  # fmt: skip
    assert ds.classes == ["a", "b", "c"]


@pytest.mark.parametrize(
    "link, target, message",
    [
        ("train/b", "a", "is the same directory as"),  # two class folders, one directory
        ("train/a/more", "../b", "second label"),  # a class reaching into another class
        ("train/b/up", "..", "second label"),  # a class reaching the split folder, hence every class
    ],
)
def test_links_that_would_give_an_image_two_labels_are_errors(tmp_path, image_writer, link, target, message):
    root = tmp_path / "d"
    image_writer(root / "train/a/x.png", seed=1)
    if link != "train/b":
        image_writer(root / "train/b/w.png", seed=2)
    (root / link).symlink_to(target)
    with pytest.raises(DataError, match=message) as err:
        _scan_within(30, lambda: source(root=str(root)).build("train", None))
    assert str(root / "train") in str(err.value) and "remove the link" in str(err.value)


@pytest.mark.parametrize("unreadable", ["train/b", "train/a/sub"])
def test_an_unreadable_folder_is_an_error_naming_it(tmp_path, image_writer, monkeypatch, unreadable):
    root = tmp_path / "d"
    for rel in ("train/a/x.png", "train/a/sub/y.png", "train/b/w.png"):
        image_writer(root / rel, seed=len(rel))
    folder = root / unreadable
    folder.chmod(0)
    try:
        if os.access(folder, os.R_OK):
            # root ignores permission bits: fail the listing the way the kernel does for other users
            listing = os.scandir

            def scandir(path="."):
                if os.fspath(path) == str(folder):
                    raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
                return listing(path)

            monkeypatch.setattr(os, "scandir", scandir)
        with pytest.raises(DataError) as err:
            source(root=str(root)).build("train", None)
    finally:
        folder.chmod(0o755)
    msg = str(err.value)
    assert f"'{folder}'" in msg and "Permission denied" in msg and "chmod" in msg


def test_a_class_folder_without_images_is_an_error(imagenet_tree):
    (imagenet_tree / "train" / "dog").mkdir()
    (imagenet_tree / "train" / "dog" / "readme.txt").write_text("images to come")
    with pytest.raises(DataError, match=r"class folder '.*dog' holds no images .* still counts as a class"):
        source(root=str(imagenet_tree)).build("train", EVAL)


def _grey_ramp(dtype, top, size=(12, 10)):
    """A greyscale ramp from 0 to ``top`` of ``dtype``, shaped ``size``."""
    return np.linspace(0, top, size[0] * size[1]).reshape(size).astype(dtype)


@pytest.mark.parametrize(
    "name, pixels, mode",
    [
        ("png16.png", _grey_ramp(np.uint16, 65535), "I;16"),
        ("tiff16.tif", _grey_ramp(np.uint16, 65535), "I;16"),
        ("tiff16be.tif", _grey_ramp(">u2", 65535), "I;16B"),
        ("pgm16.pgm", _grey_ramp(np.uint16, 65535), "I"),  # PIL reads 16-bit PGM as 32-bit integers
        ("float.tif", _grey_ramp(np.float32, 1.0), "F"),
    ],
)
def test_16_bit_and_float_images_are_scaled_not_clipped(tmp_path, name, pixels, mode):
    path = tmp_path / "d" / "train" / "a" / name
    path.parent.mkdir(parents=True)
    Image.fromarray(pixels).save(path)
    assert Image.open(path).mode == mode  # the file really holds what the case is about
    scale = 1.0 if mode == "F" else 65535.0
    expected = torch.from_numpy(np.rint(pixels.astype(np.float64) / scale * 255)).to(torch.uint8)
    item = source(root=str(tmp_path / "d"), extensions=[".png", ".tif", ".pgm"]).build("train", None)[0]
    got = (item["image"] * 255).round().to(torch.uint8)
    assert torch.equal(got, expected.expand(3, -1, -1))  # the full ramp 0..255, not saturated at 255 or 1
    assert torch.equal(to_image_tensor(Image.open(path)), got)  # a PIL image handed to the transforms: the same


@pytest.mark.parametrize(
    "pixels, reason",
    [
        (_grey_ramp(np.float32, 1000.0), r"float pixels span 0\.\.1000 .* not \[0, 1\]"),
        (np.full((4, 4), np.nan, np.float32), "float pixels span nan"),
        (_grey_ramp(np.int32, 1_000_000), r"integer pixels span 0\.\.1000000 .* outside 16 bits"),
    ],
)
def test_deep_images_without_a_known_range_are_skipped_with_the_reason(tmp_path, image_writer, pixels, reason):
    image_writer(tmp_path / "d" / "good.png", seed=1)
    Image.fromarray(pixels).save(tmp_path / "d" / "deep.tif")
    ds = source(root=str(tmp_path / "d")).build("train", None)
    items = {os.path.basename(ds.sample(i)[0]): ds[i] for i in range(len(ds))}
    assert isinstance(items["good.png"], dict)
    assert isinstance(items["deep.tif"], Skipped) and re.search(reason, items["deep.tif"].reason)


def _truncated_png(path, size):
    """A PNG whose header says ``size`` (W, H) but whose pixel data is cut short: decoding it fails."""
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_images_over_the_pixel_limit_are_skipped_counted_and_not_decoded(tmp_path, image_writer):
    for i in range(3):
        image_writer(tmp_path / "d" / f"good_{i}.png", seed=i, size=(24, 20))  # 480 pixels
    _truncated_png(tmp_path / "d" / "bomb.png", (40, 40))  # 1600 pixels
    ds = source(root=str(tmp_path / "d"), max_image_pixels=1000).build("train", EVAL)
    counter = SkipCounter(max_bad_fraction=0.5, min_items=0)
    for batch in torch.utils.data.DataLoader(ds, batch_size=2, collate_fn=collate):
        counter.add_batch(batch)
    assert (counter.count, counter.seen) == (1, 4)
    [(path, why)] = counter.report()
    assert path.endswith("bomb.png")
    assert "40 x 40 = 1600 pixels, more than the limit of 1000" in why and "data.max_image_pixels" in why
    assert "truncated" not in why  # its pixels were never decoded, or the truncation would be the reason
    # without the limit the same file is an ordinary broken file
    assert "truncated" in read_image(tmp_path / "d" / "bomb.png").reason
    with pytest.raises(RecipeError, match="max_image_pixels must be >= 1"):
        source(root=str(tmp_path / "d"), max_image_pixels=0)


def test_the_configured_pixel_limit_decides_and_pils_is_left_as_it_was(tmp_path, image_writer, monkeypatch):
    pixels = image_writer(tmp_path / "d" / "x.png", seed=1, size=(24, 20))  # 480 pixels
    image_writer(tmp_path / "d" / "y.png", seed=2, size=(24, 20))
    (tmp_path / "d" / "broken.png").write_bytes(b"not an image")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL alone would refuse 480 > 2 x 100 pixels
    ds = FileImageDataset([(str(tmp_path / "d" / n), -1) for n in ("x.png", "y.png", "broken.png")], None)
    item = ds[0]
    assert torch.equal((item["image"] * 255).round().to(torch.uint8), torch.from_numpy(pixels).permute(2, 0, 1))
    assert isinstance(ds[2], Skipped)
    assert Image.MAX_IMAGE_PIXELS == 100  # restored after reads that worked and reads that failed
    assert isinstance(FileImageDataset(ds.samples[:1], None, max_image_pixels=479)[0], Skipped)
