"""The "embedded" teacher: a small timm model trained on an embedded labelled data set on first use, then cached.

No weights can be downloaded on a machine without network, yet a smoke run must show knowledge moving from a
teacher that knows something into a random student. So the teacher learns a supervised task (procedural shapes
by default) once, in a minute or two on a CPU, and every later run loads it from ``cache_dir``.

The cache file is named by a hash of everything that changes the weights (model, data, schedule, seed; not the
device, autocast or hidden layers). It is written atomically (temporary file, then ``os.replace``) with a JSON
beside it (val accuracy, config, timings), under a file lock so that several processes (DDP ranks, parallel tests)
train it once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import re
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdforge.engine import signals
from kdforge.engine.checkpoint import atomic_path
from kdforge.engine.optim import param_groups
from kdforge.errors import DataError, KdforgeError, ShapeError
from kdforge.ranges import ImageSide, NonNegativeFloat, PositiveInt, Range, Seed
from kdforge.teachers import Teacher
from kdforge.teachers.timm_teacher import TimmBackedTeacher
from kdforge.teachers.timm_utils import create_timm_model, model_mean_std

__all__ = ["EmbeddedTeacher", "TrainResult", "cache_file", "cache_key", "default_cache_dir", "train_classifier"]

#: Bump when the training procedure changes, so that old cached teachers are not mistaken for new ones.
TRAINING_VERSION = 1


def default_cache_dir() -> Path:
    """$KDFORGE_CACHE, else ~/.cache/kdforge."""
    return Path(os.environ.get("KDFORGE_CACHE") or Path.home() / ".cache" / "kdforge").expanduser()


@dataclasses.dataclass
class TrainResult:
    val_accuracy: float
    """Top-1 accuracy on the val split after the last epoch, in [0, 1]."""
    train_accuracy: float
    """Top-1 accuracy on the (augmented) training batches of the last epoch, in [0, 1]."""
    seconds: float
    """Wall time of the training loop."""
    images_per_second: float
    """Training throughput."""


def conv_stem_embed(width: int):
    """A timm ``embed_layer``: PatchEmbed whose single stride-p patchify convolution is replaced by a small CNN of
    the same total stride (Xiao et al. 2021, "Early convolutions help transformers see better").

    For patch size p = 2^k: k stages of [conv (5x5 first, then 3x3) + BatchNorm + ReLU + 2x2 max pool], widths
    ``width``, 2 ``width``, ..., then a 3x3 convolution to the embedding width. Everything else (grid, image size
    checks, flattening) is timm's PatchEmbed, so the model stays a VisionTransformer with the same token grid. On
    small data such a stem learns shapes in a few epochs where a plain patchify ViT barely leaves chance level.
    """
    return functools.partial(_conv_stem_class(), stem_width=width)


def _conv_stem_class() -> type:
    # Built on first use so that importing this module (when the plugin registry is built) does not import timm;
    # stored as a module attribute so that models using it can be pickled.
    global ConvStemPatchEmbed
    if "ConvStemPatchEmbed" in globals():
        return ConvStemPatchEmbed
    from timm.layers import PatchEmbed

    class ConvStemPatchEmbed(PatchEmbed):  # noqa: F811 - the global assigned above
        def __init__(self, *args, stem_width: int = 16, **kwargs):
            super().__init__(*args, **kwargs)
            ph, pw = self.patch_size
            stages = int(math.log2(ph)) if ph == pw else -1
            if stages < 1 or 2**stages != ph:
                raise KdforgeError(
                    f"[teacher] stem = 'conv' needs a square power-of-two patch size (2, 4, 8, 16), got {ph}x{pw}: "
                    "change model_kwargs.patch_size or set stem = 'patch'"
                )
            layers, chans = [], 3
            for i in range(stages):
                out = stem_width * 2**i
                k = 5 if i == 0 else 3
                layers += [nn.Conv2d(chans, out, k, padding=k // 2, bias=False), nn.BatchNorm2d(out), nn.ReLU(),
                           nn.MaxPool2d(2)]
                chans = out
            layers.append(nn.Conv2d(chans, self.proj.out_channels, 3, padding=1))
            self.proj = nn.Sequential(*layers)

    ConvStemPatchEmbed.__qualname__ = "ConvStemPatchEmbed"
    return ConvStemPatchEmbed


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
        """Light augmentation of the training batches: horizontal flip and a random shift of up to 1/16 of the side."""
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
        kwargs = {**cfg.model_kwargs, "img_size": cfg.image_size, "num_classes": num_classes}
        if cfg.stem == "conv":
            kwargs["embed_layer"] = conv_stem_embed(cfg.stem_width)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.seed)
            model = create_timm_model(cfg.model, pretrained=False, kwargs=kwargs, where="teacher")
        mean, std = model_mean_std(model)

        self.cache_path = cache_file(cfg)
        self.info = self._load_or_train(model, source, num_classes, mean, std)
        self.val_accuracy: float = float(self.info["val_accuracy"])
        self.adopt(model, mean=mean, std=std)

    # ------------------------------------------------------------------------------------------------ cache
    def _load_or_train(self, model: nn.Module, source, num_classes: int, mean, std) -> dict:
        from safetensors.torch import load_file, save_file

        cfg = self.cfg
        path = self.cache_path
        meta_path = path.with_suffix(".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        with _file_lock(path.with_suffix(".lock")):
            if not path.is_file():
                train_x, train_y = materialize(source, "train", cfg.image_size)
                val_x, val_y = materialize(source, "val", cfg.image_size)
                _check_labels(train_y, num_classes, "train")
                _check_labels(val_y, num_classes, "val")
                device = _training_device(cfg.device)
                if cfg.progress:
                    from tqdm.auto import tqdm

                    tqdm.write(f"kdforge: first use of this embedded teacher: training it on "
                               f"'{cfg.data.get('plugin')}' ({len(train_y)} images, {device}); cached as {path}")
                result = train_classifier(
                    model, train_x, train_y, val_x, val_y, cfg=cfg, mean=mean, std=std, device=device
                )
                model.to("cpu")
                info = {
                    "val_accuracy": result.val_accuracy,
                    "train_accuracy": result.train_accuracy,
                    "train_seconds": round(result.seconds, 2),
                    "images_per_second": round(result.images_per_second, 1),
                    "device": str(device),
                    "num_classes": num_classes,
                    "num_train": int(len(train_y)),
                    "num_val": int(len(val_y)),
                    "config": _weights_config(cfg),
                    "training_version": TRAINING_VERSION,
                    "torch": torch.__version__,
                }
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


def _training_device(choice: str) -> torch.device:
    if choice == "cuda" and not torch.cuda.is_available():
        raise KdforgeError("[teacher] device = 'cuda' but no CUDA device is available: use 'auto' or 'cpu'")
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(choice)


def _check_labels(labels: Tensor, num_classes: int, split: str) -> None:
    if len(labels) == 0:
        raise DataError(f"[teacher.data] the {split} split is empty: the embedded teacher needs labelled images")
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        raise DataError(
            f"[teacher.data] {int(bad.sum())} {split} images have labels outside 0..{num_classes - 1} (e.g. "
            f"{int(labels[bad][0])}); the embedded teacher needs every image labelled"
        )


def materialize(source, split: str, image_size: int) -> tuple[Tensor, Tensor]:
    """A data source's split as (uint8 Tensor[N, 3, S, S], LongTensor[N]), resized to ``image_size``.

    Small embedded data sets fit in memory; holding them as bytes lets every epoch run without the data pipeline.
    """
    from kdforge.data import collate
    from kdforge.data.transforms import TransformConfig, build_transform

    # crop_pct 1: resize to image_size and keep the whole image (the eval transform would zoom in otherwise)
    tf = build_transform(TransformConfig(image_size=image_size, crop_pct=1.0), train=False)
    dataset = source.build(split, tf)
    loader = torch.utils.data.DataLoader(dataset, batch_size=512, shuffle=False, collate_fn=collate)
    images, labels = [], []
    for batch in loader:
        images.append((batch["image"].clamp(0, 1) * 255).round().to(torch.uint8))
        labels.append(batch["label"])
    if not images:
        return torch.empty(0, 3, image_size, image_size, dtype=torch.uint8), torch.empty(0, dtype=torch.long)
    return torch.cat(images), torch.cat(labels)


def augment(x: Tensor, g: torch.Generator, *, max_shift: float = 0.0625, scale: tuple[float, float] = (1.0, 1.0)) -> Tensor:
    """Light augmentation on a batch Tensor[B, 3, H, W]: random translation (up to ``max_shift`` of the side),
    zoom and horizontal flip, one affine resampling per image (reflection at the borders)."""
    b = x.shape[0]
    r = torch.rand(b, 4, generator=g).to(x.device)
    s = scale[0] + (scale[1] - scale[0]) * r[:, 0]
    flip = torch.where(r[:, 1] < 0.5, -1.0, 1.0)
    tx = (r[:, 2] * 2 - 1) * max_shift * 2  # affine_grid works in [-1, 1] units: the side is 2
    ty = (r[:, 3] * 2 - 1) * max_shift * 2
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = flip / s
    theta[:, 1, 1] = 1 / s
    theta[:, 0, 2] = tx
    theta[:, 1, 2] = ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


@torch.no_grad()
def accuracy(model: nn.Module, images: Tensor, labels: Tensor, mean: Tensor, std: Tensor, device, batch: int = 512) -> float:
    """Top-1 accuracy of a classifier on uint8 images, in [0, 1]."""
    was = model.training
    model.eval()
    correct = 0
    for i in range(0, len(labels), batch):
        x = images[i : i + batch].to(device).float().div_(255)
        correct += int((model((x - mean) / std).argmax(1).cpu() == labels[i : i + batch]).sum())
    model.train(was)
    return correct / max(1, len(labels))


def train_classifier(
    model: nn.Module,
    train_x: Tensor,
    train_y: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    *,
    cfg,
    mean,
    std,
    device: torch.device,
) -> TrainResult:
    """Supervised cross-entropy training of ``model`` (a timm classifier) on uint8 images; returns its val accuracy.

    AdamW, linear warm-up then cosine to 1% of ``cfg.lr``, label smoothing, light augmentation (:func:`augment`).
    Batch order and augmentation come from a generator seeded with ``cfg.seed``.
    """
    from tqdm.auto import tqdm

    model.to(device).train()
    mean_t = torch.tensor(mean, device=device).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=device).view(1, 3, 1, 1)
    g = torch.Generator().manual_seed(cfg.seed)
    n = len(train_y)
    batch = min(cfg.batch_size, n)
    steps_per_epoch = n // batch
    total = steps_per_epoch * cfg.epochs
    warmup = max(1, int(round(cfg.warmup_epochs * steps_per_epoch)))
    opt = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    bar = tqdm(total=total, desc=f"training embedded teacher ({cfg.model})", unit="step", disable=not cfg.progress,
               dynamic_ncols=True)
    step, seen, t0 = 0, 0, time.perf_counter()
    correct, counted = 0, 0
    val_acc = float("nan")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)  # drop path and dropout, if the model_kwargs turn them on
        for epoch in range(cfg.epochs):
            order = torch.randperm(n, generator=g)
            correct, counted = 0, 0
            for i in range(steps_per_epoch):
                signals.check(f"the first-use training of the embedded teacher ({cfg.model})")
                idx = order[i * batch : (i + 1) * batch]
                x = train_x[idx].to(device, non_blocking=True).float().div_(255)
                y = train_y[idx].to(device, non_blocking=True)
                if cfg.augment:
                    x = augment(x, g)
                if step < warmup:
                    lr = cfg.lr * (step + 1) / warmup
                else:
                    t = (step - warmup) / max(1, total - warmup)
                    lr = cfg.lr * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * t)))
                for group in opt.param_groups:
                    group["lr"] = lr
                logits = model((x - mean_t) / std_t)
                loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                seen += len(idx)
                correct += int((logits.argmax(1) == y).sum())
                counted += len(idx)
                bar.update(1)
                if step % 10 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", val_acc=f"{val_acc:.3f}")
            val_acc = accuracy(model, val_x, val_y, mean_t, std_t, device)
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}", val_acc=f"{val_acc:.3f}")
    bar.close()
    seconds = time.perf_counter() - t0
    model.eval()
    return TrainResult(
        val_accuracy=val_acc,
        train_accuracy=correct / max(1, counted),
        seconds=seconds,
        images_per_second=seen / max(seconds, 1e-9),
    )
