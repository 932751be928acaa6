"""Images in folders: the ImageNet layout (``root/train/<class>/*.JPEG``) or a flat folder of unlabelled images.

Layouts, decided per split:

- ``root/<split_dir>/<class>/**/*.<ext>``: labelled; classes are the sorted folder names of the train split and
  the val split must use the same names (ImageNet's ``val`` reorganised into class folders, as everyone does);
- ``root/<split_dir>/*.<ext>``: that split is unlabelled (label -1);
- ``root/*.<ext>`` with no split folders: one unlabelled pool of images that serves every split.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable

import torch

from kdforge.data import DataSource
from kdforge.data.datasets import DEFAULT_MAX_IMAGE_PIXELS, FileImageDataset
from kdforge.errors import DataError

__all__ = ["ImageFolderSource", "scan_split"]

_DEFAULT_EXTENSIONS = [".jpg", ".jpeg", ".png", ".bmp", ".webp", ".ppm", ".tif", ".tiff"]


def _is_image(name: str, extensions: tuple[str, ...]) -> bool:
    return not name.startswith(".") and name.lower().endswith(extensions)


def _scandir_sorted(folder: str) -> list[os.DirEntry]:
    """The entries of ``folder`` sorted by name; a folder that cannot be listed is a :class:`DataError`.

    os.walk skips such folders silently (``onerror=None``), which turned an unreadable class folder into an empty
    class, or a class quietly missing a subfolder; failing at scan time loses nothing and names the folder.
    """
    try:
        with os.scandir(folder) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise DataError(
            f"cannot list the image folder '{folder}' ({exc.strerror or exc}): every folder of the data set must be "
            "readable by this user; fix its permissions (e.g. chmod -R u+rX) or its mount, or move it out of the "
            "data set"
        ) from exc


def _class_names(entries: list[os.DirEntry]) -> list[str]:
    """The folders among a split folder's sorted entries (links to folders too), hidden ones left out."""
    return [e.name for e in entries if e.is_dir() and not e.name.startswith(".")]


def _real_dir(path: str | os.DirEntry) -> tuple[int, int]:
    """(device, inode) of the directory ``path`` leads to, through any links: one key per real directory."""
    st = path.stat() if isinstance(path, os.DirEntry) else os.stat(path)
    return st.st_dev, st.st_ino


def _walk_images(folder: str, extensions: tuple[str, ...], owners: dict[tuple[int, int], str]) -> list[str]:
    """Every image file under the class folder ``folder`` (recursively, following links), in a stable order.

    The order is os.walk's: a folder's files by name, then its subfolders by name, depth first. Each real
    directory is entered once however many links lead to it, so a link loop neither repeats images nor recurses
    forever. ``owners`` maps each real directory met so far to the class folder it was met under; the classes of
    a split share it and claim their own folders (and the split folder) before any walk, so a link from one class
    into another class's images, which would give them two labels, is a :class:`DataError` in either order.
    """
    found = []
    stack = [folder]
    while stack:
        subdirs = []
        for entry in _scandir_sorted(stack.pop()):
            if entry.name.startswith("."):
                continue
            if not entry.is_dir():
                if _is_image(entry.name, extensions):
                    found.append(entry.path)
                continue
            real = _real_dir(entry)
            owner = owners.get(real)
            if owner is None:
                owners[real] = folder
                subdirs.append(entry.path)
            elif owner != folder:
                raise DataError(
                    f"'{entry.path}' leads (through a link) into '{owner}', which is scanned as another class or is "
                    "the split folder itself: its images would get a second label; remove the link, or copy the "
                    "images it should add into this class"
                )
            # else: a folder of this class met again through a link (a loop, or two links to one folder): skip
        stack += reversed(subdirs)
    return found


def scan_split(folder: str, extensions: tuple[str, ...]) -> tuple[list[str], list[tuple[str, int]]]:
    """(classes, samples) of one split folder; classes is empty and labels are -1 for a flat folder.

    Raises :class:`DataError` for a folder that cannot be listed, a class folder without images (it would still
    count as a class), and two class folders that are one directory through links.
    """
    entries = _scandir_sorted(folder)
    subdirs = _class_names(entries)
    loose = [e.path for e in entries if e.is_file() and _is_image(e.name, extensions)]
    if subdirs and loose:
        raise DataError(
            f"{folder} holds both class folders ({', '.join(subdirs[:3])}, ...) and loose images "
            f"({os.path.basename(loose[0])}, ...): put every image in a class folder for labelled data, "
            "or no folders at all for unlabelled data"
        )
    if not subdirs:
        return [], [(p, -1) for p in loose]
    owners = {_real_dir(folder): folder}
    class_dirs = [os.path.join(folder, name) for name in subdirs]
    for class_dir in class_dirs:
        owner = owners.setdefault(_real_dir(class_dir), class_dir)
        if owner != class_dir:
            raise DataError(
                f"class folder '{class_dir}' is the same directory as '{owner}' (through a link): each class needs "
                "its own folder; remove the link or replace it with a copy"
            )
    samples = []
    for label, class_dir in enumerate(class_dirs):
        images = _walk_images(class_dir, extensions, owners)
        if not images:
            raise DataError(
                f"class folder '{class_dir}' holds no images with endings {', '.join(extensions)}: remove it (an "
                "empty folder still counts as a class), or add the endings its files use to data.extensions"
            )
        samples += [(p, label) for p in images]
    return subdirs, samples


class ImageFolderSource(DataSource):
    """ImageNet-style class folders or a flat folder of images, decoded with PIL; unreadable files are skipped."""

    name = "image_folder"

    @dataclasses.dataclass
    class Config:
        root: str = ""
        "data set folder holding the split folders (or the images themselves); recipes often write '${IMAGENET_DIR}'"
        train_dir: str = "train"
        "name of the train split's folder under root"
        val_dir: str = "val"
        "name of the val split's folder under root"
        extensions: list[str] = dataclasses.field(default_factory=lambda: list(_DEFAULT_EXTENSIONS))
        "file name endings that count as images (case-insensitive)"
        dataset_name: str = "image folder"
        "what the folder holds, for error messages (e.g. 'ImageNet')"
        root_env: str = "IMAGENET_DIR"
        "environment variable suggested in the 'not found' message"
        max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
        "images with more pixels (width x height) are skipped and counted, never decoded (decompression bombs)"

        def __post_init__(self) -> None:
            if not self.extensions:
                raise ValueError("extensions must name at least one file ending, e.g. ['.jpg', '.png']")
            if self.max_image_pixels < 1:
                raise ValueError(
                    f"max_image_pixels must be >= 1 (width x height of the largest image to decode), got "
                    f"{self.max_image_pixels}; the default {DEFAULT_MAX_IMAGE_PIXELS} is PIL's own limit"
                )

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        self._classes: list[str] | None = None

    def _not_found(self, path: str) -> DataError:
        env = self.cfg.root_env
        how = "set data.root in the recipe, pass --set data.root=/path/to/data"
        if env:
            how += f", or export {env}=/path/to/data"
        return DataError(f"{self.cfg.dataset_name} not found at '{path}': {how}")

    def _extensions(self) -> tuple[str, ...]:
        return tuple(e.lower() if e.startswith(".") else "." + e.lower() for e in self.cfg.extensions)

    def _split_folder(self, split: str) -> str:
        """The folder that holds ``split``; the root itself for a flat layout."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got {split!r}")
        root = os.path.expanduser(self.cfg.root)
        if not root:
            raise self._not_found("(data.root is empty)")
        split_dir = os.path.join(root, self.cfg.train_dir if split == "train" else self.cfg.val_dir)
        if os.path.isdir(split_dir):
            return split_dir
        if os.path.isdir(root):
            other = os.path.join(root, self.cfg.val_dir if split == "train" else self.cfg.train_dir)
            has_loose = any(_is_image(e, self._extensions()) for e in os.listdir(root))
            if has_loose and not os.path.isdir(other):
                return root  # flat: one unlabelled pool for every split
        raise self._not_found(split_dir)

    def _train_classes(self) -> list[str]:
        if self._classes is None:
            folder = self._split_folder("train")
            if os.path.samefile(folder, os.path.expanduser(self.cfg.root)):
                self._classes = []  # flat pool: unlabelled
            else:
                self._classes = _class_names(_scandir_sorted(folder))
        return self._classes

    @property
    def num_classes(self) -> int | None:  # type: ignore[override]
        """Number of class folders in the train split (None for flat, unlabelled folders)."""
        return len(self._train_classes()) or None

    def build(self, split: str, transform: Callable[[Any], torch.Tensor] | None) -> FileImageDataset:
        folder = self._split_folder(split)
        classes, samples = scan_split(folder, self._extensions())
        if not samples:
            raise DataError(
                f"no images with endings {', '.join(self._extensions())} under '{folder}': "
                "check data.root, or add the endings your files use to data.extensions"
            )
        if classes and split != "train":
            # labels must mean the same class in every split: index by the train split's class folders
            train_classes = self._train_classes()
            if train_classes:
                index = {c: i for i, c in enumerate(train_classes)}
                unknown = [c for c in classes if c not in index]
                if unknown:
                    raise DataError(
                        f"class folders in '{folder}' that the train split does not have: "
                        f"{', '.join(unknown[:10])}{' ...' if len(unknown) > 10 else ''}; both splits need the "
                        "same class folder names"
                    )
                samples = [(p, index[classes[label]]) for p, label in samples]
                classes = train_classes
        return FileImageDataset(samples, transform, classes, self.cfg.max_image_pixels)
