"""A gallery's embeddings on disk: fp16 shards with an index of (image, crop parameters), written resumably and
shared out over processes (papers/001, B.2: every crop of every gallery image embedded once, then searched).

Layout of a gallery directory::

    gallery.json             what was embedded: the gallery's data-source table, the encoders and their widths,
                             level (image | crop), crops per image, crop and RandAugment settings, output size, seed,
                             number of images, images per shard
    shard-000000.npy         float16 [entries, D]: one row per entry (image x crop) of the shard's images
    shard-000000.json        the shard's index: each entry's image and crop number and CropParams, each image's
                             source (a file path where the data source has files), unreadable images
    ...

Shard ``s`` holds images [s * shard_images, (s + 1) * shard_images) and is written whole, atomically: its ``.npy``
first, its ``.json`` last, each through a temporary name. A shard counts as done only when its ``.json`` exists, so
a process killed at any moment leaves done shards and at most a temporary file; the next run redoes only the
unfinished shards, and because every crop is drawn from a generator seeded by (seed, image, crop) and batches never
cross a shard's boundary, a resumed gallery holds the same bytes as an uninterrupted one. Under torchrun each
process embeds the shards ``s % WORLD_SIZE == RANK``; the processes share nothing but the directory.

Rows: with E encoders, an entry's row is the concatenation of its E L2-normalised embeddings, each scaled by
1/sqrt(E). The inner product of two such rows is then the mean of the E cosine similarities, which is how papers/001
scores a (query, crop) pair with two encoders (B.2), and an ordinary exact or approximate inner-product search over
the rows computes it without ever forming a similarity matrix per encoder.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from kdforge.data import Skipped
from kdforge.data.datasets import mix_seed
from kdforge.engine.checkpoint import atomic_path
from kdforge.errors import KdforgeError, ShapeError
from kdforge.retrieval.crops import CropParams, centre_params, remake, sample_params

__all__ = ["GallerySpec", "GalleryStore", "combine", "embed_images", "embed_store", "shard_name"]

SPEC = "gallery.json"
FORMAT = 1

Encoders = Sequence[tuple[str, Callable[[Tensor], Tensor]]]


@dataclass
class GallerySpec:
    """What a gallery directory holds; two runs may share a directory only when their specs are equal."""

    source: dict[str, Any]
    """The gallery's data-source table (recipe form)."""
    encoders: list[list[Any]]
    """[[name, width], ...]: the encoders, in the order of the row's blocks (widths filled in by the first shard)."""
    level: str
    """"image" (one centred square per image) or "crop" (``crops`` random resized crops with RandAugment)."""
    crops: int
    scale: list[float]
    ratio: list[float]
    num_ops: int
    magnitude: float
    image_size: int
    seed: int
    items: int
    """Images in the gallery."""
    shard_images: int
    models: dict[str, Any] = field(default_factory=dict)
    """What makes the encoders (their teacher tables, the features taken): another model is another gallery."""

    @property
    def per_item(self) -> int:
        return self.crops if self.level == "crop" else 1

    @property
    def num_shards(self) -> int:
        return max(1, math.ceil(self.items / self.shard_images))

    def shard_items(self, shard: int) -> range:
        return range(shard * self.shard_images, min((shard + 1) * self.shard_images, self.items))

    def params(self, item: int, crop: int, height: int, width: int) -> CropParams:
        """The crop parameters of entry (item, crop) of an image of height x width: a pure function of the spec."""
        if self.level == "image":
            return centre_params(height, width)
        return sample_params(height, width, mix_seed(self.seed, item, crop), scale=tuple(self.scale),
                             ratio=tuple(self.ratio), num_ops=self.num_ops, magnitude=self.magnitude)

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **{k: getattr(self, k) for k in self.__dataclass_fields__}}

    def comparable(self) -> dict[str, Any]:
        """The spec without the encoders' widths (known only once a shard is embedded)."""
        data = self.to_json()
        data["encoders"] = [name for name, _ in self.encoders]
        return data


def shard_name(shard: int) -> str:
    return f"shard-{shard:06d}"


def combine(embeddings: Sequence[Tensor]) -> Tensor:
    """Rows of E encoders' embeddings ([B, D_e] each) as one [B, sum D_e] float32 row each: every block
    L2-normalised and scaled by 1/sqrt(E), so that row inner products are the mean of the E cosine similarities."""
    if not embeddings:
        raise ValueError("combine needs at least one encoder's embeddings")
    scale = 1.0 / math.sqrt(len(embeddings))
    return torch.cat([torch.nn.functional.normalize(e.float(), dim=1) * scale for e in embeddings], dim=1)


def embed_images(encoders: Encoders, images: Tensor) -> tuple[Tensor, list[int]]:
    """Combined rows (:func:`combine`) of uint8 ``images`` [B, 3, S, S] and each encoder's width."""
    x = images.float().div_(255.0)
    outs = []
    with torch.inference_mode():
        for name, encoder in encoders:
            out = encoder(x)
            if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
                got = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
                raise ShapeError(f"encoder '{name}' must map images [B, 3, H, W] to embeddings [B, D], got {got}")
            outs.append(out.float().cpu())
    return combine(outs), [o.shape[1] for o in outs]


class _Entries(torch.utils.data.Dataset):
    """Item i of a gallery as (i, its entries' uint8 pixels [per_item, 3, S, S], params, source) or (i, Skipped)."""

    def __init__(self, dataset: torch.utils.data.Dataset, spec: GallerySpec):
        self.dataset, self.spec = dataset, spec

    def __len__(self) -> int:
        return self.spec.items

    def __getitem__(self, item: int):
        raw = self.dataset[item]
        if isinstance(raw, Skipped):
            return item, raw
        image = raw["image"]
        height, width = int(image.shape[-2]), int(image.shape[-1])
        params = [self.spec.params(item, c, height, width) for c in range(self.spec.per_item)]
        pixels = torch.stack([remake(image, p, self.spec.image_size) for p in params])
        return item, (pixels, params, source_of(self.dataset, item))


def source_of(dataset: Any, item: int) -> str:
    """Where gallery image ``item`` comes from: its file path when the dataset has files, else its index."""
    sample = getattr(dataset, "sample", None)
    if callable(sample):
        return str(sample(item)[0])
    return f"#{item}"


def _collate(batch: list) -> list:
    return batch


class _ShardBatches(torch.utils.data.Sampler):
    """Batches of item ids that never cross a shard's boundary, over the given shards in order."""

    def __init__(self, spec: GallerySpec, shards: list[int], images_per_batch: int):
        self.spec, self.shards, self.per_batch = spec, shards, images_per_batch

    def __iter__(self):
        for s in self.shards:
            items = self.spec.shard_items(s)
            for start in range(items.start, items.stop, self.per_batch):
                yield list(range(start, min(start + self.per_batch, items.stop)))

    def __len__(self) -> int:
        return sum(math.ceil(len(self.spec.shard_items(s)) / self.per_batch) for s in self.shards)


def _rank_world() -> tuple[int, int]:
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def _check_spec(directory: Path, spec: GallerySpec) -> None:
    """Write gallery.json, or check that the one there describes the same gallery."""
    path = directory / SPEC
    if path.is_file():
        try:
            saved = json.loads(path.read_text())
        except ValueError as exc:
            raise KdforgeError(f"'{path}' is not JSON ({exc}): delete the gallery directory to embed again") from None
        saved_cmp = dict(saved, encoders=[e[0] for e in saved.get("encoders", [])])
        if saved_cmp != spec.comparable():
            diff = sorted(k for k in set(saved_cmp) | set(spec.comparable())
                          if saved_cmp.get(k) != spec.comparable().get(k))
            raise KdforgeError(
                f"'{directory}' holds another gallery's embeddings (they differ in {', '.join(diff)}): set "
                "retrieve.gallery_dir to another directory, or delete this one to embed again")
        spec.encoders = saved["encoders"]
        return
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.glob("shard-*.json")):
        raise KdforgeError(f"'{directory}' holds shards but no {SPEC}: it was not written by this version; move it "
                           "away")
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(spec.to_json(), indent=1))


def embed_store(
    encoders: Encoders,
    dataset: torch.utils.data.Dataset,
    directory: str | Path,
    spec: GallerySpec,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    show_progress: bool = True,
    barrier: bool = True,
) -> GalleryStore | None:
    """Embed every entry of ``dataset`` (the gallery's raw images) into ``directory`` as ``spec`` says (see the
    module docstring); returns the finished store, or None on a process other than rank 0 of a torchrun job.

    ``encoders``: [(name, images float [B, 3, S, S] in [0, 1] -> Tensor[B, D])]. ``batch_size``: entries per forward
    (a crop-level batch holds whole images' crops). Resumes whatever an earlier call left; KdforgeError when the
    directory holds another gallery. ``barrier``: under torchrun (WORLD_SIZE > 1), wait for every process's shards.
    """
    from tqdm.auto import tqdm

    from kdforge.engine import signals

    directory = Path(directory)
    rank, world = _rank_world()
    if len(dataset) != spec.items:
        raise ShapeError(f"the gallery data set has {len(dataset)} images but the spec says {spec.items}")
    if rank == 0:
        _check_spec(directory, spec)
    elif not (directory / SPEC).is_file():  # rank 0 writes it; the others wait for it
        deadline = time.monotonic() + 600
        while not (directory / SPEC).is_file():
            if time.monotonic() > deadline:
                raise KdforgeError(f"rank {rank}: {directory / SPEC} did not appear within 10 minutes")
            time.sleep(0.5)
        _check_spec(directory, spec)
    todo = [s for s in range(spec.num_shards) if s % world == rank and not (directory / f"{shard_name(s)}.json").is_file()]
    mine = [s for s in range(spec.num_shards) if s % world == rank]
    total = sum(len(spec.shard_items(s)) for s in mine) * spec.per_item
    left = sum(len(spec.shard_items(s)) for s in todo) * spec.per_item
    if todo:
        per_batch = max(1, batch_size // spec.per_item)
        loader = signals.DataLoader(_Entries(dataset, spec), batch_sampler=_ShardBatches(spec, todo, per_batch),
                                    num_workers=num_workers, collate_fn=_collate)
        bar = tqdm(total=total, initial=total - left, desc=f"gallery {directory.name}", unit="img", smoothing=0.1,
                   disable=not show_progress or not sys.stderr.isatty())
        started, done_now = time.monotonic(), 0
        shards = iter(todo)
        current = next(shards)
        rows: list[Tensor] = []
        index = _empty_index()
        try:
            for batch in loader:
                first = batch[0][0]
                while first not in spec.shard_items(current):  # an empty remainder cannot happen; a guard
                    current = next(shards)
                good = [(item, payload) for item, payload in batch if not isinstance(payload, Skipped)]
                for item, payload in batch:
                    if isinstance(payload, Skipped):
                        index["skipped"].append([item, payload.path, payload.reason])
                if good:
                    pixels = torch.cat([p[0] for _, p in good])
                    emb, widths = embed_images(encoders, pixels)
                    _check_widths(spec, widths, directory)
                    rows.append(emb.to(torch.float16))
                    for item, (_, params, source) in good:
                        index["sources"].append([item, source])
                        for c, p in enumerate(params):
                            index["entries"].append([item, c, *p.box, [[n, v] for n, v in p.ops]])
                n = len(batch) * spec.per_item
                bar.update(n)
                done_now += n
                if batch[-1][0] == spec.shard_items(current).stop - 1:  # the shard's last batch
                    _write_shard(directory, current, spec, rows, index)
                    if show_progress and bar.disable:  # a log, not a terminal: one line per shard
                        rate = done_now / max(time.monotonic() - started, 1e-9)
                        eta = (left - done_now) / max(rate, 1e-9)
                        print(f"kdforge: gallery shard {current + 1}/{spec.num_shards} written; "
                              f"{total - left + done_now}/{total} entries, {rate:.0f} img/s, ETA "
                              f"{int(eta // 3600)}:{int(eta % 3600 // 60):02d}:{int(eta % 60):02d}", file=sys.stderr)
                    rows, index = [], _empty_index()
                    current = next(shards, -1)
        finally:
            bar.close()
    if world > 1 and barrier:
        _barrier()
    if rank != 0:
        return None
    return GalleryStore(directory)


def _empty_index() -> dict[str, list]:
    return {"entries": [], "sources": [], "skipped": []}


def _check_widths(spec: GallerySpec, widths: list[int], directory: Path) -> None:
    known = [w for _, w in spec.encoders]
    if all(w is None for w in known):
        for pair, w in zip(spec.encoders, widths):
            pair[1] = int(w)
        with atomic_path(directory / SPEC) as tmp:
            tmp.write_text(json.dumps(spec.to_json(), indent=1))
    elif known != widths:
        raise KdforgeError(f"the encoders give {widths}-wide embeddings but '{directory}' holds {known}-wide ones: "
                           "use the same encoders, or another retrieve.gallery_dir")


def _write_shard(directory: Path, shard: int, spec: GallerySpec, rows: list[Tensor], index: dict) -> None:
    width = sum(w for _, w in spec.encoders)
    data = torch.cat(rows).numpy() if rows else np.zeros((0, width), dtype=np.float16)
    name = shard_name(shard)
    with atomic_path(directory / f"{name}.npy") as tmp, open(tmp, "wb") as f:
        np.save(f, data)
    index["rows"] = int(data.shape[0])
    with atomic_path(directory / f"{name}.json") as tmp:  # last: the shard counts as done from here on
        tmp.write_text(json.dumps(index))


def _barrier() -> None:
    import datetime

    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group("gloo", timeout=datetime.timedelta(days=7))
    dist.barrier()


class GalleryStore:
    """A finished gallery directory, read back: its spec, its shards as read-only memmaps, and entry lookups.

    Entry ids are global row numbers over the shards in order. Shard indexes are read lazily (a billion-entry
    gallery's index is never loaded whole): :meth:`entry` reads the shard that holds the id.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory)
        path = self.directory / SPEC
        if not path.is_file():
            raise KdforgeError(f"'{self.directory}' is not a gallery directory (no {SPEC}): embed it first "
                               "(kdforge retrieve)")
        data = json.loads(path.read_text())
        data.pop("format", None)
        self.spec = GallerySpec(**data)
        missing = [s for s in range(self.spec.num_shards)
                   if not (self.directory / f"{shard_name(s)}.json").is_file()]
        if missing:
            raise KdforgeError(
                f"'{self.directory}' is missing {len(missing)} of {self.spec.num_shards} shards (e.g. "
                f"{shard_name(missing[0])}): a run was stopped or another process has not finished; run "
                "kdforge retrieve again to complete it")
        self.shards = [np.load(self.directory / f"{shard_name(s)}.npy", mmap_mode="r")
                       for s in range(self.spec.num_shards)]
        self.offsets = np.cumsum([0] + [s.shape[0] for s in self.shards])
        self._index: dict[int, dict] = {}

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def width(self) -> int:
        return sum(w for _, w in self.spec.encoders)

    def index(self, shard: int) -> dict:
        if shard not in self._index:
            self._index[shard] = json.loads((self.directory / f"{shard_name(shard)}.json").read_text())
            self._index[shard]["source_of"] = dict(map(tuple, self._index[shard]["sources"]))
        return self._index[shard]

    def entry(self, entry_id: int) -> tuple[int, int, CropParams, str]:
        """(image, crop number, crop parameters, source) of gallery entry ``entry_id``."""
        if not 0 <= entry_id < len(self):
            raise IndexError(f"gallery entry {entry_id} is out of range [0, {len(self)})")
        shard = int(np.searchsorted(self.offsets, entry_id, side="right")) - 1
        item, crop, top, left, h, w, ops = self.index(shard)["entries"][entry_id - int(self.offsets[shard])]
        params = CropParams(box=(top, left, h, w), ops=tuple((n, float(v)) for n, v in ops))
        return item, crop, params, self.index(shard)["source_of"][item]

    def rows(self, entry_ids: Sequence[int]) -> Tensor:
        """float32 [len(entry_ids), width]: the stored rows of these entries."""
        out = np.empty((len(entry_ids), self.width), dtype=np.float32)
        for j, e in enumerate(entry_ids):
            shard = int(np.searchsorted(self.offsets, e, side="right")) - 1
            out[j] = self.shards[shard][e - int(self.offsets[shard])]
        return torch.from_numpy(out)

    def skipped(self) -> list[list]:
        return [s for shard in range(self.spec.num_shards) for s in self.index(shard)["skipped"]]
