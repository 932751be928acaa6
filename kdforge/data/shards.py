"""WebDataset tar shards: ``train-{000000..000127}.tar`` with ``<key>.jpg`` (or png, webp) and ``<key>.cls`` members.

The ``webdataset`` package reads the tar files (local paths, URLs, or ``pipe:`` shell commands, which run only
when the recipe sets ``allow_pipe = true``: a recipe should not run shell commands unless it says so); this module
decides
which shards each process reads, shuffles them and decodes samples itself so that an undecodable image becomes a
:class:`kdforge.data.Skipped` record like in every other source. Shards are split across distributed ranks first
and DataLoader workers second (a rank or worker with no shard reads nothing: use at least ranks x workers shards).
Shard order (train) is a function of ``seed`` and the epoch set with :meth:`ShardDataset.set_epoch`.
"""

from __future__ import annotations

import dataclasses
import importlib
import io
import os
import random
from typing import Annotated, Any, Callable, Iterator

import torch

from kdforge.data import DataSource, Skipped
from kdforge.data.datasets import apply_transform
from kdforge.errors import DataError
from kdforge.ranges import NonNegativeInt, Range, Seed

__all__ = ["ShardDataset", "WebDatasetSource", "expand_shards"]

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
        from PIL import Image

        where = f"{sample.get('__url__', '?')}:{sample.get('__key__', '?')}"
        data = next((sample[k] for k in self.image_keys if k in sample), None)
        if data is None:
            found = sorted(k for k in sample if not k.startswith("__"))
            return Skipped(where, f"no image member {self.image_keys} in the sample (it has {found})")
        label = -1
        if self.label_key:
            raw = sample.get(self.label_key)
            try:
                label = int(raw.decode("utf-8").strip() if isinstance(raw, bytes) else raw)
            except (TypeError, ValueError, UnicodeDecodeError):
                return Skipped(where, f"label member '.{self.label_key}' is missing or not an integer: {raw!r}")
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                image = im.convert("RGB")
        except Exception as exc:  # noqa: BLE001 - any decoding failure is a property of the sample
            return Skipped(where, f"{type(exc).__name__}: {exc}")
        return {"image": apply_transform(self.transform, image), "label": label, "index": index}

    def __iter__(self) -> Iterator[dict | Skipped]:
        for index, sample in self._shuffled(self._raw_samples()):
            yield self._decode(index, sample)


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

    def build(self, split: str, transform: Callable[[Any], torch.Tensor] | None) -> ShardDataset:
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
