"""The recipe tree: the typed sections a TOML recipe maps onto.

Component tables (``[teacher]``, ``[student]``, ``[masker]``, ``[data]``, ``[losses.<label>]``,
``[eval.data]``, ``[eval.evaluators.<label>]``) pick a plugin with ``plugin = "name"``; their other keys are
checked against that plugin's own ``Config`` when the recipe is resolved.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Annotated, Any, Literal

from kdforge.data.transforms import TransformConfig
from kdforge.ranges import (
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveInt,
    Range,
    Seed,
    Workers,
)

#: A run name is one plain directory name under runs/ (run.output_dir or --output-dir place a run anywhere).
_RUN_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")


@dataclasses.dataclass
class RunConfig:
    name: str = "run"
    """Run name; the default output directory is runs/<name>."""
    output_dir: str = ""
    """Where checkpoints, metrics and summary.json go (default runs/<name>; --output-dir overrides)."""
    seed: Seed = 0
    """Seed for initialisation, data order, augmentation and masks."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to train: auto picks cuda when available."""
    threads: Annotated[int, Range(ge=0, le=1024)] = 0
    """torch CPU threads (0 = torch's default)."""

    def __post_init__(self) -> None:
        if not _RUN_NAME.fullmatch(self.name) or set(self.name) == {"."}:
            raise ValueError(
                f"name = {self.name!r} must be a plain directory name (letters, digits, '.', '_', '+', '-'; no "
                "'/' or '..'): the run goes to runs/<name>. To place it elsewhere set run.output_dir or pass "
                "--output-dir"
            )


#: An AdamW beta: the decay of a running average, in [0, 1).
_Beta = Annotated[float, Range(ge=0, lt=1)]


@dataclasses.dataclass
class OptimConfig:
    lr: Annotated[float, Range(gt=0, le=1)] = 5e-4
    """Base learning rate for a global batch of `lr_scale_batch` images (scaled linearly by the global batch)."""
    lr_scale_batch: PositiveInt = 512
    """Reference batch size of the linear lr scaling rule (lr * global_batch / lr_scale_batch)."""
    min_lr: NonNegativeFloat = 1e-5
    """Learning rate at the end of the cosine schedule."""
    warmup_epochs: NonNegativeFloat = 5.0
    """Linear warm-up length in epochs (fractions allowed)."""
    weight_decay: Annotated[float, Range(ge=0, le=1)] = 0.05
    """AdamW weight decay (not applied to norms, biases, and the student's position embeddings, tokens and
    relative position biases: kdforge.engine.optim)."""
    decay_also: list[str] = dataclasses.field(default_factory=list)
    """Patterns of parameter names to decay despite the student's no-weight-decay set: ["*"] decays them all (the
    released Proteus code), ["student.rel_pos_bias.*"] the shared relative position bias (the released FD code)."""
    betas: tuple[_Beta, _Beta] = (0.9, 0.999)
    """AdamW betas."""
    clip_grad: NonNegativeFloat = 0.0
    """Clip the global gradient norm to this value (0 disables)."""
    layer_decay: Annotated[float, Range(gt=0, le=1)] = 1.0
    """Layer-wise lr decay: with L student blocks, layer i trains at lr * layer_decay ** (L + 1 - i) (1 = off; FD
    fine-tunes ViT-B with 0.6; kdforge.engine.optim)."""

    def __post_init__(self) -> None:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr = {self.min_lr:g} is above lr = {self.lr:g}: the cosine schedule decays from lr "
                             "down to min_lr; lower min_lr")


@dataclasses.dataclass
class TrainConfig:
    epochs: PositiveInt = 300
    """Number of passes over the training data."""
    batch_size: PositiveInt = 128
    """Images per process per micro-step (global batch = batch_size x accum_steps x world size)."""
    accum_steps: PositiveInt = 1
    """Gradient accumulation: micro-steps per optimizer step."""
    repeated_aug: Annotated[int, Range(ge=1, le=64)] = 1
    """Repeated augmentation (DeiT): each image of an epoch's order appears this many times in a row, across
    consecutive ranks, under different augmentations; an epoch keeps its length (the released Proteus code: 3;
    at most 64: an epoch of more copies would hold a sixty-fourth of the images)."""
    max_steps: NonNegativeInt = 0
    """Stop after this many optimizer steps (0 = run all epochs); the schedule still spans all epochs."""
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    """Autocast dtype for student and teacher forward passes (fp16 uses a GradScaler)."""
    num_workers: Workers = 0
    """DataLoader worker processes."""
    checkpoint_every: NonNegativeInt = 500
    """Write a checkpoint every N optimizer steps (and at the end; 0 = only at the end)."""
    keep_checkpoints: NonNegativeInt = 1
    """How many step checkpoints to keep besides last.pt."""
    log_every: PositiveInt = 10
    """Log metrics every N optimizer steps."""
    max_bad_fraction: Fraction = 0.01
    """Fail when more than this fraction of images could not be read."""
    compile: bool = False
    """torch.compile the student."""
    compile_teacher: bool = False
    """torch.compile the frozen teacher's forward for inference (static shapes: dynamic=False, default mode)."""
    resize_teacher_grid: bool = False
    """Resample the teacher's patch tokens bilinearly onto the student's grid when their patch grids differ."""
    find_unused_parameters: bool = False
    """DDP: the graph may change from step to step (a plugin's optional branch); off, DDP treats it as static, as
    every built-in recipe's is (with accum_steps > 1 DDP searches for unused parameters either way)."""


@dataclasses.dataclass
class EvalConfig:
    before: bool = True
    """Evaluate the (untrained) student before training: summary keys student_<metric>_before."""
    after: bool = True
    """Evaluate the student after training: summary keys student_<metric>_after."""
    teacher: bool = True
    """Evaluate the teacher too: summary keys teacher_<metric>."""
    every_epochs: NonNegativeInt = 0
    """Also evaluate the student every N epochs (0 = never)."""
    batch_size: PositiveInt = 256
    """Feature-extraction batch size."""
    features: Literal["cls", "mean_patch"] = "cls"
    """What represents an image, for student and teacher alike: the CLS token after the final norm, or the mean of
    the patch tokens (for students distilled on patch maps only, such as FD's)."""
    data: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Labelled data source for evaluation (its train split is the kNN bank / probe train set, val the test set)."""
    evaluators: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Evaluators by label, each a table with `plugin` (knn, linear_probe, linear_dinov2, ...)."""


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
    retrieve: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Retrieval of a transfer set from a gallery (kdforge retrieve; a stage that sets it is a retrieval stage):
    kdforge.retrieval.pipeline.RetrieveConfig."""
    profiles: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Named overlays applied with --profile NAME."""
    stages: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """A multi-stage recipe's stages, run in order, each `name` plus the tables it sets over the recipe's own
    (kdforge.recipe.stages); empty: the recipe is one stage."""
