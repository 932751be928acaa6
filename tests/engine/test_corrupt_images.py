"""Unreadable images are skipped, counted and listed; past `train.max_bad_fraction` the run fails with the list."""

import json
from pathlib import Path

import numpy as np
from cli_helpers import kdforge
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
    return kdforge("train", TINY, "--no-progress", "--output-dir", out,
                   "--set", "data={plugin = 'image_folder', root = '%s'}" % root, "--set", "train.epochs=1", *extra)


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


def test_a_batch_of_only_unreadable_images_is_skipped_and_counted(tmp_path):
    # batch_size 1: each bad file is a batch with no readable image, well within max_bad_fraction
    bad = make_folder(tmp_path / "imgs", good=40, bad=2)
    res = train(tmp_path / "imgs", tmp_path / "out", "--set", "train.batch_size=1", "--set", "train.max_bad_fraction=0.1",
                "--set", "train.checkpoint_every=0")
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["steps"] == summary["total_steps"] == 42  # the schedule's steps all taken, on readable images
    assert summary["skipped_images"] >= 2
    listed = {entry[0] for entry in summary["skipped_files"]}
    assert listed == set(bad)


def test_a_wholly_unreadable_data_set_exits_2_with_the_list_and_writes_nothing(tmp_path):
    (tmp_path / "imgs").mkdir()
    bad = [tmp_path / "imgs" / f"img_{i}.png" for i in range(9)]
    for i, p in enumerate(bad):
        p.write_bytes(b"" if i % 2 else np.random.default_rng(i).bytes(300))
    res = train(tmp_path / "imgs", tmp_path / "out")
    assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert "could be read" in res.stderr and all(Path(b).name in res.stderr for b in bad[:8])
    assert not (tmp_path / "out").exists()


def test_an_unreadable_epoch_stops_instead_of_looping(tmp_path):
    """Every image of an epoch unreadable (the first batch read fine at start-up, then the files went bad):
    with max_bad_fraction = 1 nothing else would stop the run."""
    from kdforge.engine.trainer import Trainer
    from kdforge.errors import DataError
    from kdforge.recipe import load_recipe

    make_folder(tmp_path / "imgs", good=16, bad=0)
    recipe = load_recipe(TINY, overrides=[f"data={{plugin = 'image_folder', root = '{tmp_path / 'imgs'}'}}",
                                          "train.max_bad_fraction=1.0", "eval.before=false"])
    trainer = Trainer(recipe, tmp_path / "out", show_progress=False)
    for p in (tmp_path / "imgs").iterdir():
        p.write_bytes(b"")
    import pytest

    with pytest.raises(DataError, match="gave no batch with a readable image"):
        trainer.fit()


def test_an_all_unreadable_micro_batch_takes_part_with_zero_weight(tmp_path):
    """Under DDP every process must join each step's gradient all-reduce, so a process whose batch was all
    unreadable stands in a zero image with weight 0: no gradient, nothing counted in the metrics."""
    from kdforge.data import Skipped, collate
    from kdforge.engine.trainer import Trainer
    from kdforge.recipe import load_recipe

    trainer = Trainer(load_recipe(TINY, overrides=["eval.before=false"]), tmp_path / "out", show_progress=False)
    loss, terms = trainer.forward_backward(collate([Skipped("a.png", "empty"), Skipped("b.png", "empty")]))
    assert loss == 0.0 and set(terms) == {"token", "feature", "patch"} and not any(terms.values())
    grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
    assert grads and not any(g.any() for g in grads)  # backward ran through every head, with zeros
