"""kdforge.retrieval.pipeline in process, at tiny sizes: text queries through a CLIP text tower (one query per class
name), image-level galleries, and what a run refuses."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from kdforge.errors import KdforgeError
from kdforge.recipe.config import Recipe
from kdforge.retrieval.pipeline import run_retrieval
from kdforge.retrieval.store import GalleryStore

_spec = importlib.util.spec_from_file_location("model_helpers",
                                               Path(__file__).parents[1] / "models" / "model_helpers.py")
MODEL_HELPERS = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(MODEL_HELPERS)

TASK = {"plugin": "procedural", "first_class": 6, "num_classes": 3, "num_train": 12, "num_val": 6, "image_size": 16}


def _recipe(tmp_path, **retrieve):
    gallery = {"plugin": "demo_gallery", "task_classes": 3, "per_class": 6, "other_shapes": 8, "digits": 6,
               "photos": 6, "image_size": 24, "root": str(tmp_path / "gallery-images")}
    # a random tiny CLIP sees every image alike: no cleaning (it would call them all duplicates)
    table = {"gallery": gallery, "level": "image", "image_size": 16, "n": 10, "shard_images": 16,
             "drop_duplicates": False, "drop_leaks": False,
             "encoders": {"clip": {"plugin": "open_clip", "model": MODEL_HELPERS.write_open_clip_dir(
                 tmp_path / "clip"), "pretrained": ""}}, **retrieve}
    from kdforge.recipe.config import RunConfig

    return Recipe(data=TASK, retrieve=table, run=RunConfig(device="cpu"))


def test_text_queries_are_the_class_names_through_the_text_tower(tmp_path):
    pytest.importorskip("open_clip", reason="open_clip_torch is not installed (pip install 'kdforge[clip]')")
    recipe = _recipe(tmp_path, text_queries=True, class_names=["star", "crescent", "picture_frame"])
    summary = run_retrieval(recipe, tmp_path / "out", show_progress=False, echo=lambda line: None)
    assert summary["queries"] == 3 and summary["retrieved"] == 10
    records = [json.loads(line) for line in (tmp_path / "out" / "manifest.jsonl").read_text().splitlines()]
    assert {r["query"] for r in records} <= {"text:a photo of a star.", "text:a photo of a crescent.",
                                             "text:a photo of a picture frame."}
    # each similarity is the cosine of the entry's image embedding and its class name's text embedding
    from kdforge.plugins import create
    from kdforge.retrieval.crops import remake

    torch.manual_seed(recipe.run.seed)  # the random weights the run's encoder had (it is built after this seed)
    teacher = create("teachers", recipe.retrieve["encoders"]["clip"], "clip")
    store = GalleryStore(tmp_path / "out" / "gallery")
    for r in records[:4]:
        item, _, params, _ = store.entry(r["entry"])
        image = remake(store_dataset(recipe)[item]["image"], params, 16).float()[None] / 255
        text = teacher.encode_text([r["query"].removeprefix("text:")])
        cos = torch.nn.functional.cosine_similarity(teacher(image).cls, text).item()
        assert abs(cos - r["similarity"]) < 2e-3 * max(1.0, abs(cos)), (cos, r)
        assert r["query_label"] == ["star", "crescent", "picture_frame"].index(
            r["query"].removeprefix("text:a photo of a ").rstrip(".").replace(" ", "_"))


def store_dataset(recipe):
    from kdforge.plugins import create

    return create("data_sources", recipe.retrieve["gallery"], "gallery").build("train", None)


def test_text_queries_need_a_text_tower(tmp_path):
    recipe = _recipe(tmp_path, text_queries=True, encoders={"pixels": {"plugin": "embedded"}})
    with pytest.raises(KdforgeError, match="encoder 'pixels' .* has no text tower"):
        run_retrieval(recipe, tmp_path / "out", show_progress=False, echo=lambda line: None)
    assert not (tmp_path / "out" / "manifest.jsonl").exists()


def test_more_than_the_gallery_is_refused(tmp_path):
    pytest.importorskip("open_clip", reason="open_clip_torch is not installed (pip install 'kdforge[clip]')")
    recipe = _recipe(tmp_path, n=10_000)
    with pytest.raises(KdforgeError, match="retrieve.n = 10000 but the gallery has 38 entries"):
        run_retrieval(recipe, tmp_path / "out", show_progress=False, echo=lambda line: None)
