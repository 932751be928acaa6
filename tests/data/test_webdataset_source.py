"""webdataset: tar shards written here, brace-expanded, split across workers, shuffled reproducibly."""

import io
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data import Skipped, collate
from kdforge.data.shards import INDEX_STRIDE, WebDatasetSource
from kdforge.errors import DataError
from kdforge.recipe.schema import build

wds = pytest.importorskip("webdataset", reason="the webdataset package is not installed (pip install webdataset)")


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture
def shards(tmp_path):
    """3 shards of 4 samples: PNG images (lossless, so pixels can be compared) with labels; shard 1 has a
    corrupt image and a sample without any image. Returns (pattern, {(shard, position): (pixels, label)})."""
    rng = np.random.default_rng(0)
    expected = {}
    for shard in range(3):
        with wds.TarWriter(str(tmp_path / f"part-{shard:03d}.tar")) as sink:
            for pos in range(4):
                key = f"s{shard}_{pos}"
                label = (shard * 4 + pos) % 5
                if shard == 1 and pos == 1:
                    sink.write({"__key__": key, "png": b"\x89PNG not really", "cls": str(label).encode()})
                    expected[(shard, pos)] = None
                elif shard == 1 and pos == 2:
                    sink.write({"__key__": key, "txt": b"caption only", "cls": str(label).encode()})
                    expected[(shard, pos)] = None
                else:
                    arr = rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)
                    sink.write({"__key__": key, "png": _png(arr), "cls": str(label).encode()})
                    expected[(shard, pos)] = (arr, label)
    return str(tmp_path / "part-{000..002}.tar"), expected


def source(**table):
    return WebDatasetSource(build(WebDatasetSource.Config, table, "data"))


def test_val_split_reads_every_sample_in_order_with_pixels_labels_and_indices(shards):
    pattern, expected = shards
    src = source(val_urls=pattern, num_classes=5)
    assert src.num_classes == 5
    items = list(src.build("val", None))
    assert len(items) == 12
    for (shard, pos), item in zip(sorted(expected), items):
        want = expected[(shard, pos)]
        if want is None:
            assert isinstance(item, Skipped) and f"s{shard}_{pos}" in item.path
            continue
        arr, label = want
        assert item["label"] == label
        assert item["index"] == shard * INDEX_STRIDE + pos
        assert torch.equal((item["image"] * 255).round().to(torch.uint8), torch.from_numpy(arr).permute(2, 0, 1))
    reasons = [it.reason for it in items if isinstance(it, Skipped)]
    assert any("UnidentifiedImageError" in r for r in reasons) and any("no image member" in r for r in reasons)


def test_train_shuffle_is_a_reproducible_permutation_that_changes_with_the_epoch(shards):
    pattern, expected = shards
    src = source(train_urls=pattern, shuffle_buffer=5, seed=3)

    def order(epoch):
        ds = src.build("train", None)
        ds.set_epoch(epoch)
        return [it.path if isinstance(it, Skipped) else it["index"] for it in ds]

    a, b, c = order(0), order(0), order(1)
    assert a == b
    assert a != c
    assert sorted(map(str, a)) == sorted(map(str, c)) and len(a) == 12
    assert a != sorted(a, key=str)  # actually shuffled


def test_workers_split_the_shards_without_overlap(shards):
    pattern, _ = shards
    ds = source(train_urls=pattern, shuffle_buffer=0).build("train", None)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, num_workers=2, collate_fn=collate)
    indices, skipped = [], 0
    for batch in loader:
        indices += batch["index"].tolist()
        skipped += len(batch["skipped"])
    assert skipped == 2
    readable = [s * INDEX_STRIDE + p for s in range(3) for p in range(4) if (s, p) not in {(1, 1), (1, 2)}]
    assert sorted(indices) == readable


def test_unlabelled_shards_and_transform(shards):
    pattern, _ = shards
    from kdforge.data.transforms import TransformConfig, build_transform

    tf = build_transform(TransformConfig(image_size=6), train=True)
    items = [it for it in source(val_urls=pattern, label_key="").build("val", tf) if not isinstance(it, Skipped)]
    assert {it["label"] for it in items} == {-1}
    assert all(it["image"].shape == (3, 6, 6) for it in items)


def test_length_gives_a_len_only_when_known(shards):
    pattern, _ = shards
    assert len(source(train_urls=pattern, length=12).build("train", None)) == 12
    with pytest.raises(TypeError, match="data.length"):
        len(source(train_urls=pattern).build("train", None))


def test_missing_shards_and_empty_patterns_are_explained(shards, tmp_path):
    pattern, _ = shards
    wrong = pattern.replace("{000..002}", "{000..004}")
    with pytest.raises(DataError) as err:
        source(train_urls=wrong).build("train", None)
    assert "2 of 5 train shards" in str(err.value) and "part-003.tar" in str(err.value)
    with pytest.raises(DataError, match="data.val_urls is empty"):
        source(train_urls=pattern).build("val", None)


def test_without_the_package_the_error_says_how_to_install_it(shards, monkeypatch):
    pattern, _ = shards
    monkeypatch.setitem(sys.modules, "webdataset", None)  # makes `import webdataset` raise ImportError
    with pytest.raises(DataError, match="pip install webdataset"):
        source(train_urls=pattern).build("train", None)


def test_pipe_urls_run_only_when_the_recipe_allows_them():
    from kdforge.data.shards import WebDatasetSource
    from kdforge.errors import RecipeError
    from kdforge.recipe.schema import build

    pipe = "pipe:curl -s https://example.com/train-{000..003}.tar"
    with pytest.raises(RecipeError, match="has pipe: URLs, which run shell commands: set allow_pipe = true"):
        build(WebDatasetSource.Config, {"train_urls": pipe}, "data")
    with pytest.raises(RecipeError, match="val_urls"):
        build(WebDatasetSource.Config, {"train_urls": "/d/a.tar", "val_urls": "/d/b.tar::" + pipe}, "data")
    cfg = build(WebDatasetSource.Config, {"train_urls": pipe, "allow_pipe": True}, "data")
    assert cfg.runs_code() == [f"allow_pipe = true runs the shell commands of {pipe!r}"]
    assert build(WebDatasetSource.Config, {"train_urls": "/d/a-{0..3}.tar"}, "data").runs_code() == []
