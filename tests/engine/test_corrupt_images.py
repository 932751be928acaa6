"""Unreadable images are skipped, counted and listed; past `train.max_bad_fraction` the run fails with the list."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "recipes" / "tiny.toml"


def make_folder(root: Path, good: int, bad: int) -> list[str]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(good):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(root / f"img_{i:03d}.png")
    bad_files = []
    for i in range(bad):
        p = root / f"img_bad_{i}.png"
        if i % 3 == 0:
            p.write_bytes(b"")  # empty
        elif i % 3 == 1:
            p.write_bytes(rng.bytes(300))  # random bytes under an image name
        else:
            data = (root / "img_000.png").read_bytes()
            p.write_bytes(data[: len(data) // 3])  # truncated
        bad_files.append(str(p))
    return bad_files


def train(root: Path, out: Path, *extra):
    cmd = [sys.executable, "-m", "kdforge.cli", "train", str(TINY), "--no-progress", "--output-dir", str(out),
           "--set", "data={plugin = 'image_folder', root = '%s'}" % root, "--set", "train.epochs=1", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, env=os.environ.copy())


def test_corrupt_images_are_skipped_counted_and_listed(tmp_path):
    bad = make_folder(tmp_path / "imgs", good=45, bad=3)
    res = train(tmp_path / "imgs", tmp_path / "out", "--set", "train.max_bad_fraction=0.2")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    # One epoch of 48 files in batches of 8 visits every file once: all three bad files are met.
    assert summary["skipped_images"] == 3
    listed = {entry[0] if isinstance(entry, (list, tuple)) else entry["path"] for entry in summary["skipped_files"]}
    assert listed == set(bad)


def test_too_many_corrupt_images_fail_with_the_list(tmp_path):
    bad = make_folder(tmp_path / "imgs", good=30, bad=18)
    res = train(tmp_path / "imgs", tmp_path / "out", "--set", "train.max_bad_fraction=0.05")
    assert res.returncode == 2
    assert any(Path(b).name in res.stderr for b in bad)
    assert "max_bad_fraction" in res.stderr
