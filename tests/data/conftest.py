"""Fixtures for the data-source tests: small image trees and broken image files written to tmp_path."""

import os

os.environ.setdefault("KDFORGE_DISABLE_PLUGIN_AUTOLOAD", "1")

from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402


def write_image(path: Path, seed: int, size=(20, 24), mode: str = "RGB") -> np.ndarray:
    """A random image saved at ``path`` (format from the suffix); returns its pixels as saved (HxWxC uint8)."""
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    arr = rng.integers(0, 256, (size[0], size[1], channels), dtype=np.uint8)
    img = Image.fromarray(arr[..., 0] if channels == 1 else arr, mode)
    img.save(path)
    return arr


def write_corrupt(folder: Path, good_source: Path) -> dict[str, str]:
    """Three broken files in ``folder``: a truncated JPEG, random bytes named .png, an empty .jpg."""
    folder.mkdir(parents=True, exist_ok=True)
    data = good_source.read_bytes()
    bad = {
        "truncated.jpg": data[: len(data) // 2],
        "random.png": np.random.default_rng(7).bytes(500),
        "empty.jpg": b"",
    }
    for name, content in bad.items():
        (folder / name).write_bytes(content)
    return {name: str(folder / name) for name in bad}


@pytest.fixture
def imagenet_tree(tmp_path):
    """root/train/{ant,bee,cat}/ with 4 images each (JPEG, PNG, a grey and an RGBA one), root/val/ with 2 each."""
    root = tmp_path / "imagenet"
    seed = 0
    for split, per_class in (("train", 4), ("val", 2)):
        for cls in ("ant", "bee", "cat"):
            for i in range(per_class):
                seed += 1
                ext, mode = [(".JPEG", "RGB"), (".png", "RGB"), (".png", "L"), (".png", "RGBA")][i % 4]
                write_image(root / split / cls / f"{cls}_{i}{ext}", seed, size=(16 + i, 20), mode=mode)
    (root / "train" / "ant" / "notes.txt").write_text("not an image")
    return root


@pytest.fixture
def image_writer():
    """``write_image(path, seed, size=(H, W), mode="RGB")``: write a random image, return its pixels."""
    return write_image


@pytest.fixture
def corrupt_writer():
    """``write_corrupt(folder, good_source)``: write three broken files, return {name: path}."""
    return write_corrupt


@pytest.fixture
def single_thread():
    """Run the test on one intra-op thread (restored afterwards): compute-bound tests measure work, not how
    OpenMP threads spin when other processes share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
