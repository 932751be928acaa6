"""Data that ships inside installed packages, so that it works without a network.

- ``digits``: scikit-learn's 1797 handwritten digits (8x8 grey), upsampled to a configurable size, three channels,
  with a fixed, seeded, class-stratified train/val split.
- ``single_image``: Proteus' ImageNet-Single ablation (after Asano et al., "A critical analysis of
  self-supervision, or what we can learn from a single image"): a data set of random resized crops of ONE large
  photo, unlabelled, of any length. The photo is one of scikit-image's sample images or a local file.
"""

from __future__ import annotations

import dataclasses
import math
import threading
from typing import Any, Callable, Literal

import torch
import torch.nn.functional as F

from kdforge.data import DataSource
from kdforge.data.datasets import TensorImageDataset, apply_transform, mix_seed
from kdforge.errors import DataError
from kdforge.ranges import ImageSide, ItemCount, Seed

__all__ = ["DigitsSource", "SingleImageSource", "SINGLE_IMAGES"]


_SPLITS = {"train": 0, "val": 1}
_lock = threading.Lock()
_digits_cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}


def _load_digits(image_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as (uint8 Tensor[1797, 3, S, S], LongTensor[1797]), bright strokes on black."""
    with _lock:
        if image_size in _digits_cache:
            return _digits_cache[image_size]
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:
        raise DataError("the 'digits' data source needs scikit-learn: pip install scikit-learn") from exc
    bunch = load_digits()
    x = torch.as_tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0  # [N, 1, 8, 8], values 0..16
    # bilinear keeps strokes smooth when upsampling 8 -> 32 (nearest would show the 8x8 blocks)
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=image_size < 8)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    y = torch.as_tensor(bunch.target, dtype=torch.long)
    with _lock:
        _digits_cache[image_size] = (x, y)
    return x, y


def stratified_split(labels: torch.Tensor, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, val indices): each class contributes round(val_fraction * its size) to val, chosen at random."""
    g = torch.Generator().manual_seed(seed)
    train, val = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(val_fraction * len(idx)))
        val.append(idx[:k])
        train.append(idx[k:])
    return torch.sort(torch.cat(train)).values, torch.sort(torch.cat(val)).values


class DigitsSource(DataSource):
    """scikit-learn's handwritten digits (10 classes, 1797 images), upsampled and repeated to three channels."""

    name = "digits"

    @dataclasses.dataclass
    class Config:
        image_size: ImageSide = 32
        "side of the upsampled square images, in pixels (the originals are 8x8)"
        val_fraction: float = 0.2
        "fraction of each class held out as the val split"
        seed: Seed = 0
        "seed of the train/val split"

        def __post_init__(self) -> None:
            if self.image_size < 1:
                raise ValueError(f"image_size must be positive, got {self.image_size}")
            if not 0 < self.val_fraction < 1:
                raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")

    num_classes = 10

    def build(self, split: str, transform: Callable[[Any], torch.Tensor] | None) -> TensorImageDataset:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        images, labels = _load_digits(self.cfg.image_size)
        train_idx, val_idx = stratified_split(labels, self.cfg.val_fraction, self.cfg.seed)
        idx = train_idx if split == "train" else val_idx
        return TensorImageDataset(images[idx], labels[idx], transform)


#: scikit-image sample photos that ship with the package (no download); grey ones are repeated to RGB.
SINGLE_IMAGES = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "camera",
    "coins",
    "moon",
    "brick",
    "grass",
    "gravel",
)


def _load_photo(image: str, path: str) -> torch.Tensor:
    """The photo as uint8 ``Tensor[3, H, W]``: the file at ``path`` if given, else skimage.data.<image>()."""
    if path:
        from kdforge.data.datasets import read_image
        from kdforge.data.transforms import to_image_tensor

        loaded = read_image(path)
        if not hasattr(loaded, "size"):  # a Skipped record
            raise DataError(f"cannot read data.path '{path}' for the single_image source: {loaded.reason}")
        return to_image_tensor(loaded)
    try:
        import skimage.data
    except ImportError as exc:
        raise DataError(
            "the 'single_image' data source needs scikit-image for its sample photos: pip install scikit-image, "
            "or set data.path to a local image file"
        ) from exc
    from kdforge.data.transforms import to_image_tensor

    return to_image_tensor(getattr(skimage.data, image)())


class _CropDataset(torch.utils.data.Dataset):
    """Random resized crops of one photo; crop ``i`` is fixed by the boxes drawn at build time."""

    def __init__(self, photo: torch.Tensor, boxes: torch.Tensor, crop_size: int, transform):
        self.photo = photo  # uint8 [3, H, W]
        self.boxes = boxes  # int64 [N, 4]: top, left, height, width
        self.crop_size = crop_size
        self.transform = transform

    def __len__(self) -> int:
        return len(self.boxes)

    def __getitem__(self, index: int) -> dict:
        from torchvision.transforms.v2 import functional as TF

        top, left, h, w = self.boxes[index].tolist()
        crop = TF.resized_crop(self.photo, top, left, h, w, [self.crop_size, self.crop_size], antialias=True)
        return {"image": apply_transform(self.transform, crop), "label": -1, "index": int(index)}


def crop_boxes(
    n: int, height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], generator: torch.Generator
) -> torch.Tensor:
    """``n`` random resized crop boxes, vectorised: LongTensor[n, 4] of (top, left, height, width).

    Area fraction is uniform in ``scale`` and log aspect ratio uniform in ``ratio`` (as in torchvision's
    RandomResizedCrop); a box that does not fit is shrunk to fit instead of redrawn, so that one draw serves all.
    """
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=generator) * (height * width)
    log_r = torch.empty(n).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).round().clamp(1, width)
    h = torch.sqrt(area / r).round().clamp(1, height)
    top = (torch.rand(n, generator=generator) * (height - h + 1)).floor().clamp(max=height - h)
    left = (torch.rand(n, generator=generator) * (width - w + 1)).floor().clamp(max=width - w)
    return torch.stack([top, left, h, w], dim=1).long()


class SingleImageSource(DataSource):
    """ImageNet-Single: many random resized crops of one large photo, as an unlabelled data set (label -1)."""

    name = "single_image"
    num_classes = None

    @dataclasses.dataclass
    class Config:
        image: Literal[
            "astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina",
            "camera", "coins", "moon", "brick", "grass", "gravel",
        ] = "astronaut"
        "scikit-image sample photo to crop from"
        path: str = ""
        "a local image file to crop from instead of the sample photo ('' uses image)"
        num_train: ItemCount = 10000
        "crops in the train split (the data set's length)"
        num_val: ItemCount = 1000
        "crops in the val split (drawn with a different seed)"
        crop_size: ImageSide = 224
        "side of each square crop after resizing, in pixels"
        scale: tuple[float, float] = (0.08, 1.0)
        "range of each crop's area as a fraction of the photo"
        ratio: tuple[float, float] = (3 / 4, 4 / 3)
        "range of each crop's aspect ratio (width / height) before resizing"
        seed: Seed = 0
        "seed of the crop boxes; the same seed gives the same crops"

        def __post_init__(self) -> None:
            if self.num_train < 0 or self.num_val < 0:
                raise ValueError("num_train and num_val must be >= 0")
            if self.crop_size < 1:
                raise ValueError(f"crop_size must be positive, got {self.crop_size}")
            if not 0 < self.scale[0] <= self.scale[1] <= 1:
                raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1, got {tuple(self.scale)}")
            if not 0 < self.ratio[0] <= self.ratio[1]:
                raise ValueError(f"ratio must be (lo, hi) with 0 < lo <= hi, got {tuple(self.ratio)}")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._photo: torch.Tensor | None = None

    def photo(self) -> torch.Tensor:
        """The whole photo, uint8 ``Tensor[3, H, W]`` (loaded once)."""
        if self._photo is None:
            self._photo = _load_photo(self.cfg.image, self.cfg.path)
        return self._photo

    def build(self, split: str, transform: Callable[[Any], torch.Tensor] | None) -> _CropDataset:
        if split not in _SPLITS:
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        photo = self.photo()
        n = self.cfg.num_train if split == "train" else self.cfg.num_val
        g = torch.Generator().manual_seed(mix_seed(self.cfg.seed, _SPLITS[split]))
        boxes = crop_boxes(n, photo.shape[1], photo.shape[2], tuple(self.cfg.scale), tuple(self.cfg.ratio), g)
        return _CropDataset(photo, boxes, self.cfg.crop_size, transform)
