"""Dataset classes shared by the built-in sources: in-memory image tensors and image files on disk."""

from __future__ import annotations

import contextlib
import os
import threading
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from kdforge.data import Skipped
from kdforge.data.transforms import as_float_image, to_rgb8

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS", "FileImageDataset", "TensorImageDataset", "apply_transform", "mix_seed", "read_image"
]  # fmt: skip

DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
"""Largest image (width x height) :func:`read_image` decodes by default: PIL's own default limit (a 24-bit image
of 256 MiB, about 9500 x 9500), beyond which PIL warns of a decompression bomb."""

Transform = Callable[[Any], torch.Tensor] | None


def mix_seed(*parts: int) -> int:
    """A 63-bit generator seed from integers, stable across processes and Python versions (unlike ``hash``)."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = ((h ^ (p & 0xFFFF_FFFF_FFFF_FFFF)) * 0xBF58476D1CE4E5B9) & 0xFFFF_FFFF_FFFF_FFFF
        h ^= h >> 31
    return h & 0x7FFF_FFFF_FFFF_FFFF


def apply_transform(transform: Transform, image: Any) -> torch.Tensor:
    """``transform(image)`` as float32 ``Tensor[3, H, W]`` in [0, 1] (no transform: the image converted as is), or
    as the uint8 ``Tensor[3, S, S]`` of a transform that says it returns bytes (``returns_uint8``: the worker half
    of ``augment.device_augment``, :class:`kdforge.data.transforms.CropFlipTransform`)."""
    out = transform(image) if transform is not None else image
    if getattr(transform, "returns_uint8", False):
        return out
    return as_float_image(out)


class _PilPixelLimitOff:
    """While any :func:`read_image` runs, PIL's own decompression-bomb check is off; restored when the last ends.

    PIL checks ``Image.MAX_IMAGE_PIXELS`` inside ``Image.open`` (and TIFF again at load): it warns above it and
    raises above twice it, so a ``max_pixels`` above PIL's limit could never be honoured and one below it would be
    preempted by a warning. read_image checks its own limit before decoding instead. The global is only changed
    while reads are in flight and is restored after the last one (counted under a lock, so overlapping reads in
    threads never restore a stale value); nothing leaks past a read.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._active = 0
        self._saved: int | None = None

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        from PIL import Image

        with self._lock:
            if self._active == 0:
                self._saved = Image.MAX_IMAGE_PIXELS
                Image.MAX_IMAGE_PIXELS = None
            self._active += 1
        try:
            yield
        finally:
            with self._lock:
                self._active -= 1
                if self._active == 0:
                    Image.MAX_IMAGE_PIXELS = self._saved


_pil_pixel_limit_off = _PilPixelLimitOff()


def read_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS):
    """Decode an image file as an 8-bit RGB PIL image, or return :class:`Skipped` with the reason it failed.

    Every decoder error counts as a bad file (truncated JPEG, random bytes, empty file, CMYK oddities, permission
    denied): on a large data set a few are normal and must not stop a run; :class:`kdforge.data.skips.SkipCounter`
    stops it when there are too many. So do images of more than ``max_pixels`` pixels (width x height, read from
    the header; the pixels are never decoded: a decompression bomb would take gigabytes) and images whose 16-bit,
    32-bit or float pixels have no known range (:func:`kdforge.data.transforms.to_rgb8`, which scales the others).
    """
    from PIL import Image

    try:
        with _pil_pixel_limit_off(), Image.open(path) as im:
            width, height = im.size
            if width * height > max_pixels:
                return Skipped(
                    os.fspath(path),
                    f"{width} x {height} = {width * height} pixels, more than the limit of {max_pixels} (a "
                    "decompression bomb, or a very large image): not decoded; raise data.max_image_pixels to read it",
                )
            im.load()  # decode now, inside the try: PIL decodes lazily and a truncated file fails only here
            return to_rgb8(im)
    except Exception as exc:  # noqa: BLE001 - any decoding failure is a property of the file, see docstring
        return Skipped(os.fspath(path), f"{type(exc).__name__}: {exc}")


class TensorImageDataset(torch.utils.data.Dataset):
    """Images held in memory: uint8 ``Tensor[N, 3, H, W]`` and labels ``LongTensor[N]`` (None: unlabelled)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor | None, transform: Transform):
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [N, 3, H, W], got {list(images.shape)}")
        if labels is not None and len(labels) != len(images):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images = images
        self.labels = labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        label = int(self.labels[index]) if self.labels is not None else -1
        return {"image": apply_transform(self.transform, self.images[index]), "label": label, "index": int(index)}


class FileImageDataset(torch.utils.data.Dataset):
    """Image files on disk, from (path, label) pairs; unreadable files come back as :class:`Skipped`.

    ``max_image_pixels`` is :func:`read_image`'s limit: larger images are skipped without being decoded.

    Paths are kept in one numpy byte-string array and labels in one int64 array, not in a list of Python
    tuples: DataLoader workers are forked, and touching millions of Python objects (even reading them updates
    their reference counts) copies the pages that hold them into every worker, a well-known memory blow-up.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Transform,
        classes: Sequence[str] = (),
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
    ):
        if max_image_pixels < 1:
            raise ValueError(f"max_image_pixels must be >= 1 (pixels of the largest image), got {max_image_pixels}")
        paths = [os.fsencode(p) for p, _ in samples]
        self._paths = np.array(paths, dtype=bytes) if paths else np.zeros(0, dtype="S1")
        self._labels = np.array([label for _, label in samples], dtype=np.int64)
        self.transform = transform
        self.classes = list(classes)
        self.max_image_pixels = int(max_image_pixels)

    def __len__(self) -> int:
        return len(self._labels)

    def sample(self, index: int) -> tuple[str, int]:
        """(path, label) of item ``index``."""
        return os.fsdecode(self._paths[index]), int(self._labels[index])

    @property
    def labels(self) -> torch.Tensor:
        """LongTensor[N]: every item's label (-1 where unlabelled), read without opening a file (shares memory with
        the dataset: do not write to it)."""
        return torch.from_numpy(self._labels)

    @property
    def samples(self) -> list[tuple[str, int]]:
        """Every (path, label), as a new list (for inspection; the dataset itself does not keep one)."""
        return [self.sample(i) for i in range(len(self))]

    def __getitem__(self, index: int) -> dict | Skipped:
        path, label = self.sample(index)
        read_file = getattr(self.transform, "read_file", None)
        if read_file is not None:  # the transform decodes the file itself, the fastest way it knows
            image = read_file(path, self.max_image_pixels)
            if isinstance(image, Skipped):
                return image
            return {"image": image, "label": label, "index": int(index)}
        image = read_image(path, self.max_image_pixels)
        if isinstance(image, Skipped):
            return image
        return {"image": apply_transform(self.transform, image), "label": label, "index": int(index)}
