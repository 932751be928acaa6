"""An embedded retrieval gallery: a folder of PNG files mixing a task's classes with many distractors.

For retrieval without a network (kdforge retrieve's smoke profile, the tests, benchmarks/quality/retrieval.py): the
task is the procedural shapes ``task_first_class`` .. + ``task_classes`` (the task_transfer recipe's smoke task is
shapes 6-11), drawn with another seed than the task's own images; the distractors are the other procedural shapes,
scikit-learn's digits and crops of scikit-image's sample photos. Optionally planted: ``leaks`` copies of the task's
own test images (what de-contamination must find) and ``duplicates`` near-copies (a few grey levels of noise) of
gallery task images (what de-duplication must find).

The folder is written once under the cache (or ``root``) and read back as image files through the same path as any
image folder; file names say what each image is (``task-03-000012.png``, ``digit-7-000100.png``, ``leak-...``,
``dup-...``: kind, class, number), which is how a retrieved set's class purity is measured; as a data source it is
unlabelled (label -1), as a web gallery is.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import torch

from kdforge.data import DataSource
from kdforge.data.datasets import FileImageDataset
from kdforge.errors import DataError
from kdforge.ranges import ImageSide, NonNegativeInt, Range, Seed

__all__ = ["DemoGallerySource"]

_VERSION = 1


class DemoGallerySource(DataSource):
    """A generated gallery folder: task shapes among distractor shapes, digits and photo crops (see the module)."""

    name = "demo_gallery"
    splits = ("train",)

    @dataclasses.dataclass
    class Config:
        task_first_class: Annotated[int, Range(ge=0, le=10)] = 6
        "the task's first procedural shape (as the task's procedural first_class)"
        task_classes: Annotated[int, Range(ge=2, le=12)] = 6
        "the task's number of classes (shapes task_first_class ...)"
        per_class: NonNegativeInt = 100
        "gallery images of each task class"
        other_shapes: NonNegativeInt = 600
        "distractor images of the other procedural shapes"
        digits: NonNegativeInt = 600
        "distractor images of scikit-learn's digits"
        photos: NonNegativeInt = 600
        "distractor crops of scikit-image's sample photos"
        leaks: NonNegativeInt = 0
        "planted copies of the task's own test images (procedural val split, seed task_seed)"
        duplicates: NonNegativeInt = 0
        "planted near-copies of gallery task images"
        task_seed: Seed = 0
        "seed of the task's own images (its recipe's procedural seed), where the leaks come from"
        image_size: ImageSide = 48
        "side of the gallery's square images, in pixels"
        seed: Seed = 1
        "seed of the gallery's images (another than the task's: the gallery holds other drawings of its shapes)"
        root: str = ""
        "folder to write to (empty: under $KDFORGE_CACHE, else ~/.cache/kdforge, named by these settings)"

    num_classes = None

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        if cfg.task_first_class + cfg.task_classes > 12:
            raise ValueError(f"task_first_class + task_classes = {cfg.task_first_class + cfg.task_classes} > 12: "
                             "there are 12 procedural shapes")

    def folder(self) -> Path:
        settings = {k: v for k, v in dataclasses.asdict(self.cfg).items() if k != "root"}
        if self.cfg.root:
            return Path(self.cfg.root)
        from kdforge.teachers.embedded import default_cache_dir

        key = hashlib.sha256(json.dumps([_VERSION, settings], sort_keys=True).encode()).hexdigest()[:16]
        return default_cache_dir() / "galleries" / f"demo-{key}"

    def build(self, split: str, transform: Callable[[Any], torch.Tensor] | None) -> FileImageDataset:
        if split != "train":
            raise DataError(f"the demo gallery has one split, 'train', not {split!r}")
        folder = self.folder()
        if not (folder / "done").is_file():
            _write(self.cfg, folder)
        files = sorted(p for p in os.listdir(folder) if p.endswith(".png"))
        samples = [(str(folder / f), -1) for f in files]
        return FileImageDataset(samples, transform)


def _write(cfg: DemoGallerySource.Config, folder: Path) -> None:
    """Write the gallery's PNG files into ``folder`` (through a temporary sibling renamed into place)."""
    from PIL import Image
    from torchvision.transforms.v2 import functional as F

    from kdforge.data.embedded import DigitsSource, SingleImageSource
    from kdforge.data.procedural import generate

    size = cfg.image_size
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)

    def save(kind: str, label: int, i: int, img: torch.Tensor) -> None:
        if img.shape[-1] != size or img.shape[-2] != size:
            img = F.resize(img, [size, size], antialias=True)
        Image.fromarray(img.permute(1, 2, 0).contiguous().numpy()).save(tmp / f"{kind}-{label:02d}-{i:06d}.png")

    n_task = cfg.per_class * cfg.task_classes
    if n_task:
        images, labels = generate(n_task, num_classes=cfg.task_classes, first_class=cfg.task_first_class,
                                  image_size=size, seed=cfg.seed)
        for i, (img, lab) in enumerate(zip(images, labels.tolist())):
            save("task", lab, i, img)
        for i in range(cfg.duplicates):
            j = (i * 7919) % n_task
            noise = torch.randint(-2, 3, images[j].shape, generator=torch.Generator().manual_seed(i))
            save("dup", int(labels[j]), i, (images[j].int() + noise).clamp(0, 255).to(torch.uint8))
    others = list(range(cfg.task_first_class)) + list(range(cfg.task_first_class + cfg.task_classes, 12))
    if cfg.other_shapes and len(others) >= 2:
        # procedural classes are consecutive shapes: draw runs of them and keep those outside the task
        images, labels = generate(cfg.other_shapes * 12 // len(others) + 12, num_classes=12, image_size=size,
                                  seed=cfg.seed + 1)
        keep = torch.isin(labels, torch.tensor(others))
        for i, (img, lab) in enumerate(zip(images[keep][: cfg.other_shapes], labels[keep].tolist())):
            save("shape", lab, i, img)
    if cfg.digits:
        ds = DigitsSource(DigitsSource.Config(image_size=size)).build("train", None)
        for i in range(cfg.digits):
            item = ds[i % len(ds)]
            save("digit", item["label"], i, (item["image"] * 255).round().to(torch.uint8))
    if cfg.photos:
        photos = ["astronaut", "coffee", "chelsea", "rocket", "coins", "brick", "grass", "gravel"]
        per = -(-cfg.photos // len(photos))
        i = 0
        for name in photos:
            ds = SingleImageSource(SingleImageSource.Config(image=name, num_train=per, crop_size=size,
                                                            seed=cfg.seed)).build("train", None)
            for j in range(min(per, cfg.photos - i)):
                save("photo", 0, i, (ds[j]["image"] * 255).round().to(torch.uint8))
                i += 1
    if cfg.leaks:
        images, labels = generate(cfg.leaks, num_classes=cfg.task_classes, first_class=cfg.task_first_class,
                                  image_size=32, seed=cfg.task_seed, split="val")
        for i, (img, lab) in enumerate(zip(images, labels.tolist())):
            save("leak", lab, i, img)
    (tmp / "done").write_text("")
    if folder.exists():  # another process finished first
        shutil.rmtree(tmp, ignore_errors=True)
        return
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
