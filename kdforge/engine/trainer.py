"""The training loop of distillation and supervised stages alike. Reads top-down: ``fit`` -> ``train_step`` ->
``forward_backward``.

One teacher forward per batch is shared by every loss, and teacher and student see the same augmented view (the
student's copy may have masked patches; Mixup / CutMix, when set, mix the batch before either forward). A recipe
whose losses read no teacher (supervised stages: fine-tuning) has none, and no teacher forward runs. Checkpoints
are atomic and a resumed run continues exactly: model, optimizer, schedule, grad scaler, RNG state and data
position are restored, and augmentation, mixing and masks are seeded per (epoch, item) and per step, so they do
not depend on how the run was split.

Nothing is written before the run is known to start: building the Trainer checks the run directory, reads and
compares the checkpoint to resume from, builds the data (training and evaluation), the models and the losses, and
runs one forward pass; ``fit`` then locks the directory and writes. SIGTERM (inside
:func:`kdforge.engine.signals.stop_on_sigterm`, which ``fit`` enters) stops at the next safe point with a
checkpoint, or, before there is any training state, leaves the directory as it was found.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import random
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kdforge.data import collate
from kdforge.engine import checkpoint as ckpt
from kdforge.engine import runs, signals
from kdforge.engine.distributed import DistInfo, all_reduce_flag, barrier, init_distributed
from kdforge.engine.optim import param_groups
from kdforge.engine.prefetch import DevicePrefetcher, to_device
from kdforge.engine.signals import Preempted
from kdforge.errors import CheckpointError, DataError, KdforgeError, RecipeError, ShapeError, TrainingDiverged
from kdforge.eval import Encoder, build_eval_sets, evaluate_encoders
from kdforge.masking import draw_on_host
from kdforge.plugins import get_registry
from kdforge.recipe import LOSS_TABLE_KEYS, STUDENT_TABLE_KEYS, Recipe, dump_toml, plugin_table, to_dict

__all__ = ["DistillModule", "EpochSampler", "Objective", "Preempted", "SeededItems", "Trainer", "build_objective",
           "cosine_lr"]


class DistillModule(nn.Module):
    """Student plus loss modules (projection heads): everything that is trained, as one module for DDP.

    ``forward`` runs the student once per view that some loss reads (:attr:`kdforge.losses.DistillLoss.view`) and
    returns the weighted sum of the losses with each term."""

    def __init__(self, student: nn.Module, losses: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.student = student
        self.losses = nn.ModuleDict(losses)
        self.weights = weights
        self.views = {loss.view for loss in losses.values()}

    def student_views(self, images: torch.Tensor, mask: torch.Tensor | None,
                      unmixed: torch.Tensor | None = None) -> dict[str, Any]:
        """{view: StudentOutput} for "clean" (the image the teacher sees), "masked" (``mask`` applied) and "unmixed"
        (``unmixed``: the image before Mixup / CutMix). The views that some loss reads and that differ go through
        one batched forward, in the order clean, masked, unmixed: with Proteus' losses [images; images] with masks
        [none; mask] (the released code's [x, x] with [mask, None]). Without a mask the masked view is the clean
        one, without mixing the unmixed view is."""
        wanted: list[tuple[str, torch.Tensor, torch.Tensor | None]] = []
        if "clean" in self.views or ("masked" in self.views and mask is None) or \
                ("unmixed" in self.views and unmixed is None):
            wanted.append(("clean", images, None))
        if "masked" in self.views and mask is not None:
            wanted.append(("masked", images, mask))
        if "unmixed" in self.views and unmixed is not None:
            wanted.append(("unmixed", unmixed, None))
        if len(wanted) == 1:
            _, x, m = wanted[0]
            outputs = {wanted[0][0]: self.student(x, mask=m) if m is not None else self.student(x)}
        else:
            masks = None
            if mask is not None and any(m is not None for _, _, m in wanted):
                masks = torch.cat([m if m is not None else torch.zeros_like(mask) for _, _, m in wanted])
            x = torch.cat([x for _, x, _ in wanted])
            both = self.student(x, mask=masks) if masks is not None else self.student(x)
            b = images.shape[0]
            outputs = {view: _rows(both, slice(i * b, (i + 1) * b)) for i, (view, _, _) in enumerate(wanted)}
        if "clean" in outputs:
            for view in ("masked", "unmixed"):
                outputs.setdefault(view, outputs["clean"])
        return outputs

    def forward(self, images, mask, teacher_out, batch, unmixed=None):
        outputs = self.student_views(images, mask, unmixed)
        n = next(iter(outputs.values())).patches.shape[1]
        batch = dict(batch, mask=mask if mask is not None else
                     torch.zeros(images.shape[0], n, dtype=torch.bool, device=images.device))
        total = images.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        for label, loss_fn in self.losses.items():
            value, _ = loss_fn(outputs[loss_fn.view], teacher_out, batch)
            terms[label] = value.detach()
            total = total + self.weights[label] * value.float()
        return total, terms


def _rows(out, rows: slice):
    """The StudentOutput of the images ``rows`` of a batched forward."""
    return dataclasses.replace(out, cls=out.cls[rows], patches=out.patches[rows],
                               logits=None if getattr(out, "logits", None) is None else out.logits[rows])


@dataclasses.dataclass
class Objective:
    """What a recipe trains against: the frozen teacher, the student with the losses (:class:`DistillModule`), the
    masker, and how the teacher's output and the precision are prepared. Built by :func:`build_objective`, shared
    by the :class:`Trainer` and the diagnostics that evaluate a run's loss (:mod:`kdforge.diagnostics.landscape`)."""

    teacher: nn.Module | None
    model: DistillModule
    masker: nn.Module | None
    grid: tuple[int, int]
    """The student's patch grid at ``augment.image_size``."""
    teacher_grid: tuple[int, int]
    autocast_dtype: torch.dtype | None
    """bf16 or fp16 from ``train.precision``; None: float32."""
    device: torch.device
    reads_teacher: bool = True
    """False when no loss reads the teacher (a supervised stage): no teacher forward then."""
    teacher_encode: Callable[[torch.Tensor], Any] | None = None
    """``train.compile_teacher``: the teacher's encode under torch.compile, used by :meth:`teacher_forward` (the
    evaluation keeps the eager teacher: its batch sizes vary); None: eager."""

    def teacher_forward(self, images: torch.Tensor, *, eager: bool = False):
        """The teacher's output for ``images`` (frozen: eval mode, inference mode and autocast live in the teacher),
        its patches resized to the student's grid where ``train.resize_teacher_grid`` asks for it; None when no
        loss reads the teacher. ``eager``: skip ``train.compile_teacher`` (a one-off batch of another size, whose
        compilation the training batches could not reuse)."""
        if not self.reads_teacher:
            return None
        teacher_out = self.teacher(images) if self.teacher_encode is None or eager else \
            self.teacher(images, encode=self.teacher_encode)
        if self.teacher_grid != tuple(self.grid):  # train.resize_teacher_grid (checked when built): once per batch
            from kdforge.students import resize_patches

            teacher_out = dataclasses.replace(
                teacher_out, patches=resize_patches(teacher_out.patches, self.teacher_grid, self.grid), grid=self.grid)
        return teacher_out

    def autocast(self):
        """The recipe's training precision as an autocast context (a no-op for fp32)."""
        return torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                              enabled=self.autocast_dtype is not None)


def build_objective(recipe: Recipe, device: torch.device, *, num_classes: int | None = None) -> Objective:
    """Teacher, student, masker and losses of ``recipe`` on ``device``, the student initialised from
    ``run.seed`` (as every run of the recipe starts; ``[student] init_from`` is the trainer's business); raises
    :class:`RecipeError` / :class:`ShapeError` when they do not fit together (a masked-view loss without a masker,
    patch grids that differ). A recipe without ``[teacher]`` (a supervised stage: no loss reads one) has teacher
    None. ``num_classes``: the training data's classes, for the losses that need labels."""
    r = recipe
    registry = get_registry()
    teacher = None
    if r.teacher:
        torch.manual_seed(r.run.seed)  # a randomly initialised teacher (tests, ablations) must be reproducible
        teacher = registry.create("teachers", r.teacher, "teacher").to(device)
    torch.manual_seed(r.run.seed)  # the student's init must not depend on whether the teacher came from a cache
    student = registry.create("students", plugin_table(r.student, STUDENT_TABLE_KEYS), "student").to(device)
    masker = registry.create("maskers", r.masker, "masker") if r.masker else None

    losses, weights = {}, {}
    for label, table in r.losses.items():
        table = plugin_table(table, LOSS_TABLE_KEYS)
        weights[label] = float(r.losses[label].get("weight", 1.0))
        cls = registry.get("losses", table["plugin"], f"losses.{label}")
        losses[label] = registry.create(
            "losses", table, f"losses.{label}",
            student_dim=student.embed_dim, teacher_dim=teacher.embed_dim if teacher is not None else None,
            **({"num_classes": num_classes} if cls.needs_labels else {}),
        )
    for label, loss in losses.items():
        loss.bind(losses, f"losses.{label}")
    masked = [k for k, l in losses.items() if l.view == "masked"]
    if masked and masker is None:
        raise RecipeError(f"losses.{masked[0]} ({r.losses[masked[0]]['plugin']}) trains on the masked view but the "
                          "recipe has no [masker] table: add [masker] plugin = \"random\" (or \"block\")")
    size = (r.augment.image_size, r.augment.image_size)
    if any(l.needs_patches for l in losses.values()):
        from kdforge.students import check_grids

        check_grids(teacher, student, size, resize=r.train.resize_teacher_grid)
    grid = student.grid(size)
    return Objective(
        teacher=teacher, model=DistillModule(student, losses, weights).to(device), masker=masker,
        grid=grid, teacher_grid=tuple(teacher.grid(size)) if teacher is not None else tuple(grid),
        autocast_dtype={"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.train.precision), device=device,
        reads_teacher=any(l.reads_teacher for l in losses.values()),
        teacher_encode=compiled_teacher_encode(teacher) if r.train.compile_teacher and teacher is not None else None,
    )


def compiled_teacher_encode(teacher: nn.Module) -> Callable[[torch.Tensor], Any]:
    """``teacher.encode`` under torch.compile for inference (``train.compile_teacher``): static shapes (a training
    batch keeps its size), the default mode. Only encode is compiled, not the module: it runs inside the teacher's
    inference mode and autocast (:meth:`kdforge.teachers.Teacher.run_frozen`), which inductor cannot trace around
    parameters (it fails setting an inference tensor's version counter)."""
    from kdforge.teachers import Teacher

    if not isinstance(teacher, Teacher):
        raise RecipeError(f"train.compile_teacher compiles a kdforge Teacher's encode, but the teacher is a "
                          f"{type(teacher).__name__}: derive it from kdforge.teachers.Teacher or set "
                          "train.compile_teacher = false")
    return torch.compile(teacher.encode, dynamic=False)


def check_eval_classes(recipe: Recipe, classes: int | None) -> None:
    """RecipeError unless the test set that the recipe's "classifier" evaluators score (``eval.data``'s val split)
    is labelled, with ``classes`` classes (those of the classifier; None: not known yet)."""
    registry = get_registry()
    scoring = [label for label, table in recipe.eval.evaluators.items()
               if registry.get("evaluators", table.get("plugin"), f"eval.evaluators.{label}").reads == "logits"]
    if not scoring:
        return
    found = registry.create("data_sources", recipe.eval.data, "eval.data").num_classes
    where = f"eval.evaluators.{scoring[0]} scores the classifier on [eval.data]'s val split"
    if not found:
        raise RecipeError(f"{where}, but [eval.data] ({recipe.eval.data.get('plugin')}) has no labels: point it at "
                          "the task's labelled data (class folders; its val split is the test set)")
    if classes and classes != found:
        raise RecipeError(f"{where}, which has {found} classes, but the classifier has {classes}: the student's "
                          "num_classes (or the loss's) must be the task's, and [eval.data] the task's test data")


def student_classes(student: nn.Module) -> int:
    """The number of classes of the student's own classifier (``num_classes`` of its config; 0: none)."""
    return int(getattr(student, "num_classes", 0) or getattr(getattr(student, "cfg", None), "num_classes", 0) or 0)


class _StudentClassifier:
    """What the "classifier" evaluators score when no loss owns a classifier head: the student's own logits."""

    @staticmethod
    def predict(student_out) -> torch.Tensor:
        if getattr(student_out, "logits", None) is None:
            raise ShapeError("the student has num_classes set but gave no logits")
        return student_out.logits


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, sharded over ranks, yielding (epoch, index, copy) so items can seed themselves.

    ``repeats`` > 1 is repeated augmentation (DeiT's RASampler, timm's RepeatAugSampler, which the released Proteus
    code trains with: 3): each index of the permutation appears ``repeats`` times in a row (copies 0, 1, ...), so
    consecutive ranks get the same image under different augmentations, and an epoch keeps its length (n // world
    items per rank), covering about n / repeats distinct images. timm also rounds the per-rank count down to a
    multiple of 256 / world; here it is n // world, as without repeats. ``start`` skips the first ``start`` samples
    of this rank's shard (resuming mid-epoch).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1, repeats: int = 1):
        self.n, self.seed, self.rank, self.world, self.repeats = n, seed, rank, world, repeats
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.world - self.start

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        keep = (self.n // self.world) * self.world
        order = torch.randperm(self.n, generator=g).repeat_interleave(self.repeats)[:keep]
        copy = torch.arange(self.repeats).repeat(self.n)[:keep]
        shard = list(zip(order[self.rank :: self.world].tolist(), copy[self.rank :: self.world].tolist()))
        return iter([(self.epoch, i, c) for i, c in shard[self.start :]])


class SeededItems(torch.utils.data.Dataset):
    """Runs each item's transform under its own seed (from run seed, epoch, index and repeated-augmentation copy):
    exact resumes with any number of workers. torch's, Python's and numpy's global generators are all seeded (timm's
    RandAugment and random erasing draw from the latter two) and restored afterwards."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index, copy = key if len(key) == 3 else (*key, 0)
        seed = (self.seed * 1_000_003 + epoch * 10_007 + index + copy * 1_000_000_007) % (2**63)
        # Only the CPU generator: torch.manual_seed also seeds every accelerator's (0.3 ms an item, a tenth of the
        # lean data path's time), and transforms draw on the CPU. The CPU stream is the same either way.
        if torch.utils.data.get_worker_info() is not None:
            # A worker's generators serve its items only and each item seeds them: nothing to put back (saving
            # numpy's state alone costs 0.2 ms).
            _seed_generators(seed)
            return self.dataset[index]
        py_state, np_state = random.getstate(), np.random.get_state()
        try:
            with torch.random.fork_rng(devices=[]):
                _seed_generators(seed)
                return self.dataset[index]
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def _seed_generators(seed: int) -> None:
    """Seed torch's CPU generator, Python's and numpy's global ones (what item transforms draw from)."""
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % (2**32))


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then half a cosine down to ``floor`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


class Trainer:
    """Builds everything a recipe describes, then ``fit()`` trains, evaluates and writes summary.json."""

    def __init__(self, recipe: Recipe, run_dir: str | Path, *, resume: str | None = None, show_progress: bool = True,
                 allow_changes: bool = False, single_process: bool = False,
                 step_hook: Callable[[int], None] | None = None):
        """``resume``: a checkpoint path, or "auto" for <run_dir>/last.pt. ``allow_changes``: a resume may change
        the schedule (optim.*, train.epochs ...; never the models or the data), see
        :func:`kdforge.engine.runs.check_resume`. ``single_process``: train in this process alone even under
        torchrun (a model one rank trains for all, such as the embedded teacher). ``step_hook(step)`` runs after
        every optimizer step (it may raise :class:`Preempted` to stop at that safe point)."""
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.show_progress = show_progress
        r = recipe
        if r.run.threads:
            torch.set_num_threads(r.run.threads)
        if single_process:
            from kdforge.engine.distributed import pick_device

            self.dist = DistInfo(device=pick_device(r.run.device))
        else:
            self.dist = init_distributed(r.run.device)
        self.step_hook = step_hook
        self.device = self.dist.device
        registry = get_registry()

        # The checkpoint and the directory first: both are quick to check and must fail before anything is built.
        self.resume_path = (self.run_dir / "last.pt" if resume in ("auto", "") else Path(resume)) if resume else None
        self._resume_state: dict[str, Any] | None = None
        self.resume_changes: list[str] = []
        if self.resume_path is not None:
            self._resume_state = ckpt.load_run(self.resume_path)
            self.resume_changes = runs.check_resume(self._resume_state, r, path=self.resume_path,
                                                    world_size=self.dist.world_size, allow_changes=allow_changes)
        if self.dist.is_main:
            runs.check_run_dir(self.run_dir, fresh=self.resume_path is None)

        # Data first: a missing data root is the most common mistake and must fail before any model is built.
        from kdforge.data.transforms import BatchMix, build_transform

        self.source = registry.create("data_sources", r.data, "data")
        self.dataset = self.source.build("train", build_transform(r.augment, train=True))
        # Streaming sources (webdataset shards) shard over ranks themselves and report their per-rank length.
        self.streaming = isinstance(self.dataset, torch.utils.data.IterableDataset)
        try:
            per_rank = len(self.dataset) if self.streaming else len(self.dataset) // self.dist.world_size
        except TypeError as exc:
            raise KdforgeError(f"[data] {exc}") from None
        if per_rank < r.train.batch_size:
            raise KdforgeError(
                f"the training set has {per_rank} images per process, fewer than one batch "
                f"(train.batch_size = {r.train.batch_size}): lower train.batch_size or add data"
            )

        self.objective = build_objective(r, self.device, num_classes=self.source.num_classes)
        self.teacher, self.model, self.masker = self.objective.teacher, self.objective.model, self.objective.masker
        self.student, self.grid = self.model.student, self.objective.grid
        self.init_from = runs.init_source(r.student.get("init_from", ""))
        if self.init_from is not None and self._resume_state is None:  # a resume has the student's weights already
            runs.init_student(self.student, self.init_from)

        # Labelled data: what supervised losses and batch mixing need (None: the source does not know its classes).
        self.num_classes = self.source.num_classes
        losses = dict(self.model.losses.items())
        self.reads_teacher = self.objective.reads_teacher
        self.needs_labels = any(l.needs_labels for l in losses.values())
        # Unlabelled items (label -1) are allowed when every loss that reads labels ignores them (a transfer set of
        # labelled and unlabelled images); mixed targets are made only when a loss reads them: a loss on the
        # unmixed view reads the labels themselves (papers/002: mixing reaches only the distillation term).
        self.labels_required = any(l.needs_labels and not getattr(l, "ignores_unlabelled", False)
                                   for l in losses.values())
        self.mix_targets = any(l.needs_labels and getattr(l, "view", "clean") != "unmixed" for l in losses.values())
        self.keep_unmixed = any(getattr(l, "view", "clean") == "unmixed" for l in losses.values())
        self.mix = None
        if BatchMix.enabled(r.augment) and not self.mix_targets:
            self.mix = BatchMix(r.augment, self.num_classes or 1)  # the targets are not read
        elif BatchMix.enabled(r.augment):
            if not self.num_classes:
                raise RecipeError(f"augment.mixup / augment.cutmix mix the labels too, but the training data "
                                  f"([data] {r.data.get('plugin')}) does not say how many classes it has: use a "
                                  "labelled source (image_folder, procedural, digits) or set both to 0")
            self.mix = BatchMix(r.augment, self.num_classes)
        from kdforge.data.device_augment import DeviceAugment

        self.device_augment = DeviceAugment(r.augment) if r.augment.device_augment else None
        self.classifier = self._classifier(losses)

        self.batches_per_epoch = per_rank // r.train.batch_size
        if self.batches_per_epoch < r.train.accum_steps:
            raise RecipeError(
                f"train.accum_steps = {r.train.accum_steps} micro-batches per step, but an epoch has only "
                f"{self.batches_per_epoch} batches of {r.train.batch_size} per process: no step would ever be taken; "
                "lower train.accum_steps or train.batch_size, or add data"
            )
        self.steps_per_epoch = self.batches_per_epoch // r.train.accum_steps
        self.total_steps = self.steps_per_epoch * r.train.epochs
        self.global_batch = r.train.batch_size * r.train.accum_steps * self.dist.world_size
        self.peak_lr = r.optim.lr * self.global_batch / r.optim.lr_scale_batch
        self.warmup_steps = int(round(r.optim.warmup_epochs * self.steps_per_epoch))

        self.optimizer = torch.optim.AdamW(
            param_groups(self.model, r.optim.weight_decay, r.optim.decay_also, r.optim.layer_decay), lr=self.peak_lr,
            betas=tuple(r.optim.betas),
            fused=self.device.type == "cuda",
        )
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=r.train.precision == "fp16")
        self.ddp_model: nn.Module = self.model
        if self.dist.enabled:
            # The graph is the same at every step (the masked view always gets a mask, all False when no image is
            # masked; a loss with nothing to do returns a zero that keeps its head in the graph), so DDP is told
            # it is static: no search for unused parameters at each backward, and parameters that never take part
            # (a mask token without a masker) are found once. Its reducer does not take no_sync()'s backward
            # passes, so with gradient accumulation the graph stays dynamic and unused parameters are searched
            # for, as they are with train.find_unused_parameters (plugins whose graph changes from step to step).
            # Gradients are the all-reduce buckets themselves (no copy); no buffer changes in training, so buffers
            # are not broadcast at every forward.
            static = not r.train.find_unused_parameters and r.train.accum_steps == 1
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=not static, static_graph=static, gradient_as_bucket_view=True,
                broadcast_buffers=False,
            )
        self.forward_model = torch.compile(self.ddp_model) if r.train.compile else self.ddp_model

        self.sampler = EpochSampler(len(self.dataset), r.run.seed, self.dist.rank, self.dist.world_size,
                                    r.train.repeated_aug)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.results: dict[str, Any] = {}
        self.last_metrics: dict[str, float] = {}
        self.checkpoint_step = 0  # the step of the last checkpoint written (or resumed from); 0: none yet
        # [step, loss, terms...] of the first optimizer step whose loss was not finite (step 0: none), kept on the
        # device and read on log steps and before checkpoints: checking every step would stop the CPU each step.
        self._diverged: torch.Tensor | None = None
        self._train_loader: torch.utils.data.DataLoader | None = None  # one, with persistent workers, for all epochs
        self._loggers: list = []
        from kdforge.data.skips import SkipCounter

        self._skips = SkipCounter(max_bad_fraction=r.train.max_bad_fraction)
        # The evaluation data is built once, now: a wrong eval.data path must fail before the run writes anything.
        self.eval_sets = build_eval_sets(r.eval, r.augment) if r.eval.evaluators else None
        self._check_eval_classes()
        if self._resume_state is not None:
            self._load_training_state(self._resume_state)
        self._first_forward(self._first_batch())

    # ----------------------------------------------------------------------------------------------- set-up
    def _classifier(self, losses: dict[str, nn.Module]) -> nn.Module | None:
        """The loss whose classifier head (``predict``) the "classifier" evaluators score; None without one.
        A recipe with such an evaluator needs exactly one such loss."""
        found = [label for label, loss in losses.items() if callable(getattr(loss, "predict", None))]
        registry = get_registry()
        scoring = [label for label, table in self.recipe.eval.evaluators.items()
                   if registry.get("evaluators", table.get("plugin"), f"eval.evaluators.{label}").reads == "logits"]
        if not found and student_classes(self.student):
            return _StudentClassifier()  # the student's own classifier (a task-specific student)
        if scoring and len(found) != 1:
            raise RecipeError(
                f"eval.evaluators.{scoring[0]} scores the classifier head of the recipe's supervised loss, but the "
                f"recipe has {len(found)} losses with one ({', '.join(found) or 'none'}): add one [losses.<label>] "
                "plugin = \"supervised.ce\" (exactly one), give the student its own classifier "
                "(student.num_classes), or remove the evaluator")
        return losses[found[0]] if len(found) == 1 else None

    def _check_eval_classes(self) -> None:
        """RecipeError unless the test set of the "classifier" evaluators is labelled with the classifier's classes
        (found now, not after training)."""
        if self.classifier is None:
            return
        own = student_classes(self.student) if isinstance(self.classifier, _StudentClassifier) else \
            getattr(self.classifier, "num_classes", None)
        check_eval_classes(self.recipe, own)

    def _first_batch(self, count: int = 2) -> dict[str, torch.Tensor]:
        """``count`` images and labels of the training data's first batch, read with the RNG states put back and
        nothing counted: data of which not one image can be read fails here, listing the files, and data without
        labels for a loss that reads them, before anything is written (a few bad files are the SkipCounter's
        business during training)."""
        n = self.recipe.train.batch_size
        with torch.random.fork_rng(devices=[]):
            if self.streaming:
                items = list(itertools.islice(iter(self.dataset), n))
            else:
                items = [self.dataset[i] for i in range(min(n, len(self.dataset)))]
        batch = collate(items)
        if len(batch["image"]) == 0:
            listing = "\n".join(f"  {path}: {reason}" for path, reason in batch["skipped"][:20])
            raise DataError(f"none of the first {len(items)} training images could be read:\n{listing}\nCheck that "
                            "[data] points at the data set you meant (root, urls) and that its files are images.")
        self._check_labels(batch["label"])
        return {"image": batch["image"][:count], "label": batch["label"][:count]}

    def _check_labels(self, labels: torch.Tensor) -> None:
        """DataError unless every label (LongTensor[B], on the CPU) that a loss or the mixing reads is a class of the
        training data; label -1 (unlabelled) passes where every label-reading loss ignores it."""
        if not (self.needs_labels or (self.mix is not None and self.mix_targets)):
            return
        bad = labels < 0 if self.labels_required or (self.mix is not None and self.mix_targets) \
            else torch.zeros_like(labels, dtype=torch.bool)
        if self.num_classes:
            bad |= labels >= self.num_classes
        if bool(bad.any()):
            which = "unlabelled (label -1)" if bool((labels[bad] < 0).all()) else "labelled outside the classes"
            raise DataError(
                f"{int(bad.sum())} of {len(labels)} training images are {which}, but the recipe's "
                f"{'losses read labels' if self.needs_labels else 'augment.mixup / cutmix mix labels'}: supervised "
                f"training needs a labelled data source with {self.num_classes or 'its'} classes (image_folder "
                "with class folders, procedural, digits)")

    def _first_forward(self, first: dict[str, torch.Tensor]) -> None:
        """Teacher, student and losses once on a few training images (``first``: image and label, mixed when the
        recipe mixes), in eval mode, without gradients and with the RNG states put back: models, heads and losses
        that do not fit together fail here with a :class:`ShapeError`, before the run directory is touched, not at
        the first training step."""
        devices = [self.device] if self.device.type == "cuda" else []
        was_training = self.model.training
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            self.model.eval()
            try:
                images = first["image"].to(self.device)
                if self.device_augment is not None:
                    images = self.device_augment(images, seed=0)
                b = images.shape[0]
                mask = None
                if self.masker is not None:
                    mask = self.masker(b, self.grid, torch.Generator().manual_seed(0))
                    mask[0, : max(1, mask.shape[1] // 2)] = True  # the masked path runs whatever the masker drew
                    mask = mask.to(self.device)
                batch = {"image": images, "label": first["label"], "index": torch.arange(b), "skipped": []}
                unmixed = None
                if self.mix is not None:
                    unmixed = images.clone() if self.keep_unmixed else None
                    images, target = self.mix(images, self._mix_labels(first["label"]), seed=0)
                    if self.mix_targets:
                        batch["target"] = target
                with self._autocast():
                    self.model(images, mask, self.objective.teacher_forward(images, eager=True), batch, unmixed)
            except KdforgeError:
                raise
            except (RuntimeError, ValueError, IndexError, AssertionError, TypeError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else ""
                raise ShapeError(
                    f"the first forward pass failed before training started ({type(exc).__name__}: {first}): check "
                    "that [teacher], [student], [masker] and the losses fit together (widths, patch sizes, "
                    "augment.image_size)"
                ) from exc
            finally:
                self.model.train(was_training)

    def _mix_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """The labels BatchMix mixes into targets: unlabelled items (-1) as class 0 when no loss reads the targets."""
        return labels if self.mix_targets else labels.clamp(min=0)

    def _autocast(self):
        return self.objective.autocast()

    def _loader(self) -> Iterator[dict]:
        """This epoch's batches from the current position (``self.epoch``, ``self.batch_in_epoch``)."""
        r = self.recipe.train
        # Its own generator: creating a DataLoader iterator otherwise draws from the global RNG, and a resumed run
        # creates one at a different moment than an uninterrupted one.
        common = dict(batch_size=r.batch_size, num_workers=r.num_workers, collate_fn=collate, drop_last=True,
                      pin_memory=self.device.type == "cuda",
                      generator=torch.Generator().manual_seed(self.recipe.run.seed * 7919 + self.epoch))
        if self.streaming:
            # Shards cannot seek: a resumed epoch re-reads and drops the batches already trained on. A new loader
            # per epoch: the workers' copies of the shards must see set_epoch.
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            loader = signals.DataLoader(self.dataset, **common)
            return itertools.islice(loader, self.batch_in_epoch, self.batches_per_epoch)
        # One loader for the whole run, its workers kept between epochs (starting them again costs seconds per
        # epoch at ImageNet scale); the sampler, read in this process, is moved before each epoch's iterator. Items
        # seed themselves (SeededItems), so the workers' own seeds play no part.
        self.sampler.set_position(self.epoch, self.batch_in_epoch * r.batch_size)
        if self._train_loader is None:
            self._train_loader = signals.DataLoader(SeededItems(self.dataset, self.recipe.run.seed),
                                                    sampler=self.sampler, persistent_workers=r.num_workers > 0,
                                                    **common)
        return iter(self._train_loader)

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Lock the run directory, train (resuming if asked), evaluate, write curves.png and summary.json; returns
        the summary. SIGTERM stops at the next safe point and raises :class:`Preempted` after writing a checkpoint
        (or, with no training state yet, after removing what this attempt wrote)."""
        r = self.recipe
        lock = runs.RunLock(self.run_dir) if self.dist.is_main else None
        with signals.stop_on_sigterm():
            if lock is not None:
                lock.acquire()
                ckpt.remove_stale_temporaries(self.run_dir)  # a writer killed mid-checkpoint leaves one
                with ckpt.atomic_path(self.run_dir / "recipe.toml") as tmp:
                    tmp.write_text(dump_toml(r))
            barrier(self.dist)
            t_start = time.time()
            try:
                if self._resume_state is not None:
                    ckpt.set_rng_state(self._resume_state["rng"])  # last: building the run drew from the RNGs
                    self._resume_state = None
                if self.dist.is_main:
                    registry = get_registry()
                    self._loggers = [registry.create("loggers", {"plugin": n}, f"loggers.{n}", run_dir=self.run_dir)
                                     for n in ("jsonl", "tensorboard")]
                for change in self.resume_changes:
                    warnings.warn(f"resumed with a changed recipe (--allow-changes): {change}", stacklevel=2)
                try:
                    if self.resume_path is None:
                        self._evaluate("before")
                    self._train_loop()
                    if self.step > 0 and self.checkpoint_step != self.step:  # not twice for the last step
                        self.save()
                    self._evaluate("after")
                    self._write_curves()
                    self._write_confusion()
                except Preempted as exc:
                    self._on_preempted(exc)
            finally:
                for lg in self._loggers:
                    lg.close()
                self._loggers = []
                if lock is not None:
                    lock.release()
        return self._summary(time.time() - t_start)

    def _on_preempted(self, exc: Preempted) -> None:
        """Checkpoint the training state (if any), then re-raise saying where it went."""
        if self.step > 0:
            self.save()
            self._write_curves()
            raise Preempted(f"{exc}: checkpoint of step {self.step} written to {self.run_dir / 'last.pt'}") from None
        if self.dist.is_main:
            self._remove_attempt()
        raise Preempted(f"{exc}, before the first training step: nothing to resume, the run directory was left as "
                        "it was found; run the same command again") from None

    def _remove_attempt(self) -> None:
        """Remove what a fresh run wrote before its first step (only a fresh run gets here: a resumed one has
        steps), so that the same command can start again."""
        import shutil

        for lg in self._loggers:
            lg.close()
        self._loggers = []
        for name in (*runs.RUN_FILES, runs.LOCK_FILE):
            path = self.run_dir / name
            if path.is_dir():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.run_dir.rmdir()  # only if empty: never remove what the user put there

    def _write_confusion(self) -> None:
        """<run_dir>/confusion.png from the final "classifier" evaluation's confusion matrix (rank 0; a failure to
        plot warns and never ends the run)."""
        matrix = self.results.get("student_classifier_confusion_after")
        if not self.dist.is_main or matrix is None:
            return
        try:
            from kdforge.diagnostics.confusion import plot_confusion

            plot_confusion(matrix, self.run_dir / "confusion.png",
                           title=f"{self.recipe.run.name}: student, {self.recipe.eval.data.get('plugin')} test split")
        except Exception as exc:  # a view of the result, not part of it
            warnings.warn(f"confusion matrix not written to {self.run_dir / 'confusion.png'}: "
                          f"{type(exc).__name__}: {exc}", stacklevel=2)

    def _write_curves(self) -> None:
        """<run_dir>/curves.png from metrics.jsonl, on rank 0. A failure to plot warns and never ends the run."""
        if not self.dist.is_main:
            return
        try:
            from kdforge.diagnostics.curves import plot_curves

            plot_curves(self.run_dir)
        except Exception as exc:  # the curves are a view of the run, not part of its result
            warnings.warn(f"training curves not written to {self.run_dir / 'curves.png'}: "
                          f"{type(exc).__name__}: {exc}", stacklevel=2)

    def _train_loop(self) -> None:
        r = self.recipe
        last_step = min(self.total_steps, r.train.max_steps) if r.train.max_steps else self.total_steps
        bar = tqdm(total=last_step, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (self.show_progress and self.dist.is_main))
        window_t, window_imgs = time.perf_counter(), 0
        try:
            while self.step < last_step:
                micro: list[dict] = []
                seen = readable = 0
                for host, batch in DevicePrefetcher(self._loader(), self.device):
                    # Host-side checks on the CPU batch, once it is taken (the prefetcher reads one ahead).
                    self._skips.add_batch(host)  # raises DataError once too many images were unreadable
                    if len(host["image"]):
                        self._check_labels(host["label"])
                    batch["checked"] = True
                    seen += 1
                    readable += len(host["image"]) > 0
                    self.batch_in_epoch += 1
                    epoch_done = self.batch_in_epoch >= self.batches_per_epoch
                    # A batch whose every image was unreadable is counted above and trains nothing; under DDP every
                    # process must still take part in the step (forward_backward stands in a zero-weight image).
                    if len(batch["image"]) or self.dist.enabled:
                        micro.append(batch)
                    if len(micro) < r.train.accum_steps:
                        if epoch_done:  # a partial accumulation group at the end of an epoch is dropped
                            self._end_epoch(last_step)
                        continue
                    metrics = self.train_step(micro)
                    window_imgs += sum(b["image"].shape[0] for b in micro) * self.dist.world_size
                    micro = []
                    bar.update(1)
                    log_step = self.step % r.train.log_every == 0 or self.step == last_step
                    if epoch_done:  # before the checkpoint, so that a resume starts the next epoch
                        self._check_diverged()
                        self._end_epoch(last_step)
                    if log_step:  # the step's values reach the host here only (one synchronisation)
                        metrics = self._host_metrics(metrics)
                        self.last_metrics = metrics
                        dt = time.perf_counter() - window_t
                        metrics["img_per_s"] = window_imgs / dt if dt > 0 else 0.0
                        metrics["epoch"] = self.epoch + self.batch_in_epoch / max(1, self.batches_per_epoch)
                        self._log(metrics)
                        bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}")
                        window_t, window_imgs = time.perf_counter(), 0
                    if r.train.checkpoint_every and self.step % r.train.checkpoint_every == 0:
                        self.save()
                    if self.step_hook is not None:
                        self.step_hook(self.step)
                    # Alone, the flag is this process's; under DDP it is agreed on (a collective) on log steps only.
                    if (log_step or not self.dist.enabled) and all_reduce_flag(signals.requested(), self.dist):
                        raise Preempted(f"SIGTERM at step {self.step}")
                    if self.step >= last_step or epoch_done:
                        break
                if not seen:
                    raise DataError(f"epoch {self.epoch} yielded no batch at all (expected {self.batches_per_epoch}): "
                                    "for sharded data, check that data.length matches the shards")
                if not readable:  # a pass without one readable image would repeat forever
                    self._skips.check()
                    raise DataError(f"epoch {self.epoch} gave no batch with a readable image; the unreadable files:\n"
                                    f"{self._skips.summary()}")
        finally:
            bar.close()
        self._skips.check()

    def _end_epoch(self, last_step: int) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        every = self.recipe.eval.every_epochs
        if every and self.epoch % every == 0 and self.step < last_step:
            self._evaluate(f"epoch{self.epoch}")

    def train_step(self, micro_batches: list[dict]) -> dict[str, torch.Tensor | float]:
        """One optimizer step over ``accum_steps`` micro-batches; returns the step's metrics, as 0-d tensors on the
        device (``lr``: a float): nothing here waits for the device (:meth:`_host_metrics` reads them on log
        steps)."""
        r = self.recipe
        lr = cosine_lr(self.step, self.total_steps, self.warmup_steps, self.peak_lr, r.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)  # optim.layer_decay
        self.optimizer.zero_grad(set_to_none=True)
        total_loss: torch.Tensor | float = 0.0
        terms_sum: dict[str, torch.Tensor | float] = {}
        for i, batch in enumerate(micro_batches):
            last = i == len(micro_batches) - 1
            sync = contextlib.nullcontext() if last or not self.dist.enabled else self.ddp_model.no_sync()
            with sync:
                loss, terms = self.forward_backward(batch, micro_index=i, scale=1.0 / len(micro_batches))
            total_loss += loss / len(micro_batches)
            for k, v in terms.items():
                terms_sum[k] = terms_sum.get(k, 0.0) + v / len(micro_batches)
        if r.optim.clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), r.optim.clip_grad)
        else:
            grad_norm = float("nan")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        metrics = {"loss": total_loss, "lr": lr, **{f"loss/{k}": v for k, v in terms_sum.items()}}
        if r.optim.clip_grad > 0:
            metrics["grad_norm"] = grad_norm
        return metrics

    def _teacher_forward(self, images: torch.Tensor):
        return self.objective.teacher_forward(images)

    def forward_backward(self, batch: dict, *, micro_index: int = 0,
                         scale: float = 1.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch (a CPU batch, or one the loop has sent and checked: no host
        synchronisation then); returns the loss and its terms as detached 0-d tensors on the device."""
        if not batch.get("checked"):
            if len(batch["image"]):
                self._check_labels(batch["label"])
            batch = to_device(batch, self.device)
        images = batch["image"]
        step_seed = (self.recipe.run.seed * 1_000_003 + self.step * 1009 + micro_index * 101 + self.dist.rank) % (2**63)
        if self.device_augment is not None and images.shape[0]:  # augment.device_augment: uint8 crops arrive
            images = self.device_augment(images, seed=step_seed)
            batch = dict(batch, image=images)
        stand_in = images.shape[0] == 0  # DDP only: this process's batch was all unreadable images
        if stand_in:
            size = self.recipe.augment.image_size
            images, scale = torch.zeros(1, 3, size, size, device=self.device), 0.0
            # label 0, not -1: a supervised loss must be able to read it (the stand-in's weight is 0 anyway)
            batch = dict(batch, image=images, label=torch.zeros(1, dtype=torch.long, device=self.device),
                         index=torch.zeros(1, dtype=torch.long, device=self.device))
        unmixed = None
        if self.mix is not None:  # before the teacher: teacher and student see the same (mixed) view
            unmixed = images.clone() if self.keep_unmixed else None  # BatchMix mixes in place
            images, target = self.mix(images, self._mix_labels(batch["label"]), seed=step_seed)
            batch = dict(batch, image=images, **({"target": target} if self.mix_targets else {}))
        teacher_out = self._teacher_forward(images)
        mask = None
        if self.masker is not None and "masked" in self.model.views:
            # Drawn on the CPU with the masked patches' indices, which the masked-patch losses gather with.
            mask, index = draw_on_host(self.masker, images.shape[0], self.grid, step_seed, self.device)
            batch = dict(batch, mask_index=index)
        with self._autocast():
            loss, terms = self.forward_model(images, mask, teacher_out, batch, unmixed)
        if not stand_in:
            self._note_divergence(loss, terms)
        self.scaler.scale(loss * scale).backward()
        if stand_in:
            return loss.new_zeros(()), {k: v.new_zeros(()) for k, v in terms.items()}
        return loss.detach(), terms

    def _note_divergence(self, loss: torch.Tensor, terms: dict[str, torch.Tensor]) -> None:
        """Keep [step, loss, terms] of the first step whose loss is not finite, on the device (no synchronisation):
        :meth:`_check_diverged` reads it."""
        row = torch.stack([torch.full((), float(self.step + 1), device=loss.device), loss.detach().float(),
                           *(v.float() for v in terms.values())])
        if self._diverged is None or self._diverged.shape != row.shape:
            self._diverged = torch.zeros_like(row)
        first = ~torch.isfinite(row[1]) & (self._diverged[0] == 0)
        self._diverged = torch.where(first, row, self._diverged)

    def _check_diverged(self) -> None:
        """Raise :class:`TrainingDiverged` naming the first step whose loss was not finite, if there was one (reads
        the device: log steps, epoch ends, before checkpoints)."""
        if self._diverged is None:
            return
        step, loss, *values = self._diverged.tolist()
        if step == 0:
            return
        detail = ", ".join(f"{k}={v:.4g}" for k, v in zip(self.model.losses, values))
        raise TrainingDiverged(f"loss became {loss} at step {int(step)} (terms: {detail}); "
                               f"{self._last_good_checkpoint()}")

    def _host_metrics(self, metrics: dict[str, Any]) -> dict[str, float]:
        """The step's metrics as floats, read from the device at once (one synchronisation); checks divergence."""
        self._check_diverged()
        tensors = [v.detach().float().reshape(()) for v in metrics.values() if isinstance(v, torch.Tensor)]
        values = iter(torch.stack(tensors).tolist() if tensors else ())
        return {k: next(values) if isinstance(v, torch.Tensor) else float(v) for k, v in metrics.items()}

    def _last_good_checkpoint(self) -> str:
        """What a divergence message says about where to go back to: a checkpoint only if one exists."""
        fix = "lower optim.lr, raise optim.warmup_epochs or set optim.clip_grad"
        last = self.run_dir / "last.pt"
        if self.checkpoint_step and last.is_file():
            return f"the last good checkpoint is {last} (step {self.checkpoint_step}): {fix}, then --resume"
        return (f"no checkpoint was written before it (train.checkpoint_every = {self.recipe.train.checkpoint_every}): "
                f"{fix}, then start again in a new --output-dir (or after removing '{self.run_dir}')")

    # ----------------------------------------------------------------------------------------------- eval
    def _evaluate(self, when: str) -> None:
        r = self.recipe.eval
        if not r.evaluators or (when == "before" and not r.before) or (when == "after" and not r.after):
            return
        stopped = False
        if self.dist.is_main:
            encoders = {"student": self._student_encoder()}
            logits = {"student": self._student_logits} if self.classifier is not None else {}
            if r.teacher and self.teacher is not None and not any(k.startswith("teacher_") for k in self.results):
                encoders["teacher"] = Encoder(self.teacher, r.features, role="teacher")
            was_training = self.model.training
            self.model.eval()
            try:
                results = evaluate_encoders(encoders, r, self.recipe.augment, device=self.device, sets=self.eval_sets,
                                            logits=logits)
            except Preempted:
                stopped, results = True, {}
            finally:
                self.model.train(was_training)
            for who, metrics in results.items():
                for k, v in metrics.items():
                    self.results[f"teacher_{k}" if who == "teacher" else f"student_{k}_{when}"] = v
            if results:
                self._log({k: v for k, v in self.results.items() if isinstance(v, float)})
        # Every process learns whether rank 0's evaluation was stopped (this is also the wait for it to end).
        if all_reduce_flag(stopped, self.dist):
            raise Preempted(f"SIGTERM during the {when} evaluation")

    def _student_encoder(self) -> Encoder:
        """The student as the evaluators see it: ``eval.features`` of its output, under the run's autocast."""
        return Encoder(self.student, self.recipe.eval.features, autocast=self._autocast)

    def _student_logits(self, images: torch.Tensor) -> torch.Tensor:
        """Tensor[B, C]: the supervised loss's classifier head on the student (what "classifier" evaluators score)."""
        with self._autocast():
            return self.classifier.predict(self.student(images)).float()

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        """The whole training state as tensors and plain data (what :func:`kdforge.engine.checkpoint.load` reads
        back with weights_only)."""
        return {
            "format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "world_size": self.dist.world_size,
            "rng": ckpt.rng_state(),
            "results": dict(self.results),
            "skips": self._skips.state_dict(),
            "recipe": to_dict(self.recipe),
        }

    def save(self) -> None:
        """Write last.pt (and step_<n>.pt, pruned to keep_checkpoints) atomically, from rank 0.

        A state that is not finite is never written: it would replace the last good checkpoint with a diverged one
        (every process checks its identical copy, so all of them stop)."""
        self._check_diverged()
        self._check_finite()
        if not self.dist.is_main:
            self.checkpoint_step = self.step  # every process knows it: fit() does not save the last step twice
            barrier(self.dist)
            return
        state = self.state_dict()
        ckpt.atomic_save(state, self.run_dir / "last.pt")
        keep = self.recipe.train.keep_checkpoints
        if keep > 0:  # the same file under a second name: serialised and written once
            ckpt.atomic_copy(self.run_dir / "last.pt", self.run_dir / f"step_{self.step:08d}.pt")
            old = sorted(self.run_dir.glob("step_*.pt"))[:-keep]
            for p in old:
                p.unlink(missing_ok=True)
        self.checkpoint_step = self.step
        barrier(self.dist)

    def _check_finite(self) -> None:
        tensors = {f"model.{k}": v for k, v in self.model.state_dict().items() if v.is_floating_point()}
        for i, slots in self.optimizer.state.items():
            tensors.update({f"optimizer.{i}.{k}": v for k, v in slots.items()
                            if isinstance(v, torch.Tensor) and v.is_floating_point()})
        if not tensors:
            return
        finite = torch.stack([torch.isfinite(v).all() for v in tensors.values()]).cpu()  # one sync
        if bool(finite.all()):
            return
        bad = [k for k, ok in zip(tensors, finite.tolist()) if not ok]
        raise TrainingDiverged(
            f"the training state is not finite at step {self.step} ({', '.join(bad[:4])}"
            f"{f' and {len(bad) - 4} more' if len(bad) > 4 else ''}), so it was not saved; "
            f"{self._last_good_checkpoint()}"
        )

    def _load_training_state(self, state: dict[str, Any]) -> None:
        """Everything but the RNG states (restored when training starts) from a checkpoint checked by
        :func:`kdforge.engine.runs.check_resume`."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
        except (RuntimeError, ValueError, KeyError) as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise CheckpointError(f"'{self.resume_path}' does not fit the recipe's models ({first})") from None
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.checkpoint_step = self.step
        self.results = dict(state.get("results", {}))
        if state.get("skips") is not None:
            self._skips.load_state_dict(state["skips"])

    def _log(self, metrics: dict[str, float]) -> None:
        for lg in self._loggers:
            lg.log(self.step, metrics)

    def _summary(self, wall: float) -> dict[str, Any]:
        summary = {
            "steps": self.step,
            "epochs": self.epoch,
            "total_steps": self.total_steps,
            "global_batch": self.global_batch,
            "peak_lr": self.peak_lr,
            "wall_time_s": round(wall, 2),
            "skipped_images": self._skips.count,
            "skipped_files": self._skips.report(),
            "final_metrics": self.last_metrics,
            **self.results,
        }
        if self.dist.is_main:
            with ckpt.atomic_path(self.run_dir / "summary.json") as tmp:
                tmp.write_text(json.dumps(summary, indent=2))
        return summary

    def close(self) -> None:
        from kdforge.engine.distributed import cleanup

        cleanup(self.dist)
