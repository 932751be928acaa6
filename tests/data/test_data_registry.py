"""Every registered data source builds from a recipe table and yields the item contract through a DataLoader."""

import dataclasses
from pathlib import Path

import pluggy
import pytest
import torch

from kdforge import hookspecs
from kdforge.data import DataSource, Skipped, builtin, collate
from kdforge.data.transforms import TransformConfig, build_transform
from kdforge.errors import DataError
from kdforge.plugins import Registry
from kdforge.recipe.schema import field_docs

BUILTIN = {"image_folder", "webdataset", "procedural", "digits", "single_image", "few_shot", "mixture", "image_mixer",
           "retrieved", "demo_gallery"}


def _retrieval(out: Path) -> str:
    """A kdforge retrieve output of four crops of procedural images (as the pipeline writes it)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    gallery = {"plugin": "procedural", "num_train": 8, "num_val": 4, "image_size": 20}
    (out / "retrieval.json").write_text(json.dumps({"gallery": gallery, "image_size": 16}))
    records = [{"entry": i, "item": i, "crop": 0, "box": [i, 2, 15, 12], "ops": [["contrast", 1.5]],
                "source": f"#{i}", "query": 0, "query_label": 0, "similarity": 0.5, "strategy": "random"}
               for i in range(4)]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(out)


@pytest.fixture(scope="module")
def registry():
    # only this plugin module: the test must not depend on the other built-in modules importing
    pm = pluggy.PluginManager("kdforge")
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name="kdforge.data.builtin")
    return Registry(pm, {"kdforge.data.builtin": "builtin (kdforge.data.builtin)"}, [])


@pytest.fixture
def tables(tmp_path, imagenet_tree):
    """A small recipe table per source; a new built-in without one here fails the smoke test below."""
    wds = pytest.importorskip("webdataset", reason="webdataset is not installed")
    import io

    import numpy as np
    from PIL import Image

    for split in ("train", "val"):
        with wds.TarWriter(str(tmp_path / f"{split}-0.tar")) as sink:
            for i in range(6):
                buf = io.BytesIO()
                Image.fromarray(np.full((9, 9, 3), 20 * i, dtype=np.uint8)).save(buf, format="PNG")
                sink.write({"__key__": f"k{i}", "png": buf.getvalue(), "cls": str(i % 3).encode()})
    return {
        "image_folder": {"root": str(imagenet_tree)},
        "webdataset": {"train_urls": str(tmp_path / "train-{0..0}.tar"), "val_urls": str(tmp_path / "val-0.tar"),
                       "num_classes": 3, "shuffle_buffer": 4},
        "procedural": {"num_train": 16, "num_val": 8, "image_size": 16},
        "digits": {"image_size": 12},
        "single_image": {"num_train": 16, "num_val": 8, "crop_size": 20},
        "few_shot": {"source": {"plugin": "procedural", "num_train": 64, "num_val": 8, "image_size": 16},
                     "per_class": 2},
        "mixture": {"sources": {"real": {"plugin": "digits", "image_size": 12},
                                "shapes": {"plugin": "procedural", "num_train": 16, "image_size": 12,
                                           "frequency": 0.5}},
                    "length": 12},
        "demo_gallery": {"per_class": 2, "other_shapes": 4, "digits": 2, "photos": 2, "image_size": 16,
                         "root": str(tmp_path / "gallery")},
        "retrieved": {"manifest": _retrieval(tmp_path / "retrieval")},
        # its tiny diffusion model is written by the test that builds it (skipped without diffusers)
        "image_mixer": {"source": {"plugin": "procedural", "num_train": 8, "num_val": 4, "image_size": 16},
                        "out": str(tmp_path / "mixed"), "count": 4, "pipeline": str(tmp_path / "mixer_pipeline"),
                        "steps": 1, "image_size": 16, "device": "cpu"},
    }


def test_the_builtin_sources_are_registered(registry):
    assert set(registry.names("data_sources")) == BUILTIN
    for comp in registry.components("data_sources"):
        assert issubclass(comp.cls, DataSource)


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_every_config_field_has_a_one_line_docstring(registry, name):
    cls = registry.get("data_sources", name)
    docs = field_docs(cls.Config)
    missing = [f.name for f in dataclasses.fields(cls.Config) if not docs.get(f.name)]
    assert not missing, f"{name}.Config fields without a docstring: {missing}"
    cls.Config()  # every field has a default: a recipe names only what it changes


@pytest.mark.parametrize("name", sorted(BUILTIN))
@pytest.mark.parametrize("split", ["train", "val"])
def test_every_source_yields_the_item_contract(registry, tables, name, split):
    assert name in tables, f"add a small recipe table for the new data source '{name}' to this test"
    src = registry.create("data_sources", {"plugin": name, **tables[name]}, "data")
    if name == "image_mixer" and split in src.splits:
        from image_mixer_helpers import tiny_pipeline

        tiny_pipeline(Path(tables[name]["pipeline"]))
    tf = build_transform(TransformConfig(image_size=8), train=split == "train")
    if split not in src.splits:  # a source without this split says so
        with pytest.raises(DataError, match=split):
            src.build(split, tf)
        return
    ds = src.build(split, tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=4, collate_fn=collate)
    batch = next(iter(loader))
    assert set(batch) == {"image", "label", "index", "skipped"}
    assert batch["image"].shape[1:] == (3, 8, 8) and batch["image"].dtype == torch.float32
    assert 0.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["label"].dtype == torch.long and batch["index"].dtype == torch.long
    assert all(isinstance(s, Skipped) for s in batch["skipped"])
    if src.num_classes is None:
        assert (batch["label"] == -1).all()
    else:
        assert ((batch["label"] >= 0) & (batch["label"] < src.num_classes)).all()


def test_modules_import_and_explain_themselves_without_optional_packages():
    """webdataset, scikit-learn and scikit-image are optional: importing the plugins must not need them, and
    using a source that does names the package to install."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        for name in ("webdataset", "braceexpand", "sklearn", "skimage", "diffusers", "transformers", "huggingface_hub"):
            sys.modules[name] = None  # `import name` now raises ImportError
        import kdforge.data.builtin, kdforge.eval.builtin
        from kdforge.data.embedded import DigitsSource, SingleImageSource
        from kdforge.data.procedural import ProceduralSource
        from kdforge.data.shards import WebDatasetSource
        from kdforge.errors import DataError
        ProceduralSource(ProceduralSource.Config(num_train=4, num_val=4)).build("train", None)[0]
        for src in (DigitsSource(DigitsSource.Config()), SingleImageSource(SingleImageSource.Config()),
                    WebDatasetSource(WebDatasetSource.Config(train_urls="x-{0..1}.tar"))):
            try:
                src.build("train", None)
            except DataError as exc:
                print(exc)
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3
    assert "pip install scikit-learn" in lines[0]
    assert "pip install scikit-image" in lines[1]
    assert "pip install webdataset" in lines[2]
