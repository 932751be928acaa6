"""The "embedded" teacher: a small timm model trained on an embedded labelled data set on first use, then cached.

No weights can be downloaded on a machine without network, yet a smoke run must show knowledge moving from a
teacher that knows something into a random student. So the teacher learns a supervised task (procedural shapes
by default) once, in a minute or two on a CPU, and every later run loads it from ``cache_dir``. It learns on the
engine, as any supervised stage does (:func:`training_recipe`: the model is the "timm" student with its own
classifier, the loss supervised.ce): kdforge has one way to train with labels.

The cache file is named by a hash of everything that changes the weights (model, data, schedule, seed; not the
device, autocast or hidden layers). It is written atomically (temporary file, then ``os.replace``) with a JSON
beside it (val accuracy, config, timings), under a file lock so that several processes (DDP ranks, parallel tests)
train it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from torch import nn

from kdforge.engine import signals
from kdforge.engine.checkpoint import atomic_path
from kdforge.errors import DataError, ShapeError
from kdforge.ranges import ImageSide, NonNegativeFloat, PositiveInt, Range, Seed
from kdforge.teachers import Teacher
from kdforge.teachers.timm_teacher import TimmBackedTeacher
from kdforge.teachers.timm_utils import conv_stem_embed, model_mean_std  # noqa: F401 (conv_stem_embed: re-exported)

__all__ = ["EmbeddedTeacher", "build_model", "cache_file", "cache_key", "default_cache_dir", "train_classifier",
           "training_recipe"]

#: Bump when the training procedure changes, so that old cached teachers are not mistaken for new ones.
TRAINING_VERSION = 2


def default_cache_dir() -> Path:
    """$KDFORGE_CACHE, else ~/.cache/kdforge."""
    return Path(os.environ.get("KDFORGE_CACHE") or Path.home() / ".cache" / "kdforge").expanduser()


class EmbeddedTeacher(TimmBackedTeacher):
    """A tiny ViT that learns a labelled embedded data set on first use (cached), then serves as a frozen teacher.

    Default: timm's VisionTransformer at 32 px with 4 px patches (an 8x8 token grid, like the smoke profile's
    student), width 64, two blocks, a conv stem and max pooling instead of a CLS token. A plain patchify ViT of
    this size stays near chance on the procedural shapes after tens of thousands of images; the conv stem and max
    pooling make it learn them in a few epochs on a CPU.
    """

    name = "embedded"

    @dataclasses.dataclass
    class Config(Teacher.Config):
        model: str = "vit_tiny_patch16_224"
        """timm model name of the teacher (model_kwargs shrink it)."""
        # The default has no CLS token: it max-pools the patch tokens, then normalises (timm's fc_norm). The
        # teacher's cls output is exactly the feature its classifier reads, and max pooling finds a shape wherever
        # it is in the image (the norm after the pooling learnt much faster than a norm before it: 95% vs 80%).
        model_kwargs: dict[str, Any] = dataclasses.field(
            default_factory=lambda: {
                "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2, "class_token": False, "global_pool": "max",
            }
        )
        """Keyword arguments for timm.create_model (img_size comes from image_size, num_classes from the data)."""
        stem: Literal["conv", "patch"] = "conv"
        """Patch embedding: a small CNN with the patch size as its stride (learns fast), or ViT's single patchify conv."""
        stem_width: Annotated[int, Range(ge=1, le=1024)] = 16
        """Channels of the conv stem's first stage (doubling per stage)."""
        data: dict[str, Any] = dataclasses.field(default_factory=lambda: {"plugin": "procedural"})
        """Recipe table of the labelled data source it learns (train split to train, val split to measure)."""
        image_size: ImageSide = 32
        """Side of the training images, in pixels; the teacher expects images of this size."""
        epochs: PositiveInt = 4
        """Training epochs over the train split."""
        batch_size: PositiveInt = 128
        """Training batch size."""
        lr: Annotated[float, Range(gt=0, le=1)] = 5e-3
        """Peak AdamW learning rate (linear warm-up, then cosine to 1% of it)."""
        warmup_epochs: NonNegativeFloat = 0.8
        """Epochs of linear learning-rate warm-up."""
        weight_decay: Annotated[float, Range(ge=0, le=1)] = 1e-4
        """AdamW weight decay (not applied to norms, biases, tokens and position embeddings)."""
        label_smoothing: float = 0.0
        """Label smoothing of the cross-entropy loss."""
        augment: bool = True
        """Light augmentation of the training images: a random crop of 75-100% of the image, then a horizontal flip."""
        seed: Seed = 0
        """Seed of initialisation, batch order and augmentation."""
        cache_dir: str = ""
        """Where trained teachers are kept (empty: $KDFORGE_CACHE, else ~/.cache/kdforge)."""
        device: Literal["auto", "cpu", "cuda"] = "auto"
        """Device to train on when the cache is empty (auto: cuda if available)."""
        progress: bool = True
        """Show a progress bar (with ETA) while training."""
        hidden_norm: bool = True
        """Apply the final norm to the hidden outputs too."""

        def __post_init__(self):
            super().__post_init__()
            for key in ("image_size", "epochs", "batch_size", "stem_width"):
                if getattr(self, key) < 1:
                    raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")
            if self.lr <= 0:
                raise ValueError(f"lr must be > 0, got {self.lr}")
            if not 0 <= self.label_smoothing < 1:
                raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    def __init__(self, cfg: Config):
        super().__init__(cfg)
        from kdforge.plugins import create

        self.model_name = f"embedded {cfg.model}"
        source = create("data_sources", cfg.data, "teacher.data")
        num_classes = source.num_classes
        if not num_classes:
            raise DataError(
                f"[teacher.data] source '{cfg.data.get('plugin')}' has no labels, but the embedded teacher learns a "
                "classification task: use a labelled source (procedural, digits, image_folder)"
            )
        model = build_model(cfg, num_classes)
        mean, std = model_mean_std(model)

        self.cache_path = cache_file(cfg)
        self.info = self._load_or_train(model, source, num_classes)
        self.val_accuracy: float = float(self.info["val_accuracy"])
        self.adopt(model, mean=mean, std=std)

    # ------------------------------------------------------------------------------------------------ cache
    def _load_or_train(self, model: nn.Module, source, num_classes: int) -> dict:
        from safetensors.torch import load_file, save_file

        cfg = self.cfg
        path = self.cache_path
        meta_path = path.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path.with_suffix(".lock")):
            if not path.is_file():
                work = path.parent / f".training-{path.stem}"
                trained, info = train_classifier(cfg, source, num_classes, work)
                model.load_state_dict(trained.state_dict())
                # The JSON first, the weights last: the weights file existing means the entry is complete.
                with atomic_path(meta_path) as tmp:
                    tmp.write_text(json.dumps(info, indent=2))
                state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
                with atomic_path(path) as tmp:
                    save_file(state, str(tmp), metadata={"kdforge": "embedded teacher"})
                return info
        try:
            state = load_file(str(path), device="cpu")
            model.load_state_dict(state)
        except Exception as exc:  # noqa: BLE001 - a stale or damaged cache file: say which and how to fix it
            raise ShapeError(
                f"the cached embedded teacher {path} does not load into {cfg.model} ({exc}); delete the file to "
                "train it again"
            ) from exc
        try:
            return json.loads(meta_path.read_text())
        except (OSError, ValueError):
            return {"val_accuracy": float("nan"), "config": _weights_config(cfg)}


def _weights_config(cfg) -> dict:
    """The config fields that change the trained weights (the cache key hashes exactly these)."""
    skip = {"autocast", "hidden_layers", "hidden_norm", "cache_dir", "device", "progress"}
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in skip}


def cache_key(cfg) -> str:
    """16 hex digits of a SHA-256 over the weight-relevant config and the training procedure's version."""
    blob = json.dumps({"v": TRAINING_VERSION, **_weights_config(cfg)}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cache_file(cfg) -> Path:
    """Where the teacher trained with ``cfg`` is kept: <cache_dir>/teachers/embedded-<model>-<key>.safetensors."""
    root = Path(cfg.cache_dir).expanduser() if cfg.cache_dir else default_cache_dir()
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", cfg.model)  # "hf-hub:org/name" must not become a directory
    return root / "teachers" / f"embedded-{model}-{cache_key(cfg)}.safetensors"


@contextlib.contextmanager
def _file_lock(path: Path):
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; concurrent first runs just train twice (writes stay atomic)
        yield
        return
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_model(cfg, num_classes: int) -> nn.Module:
    """The teacher's timm classifier for ``cfg``, initialised from ``cfg.seed``: the model of the "timm" student
    that :func:`train_classifier` trains (one way to build and train a model with labels)."""
    from kdforge.plugins import create

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return create("students", student_table(cfg, num_classes), "teacher").model


def student_table(cfg, num_classes: int) -> dict[str, Any]:
    """The [student] table of the teacher's model: a timm ViT with its classifier (and the conv stem)."""
    return {"plugin": "timm", "model": cfg.model, "model_kwargs": {**cfg.model_kwargs, "img_size": cfg.image_size},
            "stem": cfg.stem, "stem_width": cfg.stem_width, "num_classes": num_classes}


def training_recipe(cfg, num_classes: int, num_train: int) -> dict[str, Any]:
    """The teacher's training as a kdforge recipe (a supervised stage on the engine): cross-entropy of the model's
    own classifier on ``cfg.data``'s train split, AdamW with the engine's weight-decay groups, linear warm-up then a
    cosine to 1% of ``cfg.lr``, light augmentation (a random crop of 75-100% of the image and a flip), and the
    classifier's top-1 on the val split at the end."""
    augment = {"scale": [0.75, 1.0], "ratio": [0.9, 1.1], "hflip": 0.5} if cfg.augment else \
        {"scale": [1.0, 1.0], "ratio": [1.0, 1.0], "hflip": 0.0}
    batch = min(cfg.batch_size, num_train)
    return {
        "run": {"name": "embedded_teacher", "seed": cfg.seed, "device": cfg.device},
        "data": cfg.data,
        "augment": {"image_size": cfg.image_size, "crop_pct": 1.0, **augment},
        "student": student_table(cfg, num_classes),
        "losses": {"ce": {"plugin": "supervised.ce", "head": "student", "label_smoothing": cfg.label_smoothing}},
        "optim": {"lr": cfg.lr, "lr_scale_batch": batch, "min_lr": cfg.lr * 0.01, "warmup_epochs": cfg.warmup_epochs,
                  "weight_decay": cfg.weight_decay},
        "train": {"epochs": cfg.epochs, "batch_size": batch, "checkpoint_every": 0, "keep_checkpoints": 0,
                  "log_every": 10},
        "eval": {"before": False, "teacher": False, "batch_size": 512, "data": cfg.data,
                 "evaluators": {"top1": {"plugin": "classifier"}}},
    }


def train_classifier(cfg, source, num_classes: int, work_dir: Path) -> tuple[nn.Module, dict[str, Any]]:
    """Train the teacher's classifier on ``cfg.data`` with the engine (:func:`training_recipe`, one process) in
    ``work_dir`` (removed afterwards, and first if a killed attempt left it); returns (the trained timm model, the
    cache's info: val accuracy in [0, 1], timings, sizes). SIGTERM stops it between steps with
    :class:`kdforge.engine.signals.Preempted`, leaving nothing behind."""
    import shutil

    from kdforge.engine.trainer import Trainer
    from kdforge.recipe import load_recipe

    num_train = len(source.build("train", None))
    num_val = len(source.build("val", None))
    if not num_train or not num_val:
        split = "train" if not num_train else "val"
        raise DataError(f"[teacher.data] the {split} split is empty: the embedded teacher needs labelled images")
    recipe = load_recipe(data=training_recipe(cfg, num_classes, num_train))
    what = f"the first-use training of the embedded teacher ({cfg.model})"
    shutil.rmtree(work_dir, ignore_errors=True)
    # The training seeds and draws from the global generators: a run that builds this teacher on first use must go
    # on exactly as one that finds it in the cache, so every generator is put back afterwards.
    saved = _save_rng()
    try:
        trainer = Trainer(recipe, work_dir, show_progress=cfg.progress, single_process=True,
                          step_hook=lambda step: signals.check(what))
    except BaseException:
        _restore_rng(saved)
        raise
    if cfg.progress:
        from tqdm.auto import tqdm

        tqdm.write(f"kdforge: first use of this embedded teacher: training it on '{cfg.data.get('plugin')}' "
                   f"({num_train} images, {trainer.device}); cached as {cache_file(cfg)}")
    try:
        summary = trainer.fit()
    except signals.Preempted:
        raise signals.Preempted(f"SIGTERM during {what}") from None
    finally:
        trainer.close()
        shutil.rmtree(work_dir, ignore_errors=True)
        _restore_rng(saved)
    info = {
        "val_accuracy": summary["student_classifier_top1_after"] / 100.0,
        "train_seconds": summary["wall_time_s"],
        "images_per_second": round(summary["steps"] * summary["global_batch"] / max(summary["wall_time_s"], 1e-9), 1),
        "device": str(trainer.device),
        "num_classes": num_classes,
        "num_train": num_train,
        "num_val": num_val,
        "config": _weights_config(cfg),
        "training_version": TRAINING_VERSION,
        "torch": torch.__version__,
    }
    return trainer.student.model.cpu().eval(), info


def _save_rng() -> tuple:
    """torch's (CPU and CUDA), Python's and numpy's global generator states."""
    import random

    import numpy as np

    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda, random.getstate(), np.random.get_state()


def _restore_rng(saved: tuple) -> None:
    import random

    import numpy as np

    cpu, cuda, py, npy = saved
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state_all(cuda)
    random.setstate(py)
    np.random.set_state(npy)
