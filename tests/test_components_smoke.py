"""Every registered component gets a tiny forward (and backward where it trains) on CPU (timm's test_models habit).

A new component without an entry in TABLES fails `test_every_component_has_a_smoke_case`, so nothing registered
goes untested.
"""

import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data import collate
from kdforge.data.transforms import TransformConfig, build_transform
from kdforge.plugins import build_plugin_manager
from kdforge.students import StudentOutput
from kdforge.teachers import TeacherOutput

TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2}
_spec = importlib.util.spec_from_file_location("model_helpers", Path(__file__).parent / "models" / "model_helpers.py")
MODEL_HELPERS = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(MODEL_HELPERS)
_spec = importlib.util.spec_from_file_location("image_mixer_helpers",
                                               Path(__file__).parent / "data" / "image_mixer_helpers.py")
MIXER_HELPERS = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(MIXER_HELPERS)


def _images(root: Path, n: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        for cls in ("a", "b"):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i}.png")
    return root


def _shard(path: Path, n: int = 6) -> str:
    rng = np.random.default_rng(1)
    with tarfile.open(path, "w") as tar:
        for i in range(n):
            for ext, data in (("png", None), ("cls", str(i % 2).encode())):
                if data is None:
                    buf = io.BytesIO()
                    Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(buf, format="png")
                    data = buf.getvalue()
                info = tarfile.TarInfo(f"{i:04d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return str(path)


def _retrieval(out: Path) -> str:
    """A kdforge retrieve output of three crops of procedural images (as the pipeline writes it)."""
    import json

    out.mkdir(parents=True, exist_ok=True)
    gallery = {"plugin": "procedural", "num_train": 8, "num_val": 4, "image_size": 20}
    (out / "retrieval.json").write_text(json.dumps({"gallery": gallery, "image_size": 16, "num_classes": 2,
                                                    "classes": ["a", "b"]}))
    records = [{"entry": 4 * i, "item": i, "crop": 0, "box": [i, 1, 12, 14], "ops": [["rotate", 9.0]],
                "source": f"#{i}", "query": 0, "query_label": i % 2, "similarity": 0.5, "strategy": "random"}
               for i in range(3)]
    (out / "manifest.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(out)


def TABLES(tmp: Path) -> dict[tuple[str, str], dict]:
    hub = tmp / "hub"
    hub.mkdir(exist_ok=True)
    (hub / "hubconf.py").write_text(MODEL_HELPERS.HUBCONF)
    encoder = {"teacher": {"plugin": "timm", "model": "vit_tiny_patch16_224", "model_kwargs": TINY_VIT},
               "num_classes": 3}
    if not (tmp / "adapt").exists():  # a finished adaptation run for the adapted teacher to read
        MODEL_HELPERS.write_adaptation_run(tmp / "adapt", {"plugin": "encoder", **encoder})
    return {
        ("teachers", "timm"): {"model": "vit_tiny_patch16_224", "model_kwargs": TINY_VIT},
        ("teachers", "torch_hub"): {"repo": str(hub), "source": "local", "model": "dinov2_tiny", "pretrained": False},
        ("teachers", "embedded"): {"model_kwargs": {"patch_size": 4, "embed_dim": 32, "depth": 1, "num_heads": 2},
                                   "image_size": 16, "epochs": 1, "batch_size": 16, "cache_dir": str(tmp / "cache"),
                                   "data": {"plugin": "procedural", "num_train": 32, "num_val": 16, "image_size": 16}},
        ("teachers", "adapted"): {"run": str(tmp / "adapt")},
        ("teachers", "open_clip"): {"model": MODEL_HELPERS.write_open_clip_dir(tmp / "open_clip"), "pretrained": ""},
        ("students", "timm"): {"model": "vit_tiny_patch16_224", "model_kwargs": TINY_VIT, "drop_path_rate": 0.1},
        ("students", "encoder"): encoder,
        ("losses", "proteus.token"): {},
        ("losses", "proteus.feature"): {"cls": "own_head"},  # the default shares proteus.token's head
        ("losses", "proteus.patch"): {},
        ("losses", "fd.feature"): {},
        ("losses", "supervised.ce"): {"num_classes": 4, "label_smoothing": 0.1},
        ("losses", "distill.kl"): {"temperature": 2.0},
        ("losses", "contrastive.global"): {"dim": 16},
        ("losses", "cosine.patch"): {},
        ("data_sources", "procedural"): {"num_train": 8, "num_val": 4, "image_size": 16},
        ("data_sources", "digits"): {"image_size": 16},
        ("data_sources", "single_image"): {"num_train": 8, "num_val": 4, "crop_size": 16},
        ("data_sources", "image_folder"): {"root": str(_images(tmp / "folder"))},
        ("data_sources", "few_shot"): {"source": {"plugin": "procedural", "num_train": 64, "num_val": 4,
                                                  "image_size": 16}, "per_class": 1},
        ("data_sources", "mixture"): {"sources": {"a": {"plugin": "procedural", "num_train": 8, "image_size": 16},
                                                  "b": {"plugin": "digits", "image_size": 16, "frequency": 0.5}}},
        ("data_sources", "image_mixer"): {"source": {"plugin": "procedural", "num_train": 8, "image_size": 16},
                                          "out": str(tmp / "mixed"), "count": 3, "steps": 1, "image_size": 16,
                                          "pipeline": str(tmp / "mixer_pipeline"), "device": "cpu"},
        ("data_sources", "demo_gallery"): {"per_class": 2, "other_shapes": 4, "digits": 3, "photos": 3, "leaks": 1,
                                           "duplicates": 1, "image_size": 24, "root": str(tmp / "gallery")},
        ("data_sources", "retrieved"): {"manifest": _retrieval(tmp / "retrieval"), "labels": "query"},
        ("data_sources", "webdataset"): {"train_urls": _shard(tmp / "train.tar"), "val_urls": _shard(tmp / "val.tar"),
                                         "length": 6, "num_classes": 2},
        ("maskers", "random"): {},
        ("maskers", "block"): {},
        ("evaluators", "classifier"): {},
        ("evaluators", "knn"): {"k": 3},
        ("evaluators", "linear_probe"): {"max_iter": 20},
        ("evaluators", "linear_dinov2"): {"n_last_blocks": 2, "lrs": [1e-2, 1e-1], "epochs": 5},
        ("loggers", "jsonl"): {},
        ("loggers", "tensorboard"): {},
    }


REGISTRY = build_plugin_manager(autoload=False)
CASES = [(c.kind, c.name) for c in REGISTRY.components()]


def test_every_component_has_a_smoke_case(tmp_path):
    assert set(CASES) == set(TABLES(tmp_path)), "add a tiny recipe table for each new component to TABLES"


class _PixelEncoder:
    """Raw pixels as an evaluator's encoder: the flattened image, or (for evaluators that read block outputs) as
    many identical "blocks" as asked, each with the image as CLS and its pixels (RGB) as patch tokens."""

    def __call__(self, images):
        return images.flatten(1)

    def intermediate_layers(self, images, n):
        return [StudentOutput(cls=images.flatten(1), patches=images.flatten(2).transpose(1, 2), grid=images.shape[-2:])
                for _ in range(n)]


def _fake_outputs(b=3, n=16, ds=24, dt=32):
    s = StudentOutput(cls=torch.randn(b, ds, requires_grad=True), patches=torch.randn(b, n, ds, requires_grad=True),
                      grid=(4, 4), logits=torch.randn(b, 4, requires_grad=True))
    t = TeacherOutput(cls=torch.randn(b, dt), patches=torch.randn(b, n, dt), grid=(4, 4), logits=torch.randn(b, 4))
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[0, :5] = True
    mask[2, 3:9] = True
    return s, t, {"mask": mask, "label": torch.tensor([0, 3, 1])}


@pytest.mark.parametrize("kind, name", CASES, ids=[f"{k}:{n}" for k, n in CASES])
def test_component_smoke(kind, name, tmp_path):
    table = {"plugin": name, **TABLES(tmp_path)[(kind, name)]}
    images = torch.rand(2, 3, 16, 16)
    if kind == "teachers":
        if name == "open_clip":
            pytest.importorskip("open_clip", reason="open_clip_torch is not installed (pip install 'kdforge[clip]')")
        teacher = REGISTRY.create(kind, table, "teacher")
        out = teacher(images)
        gh, gw = teacher.grid((16, 16))
        assert out.cls.shape == (2, teacher.embed_dim)
        assert out.patches.shape == (2, gh * gw, teacher.embed_dim) and torch.isfinite(out.patches).all()
        assert not any(p.requires_grad for p in teacher.parameters())
    elif kind == "students":
        student = REGISTRY.create(kind, table, "student")
        mask = torch.zeros(2, 16, dtype=torch.bool)
        mask[0, ::3] = True
        # a masked view where the student has a mask token (the encoder student adapts a task and has none)
        out = student(images, mask=mask if hasattr(student, "mask_token") else None)
        assert out.patches.shape == (2, 16, student.embed_dim)
        (out.cls.sum() + out.patches.sum() + (out.logits.sum() if out.logits is not None else 0)).backward()
        assert all(p.grad is not None for n, p in student.named_parameters() if p.requires_grad), \
            [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None]
        assert student.features(images).shape == (2, student.embed_dim)
    elif kind == "losses":
        loss_fn = REGISTRY.create(kind, table, "loss", student_dim=24, teacher_dim=32)
        loss_fn.bind({"loss": loss_fn}, "losses.loss")
        s, t, batch = _fake_outputs()
        loss, metrics = loss_fn(s, t, batch)
        assert loss.ndim == 0 and torch.isfinite(loss) and loss > 0
        loss.backward()
        assert all(p.grad is not None for p in loss_fn.parameters())
        assert s.cls.grad is not None or s.patches.grad is not None or s.logits.grad is not None
    elif kind == "data_sources":
        if name == "image_mixer":  # a tiny random diffusion model (skipped with the reason where diffusers is missing)
            MIXER_HELPERS.tiny_pipeline(Path(table["pipeline"]))
        source = REGISTRY.create(kind, table, "data")
        tf = build_transform(TransformConfig(image_size=16, scale=(0.5, 1.0)), train=True)
        for split in source.splits:
            ds = source.build(split, tf)
            items = [ds[i] for i in range(3)] if not isinstance(ds, torch.utils.data.IterableDataset) \
                else [x for _, x in zip(range(3), ds)]
            batch = collate(items)
            assert batch["image"].shape == (3, 3, 16, 16) and batch["image"].dtype == torch.float32
            assert 0 <= batch["image"].min() and batch["image"].max() <= 1
    elif kind == "maskers":
        masker = REGISTRY.create(kind, table, "masker")
        mask = masker(64, (8, 8), torch.Generator().manual_seed(0))
        assert mask.shape == (64, 64) and mask.dtype == torch.bool
        assert 0 < mask.float().mean() < 0.6
    elif kind == "evaluators":
        evaluator = REGISTRY.create(kind, table, "eval")
        source = REGISTRY.create("data_sources", {"plugin": "digits", "image_size": 8}, "data")
        tf = build_transform(TransformConfig(image_size=8), train=False)
        train = source.build("train", tf)
        encoder = _PixelEncoder()
        if evaluator.reads == "logits":  # a classifier: nearest class mean of the raw pixels, as linear logits
            pixels = torch.stack([train[i]["image"].flatten() for i in range(len(train))])
            labels = torch.tensor([train[i]["label"] for i in range(len(train))])
            means = torch.stack([pixels[labels == c].mean(0) for c in range(10)])
            encoder = lambda x: x.flatten(1) @ means.T - 0.5 * (means**2).sum(1)  # noqa: E731
        out = evaluator.run(encoder, train, source.build("val", tf), device=torch.device("cpu"), batch_size=128)
        top1 = [v for k, v in out.items() if k.endswith("_top1")]
        assert len(top1) == 1 and 50 < top1[0] <= 100, out  # raw pixels separate digits well
    elif kind == "loggers":
        logger = REGISTRY.create(kind, table, "logger", run_dir=tmp_path)
        logger.log(1, {"loss": 0.5})
        logger.close()
        assert any(tmp_path.rglob("*"))
    else:
        pytest.fail(f"no smoke check for kind {kind}")
