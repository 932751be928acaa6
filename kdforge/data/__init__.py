"""Data sources: where images come from. Built-ins live in :mod:`kdforge.data.builtin`.

Contract (every data source, built-in or third-party):

- class attribute ``name`` (unique) and a ``Config`` dataclass (one docstring line per field);
- ``__init__(cfg)``; ``num_classes`` (int, or None for unlabelled data); ``splits``, the splits ``build`` accepts
  (default "train" and "val");
- ``build(split, transform) -> torch.utils.data.Dataset`` whose items are dicts
  ``{"image": Tensor[3, H, W] float in [0, 1], "label": int (-1 if unlabelled), "index": int}``, or a
  :class:`Skipped` record for an image that could not be read (the collate function drops it and counts it).
  With ``augment.device_augment`` on, the train transform returns uint8 ``Tensor[3, S, S]`` (crop and flip only)
  and the image is that uint8 tensor: pass the transform's output through as
  :func:`kdforge.data.datasets.apply_transform` does (it keeps a ``returns_uint8`` transform's bytes); the trainer
  finishes the augmentation on the device. A source that reads files may call the transform's
  ``read_file(path, max_pixels)`` when it has one (the fastest decode it knows; :class:`Skipped` on failure).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, NamedTuple

import torch


class Skipped(NamedTuple):
    """An item that could not be loaded: where it came from and why."""

    path: str
    reason: str


class DataSource:
    name: ClassVar[str]

    @dataclasses.dataclass
    class Config:
        pass

    num_classes: int | None = None
    #: The splits :meth:`build` accepts.
    splits: ClassVar[tuple[str, ...]] = ("train", "val")

    def __init__(self, cfg: Any):
        self.cfg = cfg

    def build(self, split: str, transform: Callable[[Any], torch.Tensor]) -> torch.utils.data.Dataset:
        raise NotImplementedError(f"{type(self).__name__} must implement build(split, transform)")


def collate(items: list[dict | Skipped]) -> dict[str, Any]:
    """Stack good items; drop :class:`Skipped` ones and report them under ``"skipped"``.

    Returns ``{"image": Tensor[B, 3, H, W] (float, or uint8 with augment.device_augment), "label": LongTensor[B],
    "index": LongTensor[B],
    "skipped": list[Skipped]}`` (B may be smaller than the loader's batch size when items were skipped).
    """
    good = [it for it in items if not isinstance(it, Skipped)]
    skipped = [it for it in items if isinstance(it, Skipped)]
    if good:
        image = torch.stack([it["image"] for it in good])
    else:
        image = torch.empty(0, 3, 0, 0)
    return {
        "image": image,
        "label": torch.tensor([it["label"] for it in good], dtype=torch.long),
        "index": torch.tensor([it["index"] for it in good], dtype=torch.long),
        "skipped": skipped,
    }
