"""IndexedShards: webdataset tar shards read by sample number, equal to the streaming reader, with a cached index."""

import gzip
import io
import os
import pickle
import re
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data import Skipped
from kdforge.data.shards import IndexedShards, ShardDataset, WebDatasetSource, random_access
from kdforge.errors import DataError
from kdforge.recipe.schema import build

pytest.importorskip("webdataset", reason="the webdataset package is not installed (pip install webdataset)")

IMAGE_KEYS = ["jpg", "jpeg", "png", "webp"]


def _encoded(seed: int, fmt: str = "PNG") -> bytes:
    arr = np.random.default_rng(seed).integers(0, 256, (6 + seed % 3, 7, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _write_tar(path, members: list[tuple[str, bytes | None]]) -> None:
    """A plain tar file of (name, data) members, in order; data None: a directory."""
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            if data is None:
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
            else:
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _shard_members(shard: int, n: int = 4) -> tuple[list[tuple[str, bytes | None]], list[str]]:
    """Members of one shard (keys in a directory with dots in its name) and its sample keys in order. Shard 1 has
    a corrupt image, a non-integer label, a sample without an image and a JPEG beside a PNG (jpg wins)."""
    members: list[tuple[str, bytes | None]] = [  # what webdataset skips: metadata and directories
        ("__index.v1__", b"{}"), ("__info__/notes.txt", b"x"), (f"part.{shard}.d", None)]
    keys = []
    for pos in range(n):
        key = f"part.{shard}.d/s{shard}_{pos}"
        image, label, ext = _encoded(shard * 10 + pos), str((shard * 4 + pos) % 5).encode(), "png"
        extra: list[tuple[str, bytes]] = [(f"{key}.seg.png", _encoded(99))]  # ext "seg.png": not the image
        if shard == 1 and pos == 0:
            image = b"\x89PNG not really"
        elif shard == 1 and pos == 1:
            label = b"seven"
        elif shard == 1 and pos == 2:
            image, ext = b"caption only", "txt"
        elif shard == 1 and pos == 3:
            extra.append((f"{key}.JPG", _encoded(7, "JPEG")))
            label = b" 3\n"
        members += [(f"{key}.{ext}", image), (f"{key}.cls", label), *extra]
        keys.append(key)
    return members, keys


@pytest.fixture
def shards(tmp_path):
    """3 shards of 4 samples in tmp_path/shards; returns (urls, ["URL:KEY" of each sample in order])."""
    folder = tmp_path / "shards"
    folder.mkdir()
    urls, names = [], []
    for shard in range(3):
        url = str(folder / f"part-{shard:03d}.tar")
        members, keys = _shard_members(shard)
        _write_tar(url, members)
        urls.append(url)
        names += [f"{url}:{k}" for k in keys]
    return urls, names


def _indexed(urls, tmp_path, **kw) -> IndexedShards:
    return IndexedShards(urls, None, image_keys=IMAGE_KEYS, label_key="cls", cache_dir=tmp_path / "cache", **kw)


def test_every_item_equals_what_the_streaming_reader_yields(shards, tmp_path):
    urls, names = shards
    ds = _indexed(urls, tmp_path)
    streamed = list(ShardDataset(urls, None, image_keys=IMAGE_KEYS, label_key="cls", shuffle_shards=False,
                                 shuffle_buffer=0, seed=0))
    assert len(ds) == len(streamed) == len(names) == 12
    assert [ds.sample(i)[0] for i in range(len(ds))] == names
    for i, want in enumerate(streamed):
        got = ds[i]
        if isinstance(want, Skipped):  # same path ("URL:KEY") and the same reason (but a BytesIO's address)
            assert isinstance(got, Skipped) and got.path == want.path
            assert re.sub(" at 0x[0-9a-f]+", "", got.reason) == re.sub(" at 0x[0-9a-f]+", "", want.reason)
            continue
        assert got["index"] == i and got["label"] == want["label"] == ds.sample(i)[1] == int(ds.labels[i])
        assert torch.equal(got["image"], want["image"])
    reasons = {names.index(s.path): s.reason for s in streamed if isinstance(s, Skipped)}
    assert sorted(reasons) == [4, 5, 6]
    assert "UnidentifiedImageError" in reasons[4]
    assert "'.cls' is missing or not an integer: b'seven'" in reasons[5]
    assert "no image member" in reasons[6] and "'txt'" in reasons[6]
    assert ds.labels.tolist() == [0, 1, 2, 3, 4, -1, 1, 3, 3, 4, 0, 1]
    jpeg = np.array(Image.open(io.BytesIO(_encoded(7, "JPEG"))).convert("RGB"))
    assert torch.equal((ds[7]["image"] * 255).round().to(torch.uint8), torch.from_numpy(jpeg).permute(2, 0, 1))
    again = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker gets
    assert torch.equal(again[11]["image"], ds[11]["image"])


def test_the_index_is_cached_and_a_changed_shard_is_indexed_again(shards, tmp_path, monkeypatch):
    urls, names = shards
    first = _indexed(urls, tmp_path)
    assert not first.from_cache and first.cache_path.is_file()
    assert first.cache_path.parent == tmp_path / "cache" and first.cache_path.suffix == ".npz"

    def no_scan(*args, **kwargs):
        raise AssertionError("the shards were scanned again")

    with monkeypatch.context() as m:
        m.setattr(tarfile, "open", no_scan)
        second = _indexed(urls, tmp_path)
    assert second.from_cache and second.cache_path == first.cache_path
    assert [second.sample(i) for i in range(len(second))] == [first.sample(i) for i in range(len(first))]
    assert torch.equal(second[3]["image"], first[3]["image"]) and second[5] == first[5] and second[6] == first[6]

    members, _ = _shard_members(0, n=6)  # rewrite shard 0 with two more samples
    _write_tar(urls[0], members)
    os.utime(urls[0], ns=(1, 1))
    third = _indexed(urls, tmp_path)
    assert not third.from_cache and third.cache_path != first.cache_path and len(third) == 14
    assert third.sample(5)[0] == f"{urls[0]}:part.0.d/s0_5" and third.sample(6)[0] == names[4]
    with pytest.raises(DataError, match="changed since it was indexed"):
        first[0]


def test_remote_compressed_and_truncated_shards_are_explained(shards, tmp_path):
    urls, _ = shards
    for remote in ("http://example.com/part-000.tar", "pipe:cat part-000.tar"):
        with pytest.raises(DataError, match="not local files.*download them first"):
            _indexed([urls[0], remote], tmp_path)
    gz = tmp_path / "part.tar.gz"
    gz.write_bytes(gzip.compress(open(urls[1], "rb").read()))
    with pytest.raises(DataError, match="cannot index shard .*it is compressed"):
        _indexed([str(gz)], tmp_path)
    with tarfile.open(urls[1]) as tar:
        end = tar.getmember("part.1.d/s1_3.JPG").offset_data + 10  # inside the data of the shard's last image
    cut = tmp_path / "cut.tar"
    cut.write_bytes(open(urls[1], "rb").read()[:end])
    with pytest.raises(DataError, match="cut.tar.*partial download"):
        _indexed([str(cut)], tmp_path)


def test_retrieval_reads_a_webdataset_gallery_by_number(shards, tmp_path, monkeypatch):
    from kdforge.retrieval.pipeline import _raw_dataset

    urls, names = shards
    monkeypatch.setenv("KDFORGE_CACHE", str(tmp_path / "kdcache"))
    pattern = str(tmp_path / "shards" / "part-{000..002}.tar")
    table = {"plugin": "webdataset", "train_urls": pattern, "label_key": "cls"}
    source, ds = _raw_dataset(table, "train", "retrieve.gallery")
    assert isinstance(ds, IndexedShards) and len(ds) == 12 and ds.sample(11)[0] == names[11]
    assert ds.cache_path.parent == tmp_path / "kdcache" / "shard-index" and ds.cache_path.is_file()
    assert isinstance(source.build("train", None), ShardDataset)  # training still streams

    src = WebDatasetSource(build(WebDatasetSource.Config, {"train_urls": "http://example.com/a-{0..1}.tar"}, "data"))
    with pytest.raises(DataError, match="not local files"):
        random_access(src, "train", None)
