"""WebDataset tar shards: ``train-{000000..000127}.tar`` with ``<key>.jpg`` (or png, webp) and ``<key>.cls`` members.

The ``webdataset`` package reads the tar files (local paths, URLs, or ``pipe:`` shell commands, which run only
when the recipe sets ``allow_pipe = true``: a recipe should not run shell commands unless it says so); this module
decides
which shards each process reads, shuffles them and decodes samples itself so that an undecodable image becomes a
:class:`kdforge.data.Skipped` record like in every other source. Shards are split across distributed ranks first
and DataLoader workers second (a rank or worker with no shard reads nothing: use at least ranks x workers shards).
Shard order (train) is a function of ``seed`` and the epoch set with :meth:`ShardDataset.set_epoch`.

:class:`IndexedShards` (``WebDatasetSource.build_indexed``) reads the same samples by their number instead, as a
map-style dataset: what ``kdforge retrieve`` needs of a gallery (it remakes a retrieved crop from its image later).
It scans the tar headers of local shards once (no image is decoded) and keeps an index of every sample in numpy
arrays, cached under ``$KDFORGE_CACHE/shard-index/``; an item is then one seek and one read. Item ``i`` is the
``i``-th sample webdataset yields over the shards in their listed order, decoded the same way.
:func:`random_access` picks ``build_indexed`` where a source has it and ``build`` otherwise.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import io
import json
import os
import random
import re
import sys
import tarfile
import warnings
from pathlib import Path
from typing import Annotated, Any, Callable, Iterator, Sequence

import numpy as np
import torch

from kdforge.data import DataSource, Skipped
from kdforge.data.datasets import apply_transform
from kdforge.errors import DataError
from kdforge.ranges import NonNegativeInt, Range, Seed

__all__ = ["IndexedShards", "ShardDataset", "WebDatasetSource", "expand_shards", "random_access"]

#: ``index`` of a sample = shard number * 2**24 + position in its shard: unique and stable whatever the order
#: in which shards are read, for shards of up to 16.7 million samples.
INDEX_STRIDE = 1 << 24


def _webdataset():
    try:
        return importlib.import_module("webdataset")
    except ImportError as exc:
        raise DataError(
            "the 'webdataset' data source needs the webdataset package, which is not installed: "
            "pip install webdataset (or pip install 'kdforge[webdataset]'), or use plugin = \"image_folder\""
        ) from exc


def expand_shards(pattern: str) -> list[str]:
    """Brace-expand a shard pattern ('a-{000..003}.tar' -> 4 names); '::' separates several patterns."""
    from braceexpand import braceexpand  # installed with webdataset

    return [url for part in pattern.split("::") if part for url in braceexpand(part)]


def _is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def _parse_label(raw: Any) -> int:
    """The integer a label member holds as text (raises TypeError, ValueError or UnicodeDecodeError if none)."""
    return int(raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw)


def _bad_label_reason(label_key: str, raw: Any) -> str:
    return f"label member '.{label_key}' is missing or not an integer: {raw!r}"


def _no_image_reason(image_keys: list[str], found: list[str]) -> str:
    return f"no image member {image_keys} in the sample (it has {found})"


def _decode_image(data: bytes):
    """An image member's bytes as an RGB PIL image (raises whatever PIL raises on bytes it cannot decode)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return im.convert("RGB")


class ShardDataset(torch.utils.data.IterableDataset):
    """Samples of a list of tar shards as ``{"image", "label", "index"}`` dicts (or Skipped)."""

    def __init__(
        self,
        urls: list[str],
        transform: Callable[[Any], torch.Tensor] | None,
        *,
        image_keys: list[str],
        label_key: str,
        shuffle_shards: bool,
        shuffle_buffer: int,
        seed: int,
        length: int = 0,
    ):
        super().__init__()
        self.urls = list(urls)
        self.transform = transform
        self.image_keys = [k.lower() for k in image_keys]
        self.label_key = label_key.lower()
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed
        self.length = length
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Reshuffle shards (and the sample buffer) differently for each epoch; call before iterating."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        if not self.length:
            raise TypeError("the number of samples in these shards is unknown: set data.length to give it")
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return self.length // world

    def _my_shards(self) -> list[tuple[int, str]]:
        """(shard number, url) pairs this rank and worker read, in reading order."""
        order = list(range(len(self.urls)))
        if self.shuffle_shards:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(len(order), generator=g).tolist()
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        mine = order[rank::world][worker::workers]
        return [(i, self.urls[i]) for i in mine]

    def _raw_samples(self) -> Iterator[tuple[int, dict]]:
        wds = _webdataset()
        for shard, url in self._my_shards():
            try:
                for position, sample in enumerate(wds.tarfile_samples([{"url": url}])):
                    yield shard * INDEX_STRIDE + position, sample
            except (OSError, ValueError, EOFError) as exc:
                raise DataError(f"cannot read shard '{url}': {type(exc).__name__}: {exc}") from exc

    def _shuffled(self, samples: Iterator[tuple[int, dict]]) -> Iterator[tuple[int, dict]]:
        if self.shuffle_buffer <= 1:
            yield from samples
            return
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rng = random.Random(f"{self.seed}/{self.epoch}/{rank}/{worker}")
        buf: list[tuple[int, dict]] = []
        for item in samples:
            if len(buf) < self.shuffle_buffer:
                buf.append(item)
                continue
            j = rng.randrange(len(buf))
            yield buf[j]
            buf[j] = item
        rng.shuffle(buf)
        yield from buf

    def _decode(self, index: int, sample: dict) -> dict | Skipped:
        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            found = sorted(k for k in sample if not k.startswith("__"))
            return Skipped(where, _no_image_reason(self.image_keys, found))
        label = -1
        if self.label_key:
            raw = sample.get(self.label_key)
            try:
                label = _parse_label(raw)
            except (TypeError, ValueError, UnicodeDecodeError):
                return Skipped(where, _bad_label_reason(self.label_key, raw))
        try:
            image = _decode_image(data)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a property of the sample
            return Skipped(where, f"{type(exc).__name__}: {exc}")
        return {"image": apply_transform(self.transform, image), "label": label, "index": index}

    def __iter__(self) -> Iterator[dict | Skipped]:
        for index, sample in self._shuffled(self._raw_samples()):
            yield self._decode(index, sample)


#: webdataset's sample key rule (``webdataset.tariterators.base_plus_ext``): the member path up to the first '.' of
#: its basename is the key, the rest the extension ("dir/a.b/abc.seg.png" -> "dir/a.b/abc", "seg.png").
_KEY_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")
#: Members webdataset skips (``tar_file_iterator``): "__name__" at the top level, and "__name__/..." paths.
_META = re.compile(r"__[^/]*__($|/)")
#: Bump when the index's layout or meaning changes: old cache files are then ignored.
INDEX_VERSION = 1
_INT64 = np.iinfo(np.int64)


def _pack(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    """Byte strings as one uint8 array and int64 start offsets (one more than strings): string ``i`` is
    ``data[starts[i]:starts[i + 1]]``."""
    starts = np.zeros(len(strings) + 1, dtype=np.int64)
    np.cumsum([len(b) for b in strings], out=starts[1:])
    return np.frombuffer(b"".join(strings), dtype=np.uint8).copy(), starts


def _unpack(data: np.ndarray, starts: np.ndarray, i: int) -> bytes:
    return data[starts[i]:starts[i + 1]].tobytes()


def _member_key_ext(name: str) -> tuple[str, str] | None:
    """(sample key, lower-case extension) of a tar member, or None for one webdataset skips."""
    if ("/" not in name and name.startswith("__") and name.endswith("__")) or _META.match(name):
        return None
    match = _KEY_EXT.match(name)
    return (match.group(1), match.group(2).lower()) if match else None


def _scan_shard(tar: tarfile.TarFile, url: str, image_keys: list[str], label_key: str) -> Iterator[tuple]:
    """(key, image offset, image size, label, skip reason or None) of each sample of an open shard, in the order
    webdataset yields them: consecutive members with the same key form a sample. A sample that the reader would
    skip (no image member, a label that is not an integer) has size -1 and its reason."""
    members: dict[str, tarfile.TarInfo] = {}
    key: str | None = None

    def finish() -> tuple:
        image = next((members[k] for k in image_keys if k in members), None)
        reason = None if image is not None else _no_image_reason(image_keys, sorted(k for k in members
                                                                                    if not k.startswith("__")))
        label = -1
        if label_key:
            raw = tar.extractfile(members[label_key]).read() if label_key in members else None
            try:
                label = _parse_label(raw)
                if not _INT64.min <= label <= _INT64.max:
                    raise ValueError("out of the int64 range")
            except (TypeError, ValueError, UnicodeDecodeError):
                reason, label = reason or _bad_label_reason(label_key, raw), -1
        if reason is not None:
            return key, 0, -1, label, reason
        return key, image.offset_data, image.size, label, None

    count = 0
    while (member := tar.next()) is not None:
        count += 1
        if count % 4096 == 0:
            tar.members = []  # TarFile keeps every member it has read; a shard can hold millions
        if not member.isreg() or (split := _member_key_ext(member.name)) is None:
            continue
        if member.issparse():
            raise DataError(f"shard '{url}' has a sparse member '{member.name}', which cannot be read at an offset: "
                            "write the shard again without sparse files (e.g. with webdataset's TarWriter)")
        prefix, ext = split
        if prefix != key:
            if key is not None:
                yield finish()
            key, members = prefix, {}
        if ext in members:
            raise DataError(f"shard '{url}': {member.name}: duplicate file name in tar file {ext} "
                            f"{sorted(members)}: a sample has two members with the same extension")
        members[ext] = member
    if key is not None:
        yield finish()


def _why_unreadable(path: str) -> str:
    """What to do about a shard that tarfile cannot read in place."""
    try:
        with open(path, "rb") as f:
            head = f.read(6)
    except OSError:
        head = b""
    if head.startswith((b"\x1f\x8b", b"BZh", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")):
        return "it is compressed; random access needs uncompressed tar files (as webdataset writes them): decompress it"
    return "random access needs whole, uncompressed tar files: is it a partial download? fetch or write it again"


class IndexedShards(torch.utils.data.Dataset):
    """Local WebDataset tar shards by sample number: ``{"image", "label", "index"}`` dicts (or Skipped).

    Item ``i`` is the ``i``-th sample that webdataset yields over ``urls`` in order (members grouped by key as it
    does), decoded as :class:`ShardDataset` decodes it; ``sample(i)`` is ``("URL:KEY", label)``. Samples that
    reader skips without decoding (no image member among ``image_keys``, a label member that is missing or not an
    integer) are kept in the numbering and come back as :class:`Skipped` with the same reason, so the numbers
    never depend on which samples could be read (``labels`` holds -1 for a bad label).

    The index (shard number, data offset and size of the image member, label; keys as one byte array) is built by
    scanning the tar headers (labels are read, images are not) and cached as ``<cache_dir>/<sha256>.npz``, a hash
    of the absolute shard paths, their sizes and modification times, ``image_keys`` and ``label_key``: a rewritten
    shard is scanned again. Like :class:`kdforge.data.datasets.FileImageDataset`, everything per sample lives in
    numpy arrays, not Python objects, so that forked DataLoader workers share it. Shards must be uncompressed local
    tar files (webdataset's own format); a shard that changes after indexing is an error when read.
    """

    def __init__(
        self,
        urls: Sequence[str],
        transform: Callable[[Any], torch.Tensor] | None,
        *,
        image_keys: Sequence[str] = ("jpg", "jpeg", "png", "webp"),
        label_key: str = "cls",
        cache_dir: str | os.PathLike | None = None,
        show_progress: bool = True,
    ):
        self.urls = list(urls)
        remote = [u for u in self.urls if not _is_local(u)]
        if remote:
            raise DataError(
                f"{len(remote)} of {len(self.urls)} shards are not local files, e.g. '{remote[0]}': random access "
                "(reading each image by its number, as kdforge retrieve does) needs the shards as local tar files; "
                "download them first and give their paths, or use an image folder"
            )
        missing = [u for u in self.urls if not os.path.isfile(u)]
        if missing:
            raise DataError(f"{len(missing)} of {len(self.urls)} shards do not exist, e.g. '{missing[0]}': check "
                            "the paths")
        if not image_keys:
            raise ValueError("image_keys must name at least one member extension, e.g. ['jpg']")
        self.transform = transform
        self.image_keys = [k.lower() for k in image_keys]
        self.label_key = label_key.lower()
        self._paths = [os.path.abspath(u) for u in self.urls]
        self._stats = [self._stat(os.stat(p)) for p in self._paths]
        if cache_dir is None:
            from kdforge.teachers.embedded import default_cache_dir

            cache_dir = default_cache_dir() / "shard-index"
        ident = json.dumps([INDEX_VERSION, self._paths, self._stats, self.image_keys, self.label_key])
        self.cache_path = Path(cache_dir) / f"{hashlib.sha256(ident.encode()).hexdigest()}.npz"
        arrays = self._load(self.cache_path)
        #: True when the index came from the cache file, False when the shards were scanned.
        self.from_cache = arrays is not None
        if arrays is None:
            arrays = self._scan(show_progress)
            self._save(self.cache_path, arrays)
        self._shard, self._offset, self._size = arrays["shard"], arrays["offset"], arrays["size"]
        self._labels = arrays["label"]
        self._keys, self._key_starts = arrays["keys"], arrays["key_starts"]
        self._skip_items, self._skips, self._skip_starts = arrays["skip_items"], arrays["skips"], arrays["skip_starts"]

    @staticmethod
    def _stat(st: os.stat_result) -> list[int]:
        return [st.st_size, st.st_mtime_ns]

    def _scan(self, show_progress: bool) -> dict[str, np.ndarray]:
        from tqdm.auto import tqdm

        shard, offset, size, label, keys, skip_items, skips = [], [], [], [], [], [], []
        bar = tqdm(total=len(self.urls), desc="indexing shards", unit="shard",
                   disable=not show_progress or not sys.stderr.isatty())
        with bar:
            for s, (url, path) in enumerate(zip(self.urls, self._paths)):
                end = 0  # where this shard's last image ends
                try:
                    with tarfile.open(path, "r:") as tar:
                        for key, off, n, lab, reason in _scan_shard(tar, url, self.image_keys, self.label_key):
                            end = max(end, off + n)
                            if reason is not None:
                                skip_items.append(len(shard))
                                skips.append(reason.encode("utf-8", "surrogateescape"))
                            shard.append(s)
                            offset.append(off)
                            size.append(n)
                            label.append(lab)
                            keys.append(os.fsencode(key))
                except (tarfile.TarError, OSError, EOFError) as exc:
                    raise DataError(f"cannot index shard '{url}': {type(exc).__name__}: {exc}: {_why_unreadable(path)}"
                                    ) from exc
                if end > self._stats[s][0]:
                    raise DataError(f"shard '{url}' is truncated: its last image ends at byte {end} but the file "
                                    f"has {self._stats[s][0]}; write or download it again")
                bar.update(1)
                bar.set_postfix(samples=len(shard))
        key_data, key_starts = _pack(keys)
        skip_data, skip_starts = _pack(skips)
        return {
            "version": np.array(INDEX_VERSION), "shard": np.array(shard, dtype=np.int32),
            "offset": np.array(offset, dtype=np.int64), "size": np.array(size, dtype=np.int64),
            "label": np.array(label, dtype=np.int64), "keys": key_data, "key_starts": key_starts,
            "skip_items": np.array(skip_items, dtype=np.int64), "skips": skip_data, "skip_starts": skip_starts,
        }

    @staticmethod
    def _load(path: Path) -> dict[str, np.ndarray] | None:
        """The cached index at ``path``, or None when there is none or it cannot be read (it is then rebuilt)."""
        if not path.is_file():
            return None
        try:
            with np.load(path, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            n = len(arrays["shard"])
            ok = (int(arrays["version"]) == INDEX_VERSION and len(arrays["key_starts"]) == n + 1
                  and all(len(arrays[k]) == n for k in ("offset", "size", "label"))
                  and len(arrays["skip_starts"]) == len(arrays["skip_items"]) + 1)
            return arrays if ok else None
        except (OSError, ValueError, KeyError, EOFError) as exc:
            warnings.warn(f"the cached shard index '{path}' cannot be read ({exc}): indexing the shards again",
                          stacklevel=3)
            return None

    @staticmethod
    def _save(path: Path, arrays: dict[str, np.ndarray]) -> None:
        from kdforge.engine.checkpoint import atomic_path

        try:
            with atomic_path(path) as tmp, open(tmp, "wb") as f:
                np.savez(f, **arrays)  # a file object: np.savez would add ".npz" to a temporary's name
        except OSError as exc:
            warnings.warn(f"cannot cache the shard index in '{path}' ({exc}): the shards will be scanned again next "
                          "time; set KDFORGE_CACHE to a writable directory", stacklevel=3)

    def __len__(self) -> int:
        return len(self._shard)

    def key(self, index: int) -> str:
        """Sample key of item ``index`` in its shard (the member path up to the first '.' of its name)."""
        return os.fsdecode(_unpack(self._keys, self._key_starts, index))

    def sample(self, index: int) -> tuple[str, int]:
        """("URL:KEY", label) of item ``index``: where it comes from, as in the Skipped records of the reader."""
        return f"{self.urls[self._shard[index]]}:{self.key(index)}", int(self._labels[index])

    @property
    def labels(self) -> torch.Tensor:
        """LongTensor[N]: every item's label (-1 where unlabelled or the label is bad), read without opening a
        shard (shares memory with the dataset: do not write to it)."""
        return torch.from_numpy(self._labels)

    def _read(self, shard: int, offset: int, size: int) -> bytes:
        url = self.urls[shard]
        try:
            with open(self._paths[shard], "rb") as f:
                if self._stat(os.fstat(f.fileno())) != self._stats[shard]:
                    raise DataError(f"shard '{url}' changed since it was indexed (its size or modification time): "
                                    "build the data set again to index it again")
                f.seek(offset)
                data = f.read(size)
        except OSError as exc:
            raise DataError(f"cannot read shard '{url}': {type(exc).__name__}: {exc}") from exc
        if len(data) != size:
            raise DataError(f"shard '{url}' ended {size - len(data)} bytes early: it changed since it was indexed")
        return data

    def __getitem__(self, index: int) -> dict | Skipped:
        index = int(index)
        if not 0 <= index < len(self):
            raise IndexError(f"item {index} of {len(self)} shard samples")
        where, label = self.sample(index)
        size = int(self._size[index])
        if size < 0:
            j = int(np.searchsorted(self._skip_items, index))
            return Skipped(where, _unpack(self._skips, self._skip_starts, j).decode("utf-8", "surrogateescape"))
        data = self._read(int(self._shard[index]), int(self._offset[index]), size)
        try:
            image = _decode_image(data)
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a property of the sample
            return Skipped(where, f"{type(exc).__name__}: {exc}")
        return {"image": apply_transform(self.transform, image), "label": label, "index": index}


def random_access(source: DataSource, split: str, transform: Callable[[Any], torch.Tensor] | None):
    """``source``'s split as a data set read by item number where the source can give one: ``build_indexed``
    (webdataset shards: :class:`IndexedShards`) when it has it, else ``build``. What ``kdforge retrieve`` and the
    ``retrieved`` source use, so that both number a gallery's images the same way."""
    build_indexed = getattr(source, "build_indexed", None)
    return build_indexed(split, transform) if callable(build_indexed) else source.build(split, transform)


class WebDatasetSource(DataSource):
    """Tar shards in the WebDataset format, read with the ``webdataset`` package (an optional dependency)."""

    name = "webdataset"

    @dataclasses.dataclass
    class Config:
        train_urls: str = ""
        "train shards, brace-expanded: '/data/shards/train-{000000..000127}.tar' (also http URLs; pipe: commands need allow_pipe)"
        val_urls: str = ""
        "val shards, same form as train_urls"
        image_keys: list[str] = dataclasses.field(default_factory=lambda: ["jpg", "jpeg", "png", "webp"])
        "member extensions tried in order for a sample's image"
        label_key: str = "cls"
        "member extension holding the integer label as text; '' for unlabelled shards (label -1)"
        num_classes: NonNegativeInt = 0
        "number of classes in the labels (0: unlabelled or unknown)"
        shuffle_shards: bool = True
        "train: read shards in a seeded random order that changes with the epoch"
        shuffle_buffer: Annotated[int, Range(ge=0, le=1_000_000)] = 1000
        "train: samples held in the shuffle buffer, in memory as encoded bytes (0 or 1: no sample shuffling)"
        seed: Seed = 0
        "seed of the shard order and shuffle buffer"
        length: NonNegativeInt = 0
        "samples per epoch over all ranks, when known (gives the dataset a len); 0: unknown"
        allow_pipe: bool = False
        "let 'pipe:CMD' shard URLs run CMD in a shell (e.g. 'pipe:aws s3 cp s3://bucket/train-000.tar -'); off, a pipe: URL is an error"

        def __post_init__(self) -> None:
            if not self.image_keys:
                raise ValueError("image_keys must name at least one member extension, e.g. ['jpg']")
            for key in ("train_urls", "val_urls"):
                # Any "pipe:" counts, wherever braces or '::' put it: webdataset would run what follows in a shell.
                if "pipe:" in getattr(self, key) and not self.allow_pipe:
                    raise ValueError(
                        f"{key} = {getattr(self, key)!r} has pipe: URLs, which run shell commands: set allow_pipe = "
                        "true if the recipe should run them, or give local paths or http(s) URLs"
                    )

        def runs_code(self) -> list[str]:
            """Settings that run code from outside kdforge (see kdforge.engine.runs.code_it_would_run)."""
            urls = [u for u in (self.train_urls, self.val_urls) if "pipe:" in u]
            return [f"allow_pipe = true runs the shell commands of {u!r}" for u in urls] if self.allow_pipe else []

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self.num_classes = cfg.num_classes or None

    def _urls(self, split: str) -> list[str]:
        """The split's shard URLs, brace-expanded; local ones must exist."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        _webdataset()  # fail here, with the install hint, rather than inside a DataLoader worker
        key = "train_urls" if split == "train" else "val_urls"
        pattern = getattr(self.cfg, key)
        if not pattern:
            raise DataError(
                f"data.{key} is empty: give the {split} shards, e.g. '/data/shards/{split}-{{000000..000099}}.tar'"
            )
        urls = expand_shards(pattern)
        missing = [u for u in urls if _is_local(u) and not os.path.isfile(u)]
        if missing:
            raise DataError(
                f"{len(missing)} of {len(urls)} {split} shards of data.{key} = '{pattern}' do not exist, e.g. "
                f"'{missing[0]}': check the path and the brace range, or pass --set data.{key}=..."
            )
        return urls

    def build(self, split: str, transform: Callable[[Any], torch.Tensor] | None) -> ShardDataset:
        urls = self._urls(split)
        train = split == "train"
        return ShardDataset(
            urls,
            transform,
            image_keys=self.cfg.image_keys,
            label_key=self.cfg.label_key,
            shuffle_shards=train and self.cfg.shuffle_shards,
            shuffle_buffer=self.cfg.shuffle_buffer if train else 0,
            seed=self.cfg.seed,
            length=self.cfg.length if train else 0,
        )

    def build_indexed(self, split: str, transform: Callable[[Any], torch.Tensor] | None) -> IndexedShards:
        """The split's shards read by sample number, in order and unshuffled (:class:`IndexedShards`; local shards
        only): what ``kdforge retrieve`` uses for a gallery."""
        return IndexedShards(self._urls(split), transform, image_keys=self.cfg.image_keys,
                             label_key=self.cfg.label_key)
