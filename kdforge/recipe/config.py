"""The recipe tree: the typed sections a TOML recipe maps onto.

Component tables (``[teacher]``, ``[student]``, ``[masker]``, ``[data]``, ``[losses.<label>]``,
``[eval.data]``, ``[eval.evaluators.<label>]``) pick a plugin with ``plugin = "name"``; their other keys are
checked against that plugin's own ``Config`` when the recipe is resolved.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from kdforge.data.transforms import TransformConfig


@dataclasses.dataclass
class RunConfig:
    name: str = "run"
    """Run name; the default output directory is runs/<name>."""
    output_dir: str = ""
    """Where checkpoints, metrics and summary.json go (default runs/<name>; --output-dir overrides)."""
    seed: int = 0
    """Seed for initialisation, data order, augmentation and masks."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks cuda when available."""
    threads: int = 0
    """torch CPU threads (0 = torch's default)."""


@dataclasses.dataclass
class OptimConfig:
    lr: float = 5e-4
    """Base learning rate for a global batch of `lr_scale_batch` images (scaled linearly by the global batch)."""
    lr_scale_batch: int = 512
    """Reference batch size of the linear lr scaling rule (lr * global_batch / lr_scale_batch)."""
    min_lr: float = 1e-5
    """Learning rate at the end of the cosine schedule."""
    warmup_epochs: float = 5.0
    """Linear warm-up length in epochs (fractions allowed)."""
    weight_decay: float = 0.05
    """AdamW weight decay (not applied to norms, biases, tokens and position embeddings)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    clip_grad: float = 0.0
    """Clip the global gradient norm to this value (0 disables)."""


@dataclasses.dataclass
class TrainConfig:
    epochs: int = 300
    """Number of passes over the training data."""
    batch_size: int = 128
    """Images per process per micro-step (global batch = batch_size x accum_steps x world size)."""
    accum_steps: int = 1
    """Gradient accumulation: micro-steps per optimizer step."""
    max_steps: int = 0
    """Stop after this many optimizer steps (0 = run all epochs); the schedule still spans all epochs."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype for student and teacher forward passes (fp16 uses a GradScaler)."""
    num_workers: int = 0
    """DataLoader worker processes."""
    checkpoint_every: int = 500
    """Write a checkpoint every N optimizer steps (and at the end; 0 = only at the end)."""
    keep_checkpoints: int = 1
    """How many step checkpoints to keep besides last.pt."""
    log_every: int = 10
    """Log metrics every N optimizer steps."""
    max_bad_fraction: float = 0.01
    """Fail when more than this fraction of images could not be read."""
    compile: bool = False
    """torch.compile the student."""
    resize_teacher_grid: bool = False
    """Resample the teacher's patch tokens bilinearly onto the student's grid when their patch grids differ."""


@dataclasses.dataclass
class EvalConfig:
    before: bool = True
    """Evaluate the (untrained) student before training: summary keys student_<metric>_before."""
    after: bool = True
    """Evaluate the student after training: summary keys student_<metric>_after."""
    teacher: bool = True
    """Evaluate the teacher too: summary keys teacher_<metric>."""
    every_epochs: int = 0
    """Also evaluate the student every N epochs (0 = never)."""
    batch_size: int = 256
    """Feature-extraction batch size."""
    features: Literal["cls", "mean_patch"] = "cls"
    """What represents an image, for student and teacher alike: the CLS token after the final norm, or the mean of
    the patch tokens (for students distilled on patch maps only, such as FD's)."""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Labelled data source for evaluation (its train split is the kNN bank / probe train set, val the test set)."""
    evaluators: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Evaluators by label, each a table with `plugin` (knn, linear_probe, ...)."""


@dataclasses.dataclass
class Recipe:
    run: RunConfig = dataclasses.field(default_factory=RunConfig)
    """Run-wide settings."""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Training data source (unlabelled images are enough)."""
    augment: TransformConfig = dataclasses.field(default_factory=TransformConfig)
    """Training augmentation (one view, given to teacher and student alike)."""
    teacher: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The frozen teacher."""
    student: dict[str, Any] = dataclasses.field(default_factory=dict)
    """The trained student."""
    masker: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Patch masker for the student's masked view (empty = no masking)."""
    losses: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Losses by label, each a table with `plugin` and optional `weight` (default 1.0)."""
    optim: OptimConfig = dataclasses.field(default_factory=OptimConfig)
    """Optimizer and learning-rate schedule."""
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    """Training loop."""
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    """Evaluation of frozen features."""
    profiles: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Named overlays applied with --profile NAME."""
