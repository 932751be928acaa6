"""The distillation loop. Reads top-down: ``fit`` -> ``train_step`` -> ``forward_backward``.

One teacher forward per batch is shared by every loss, and teacher and student see the same augmented view (the
student's copy may have masked patches). Checkpoints are atomic and a resumed run continues exactly: model,
optimizer, schedule, grad scaler, RNG state and data position are restored, and augmentation and masks are
seeded per (epoch, item) and per step, so they do not depend on how the run was split.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import signal
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from tqdm.auto import tqdm

from kdforge.data import collate
from kdforge.engine import checkpoint as ckpt
from kdforge.engine.distributed import DistInfo, all_reduce_flag, barrier, init_distributed
from kdforge.errors import KdforgeError, RecipeError, TrainingDiverged
from kdforge.eval import evaluate_encoders, pooled
from kdforge.plugins import get_registry
from kdforge.recipe import Recipe, dump_toml, to_dict


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was written and the run stops cleanly (exit code 0)."""


class DistillModule(nn.Module):
    """Student plus loss modules (projection heads): everything that is trained, as one module for DDP."""

    def __init__(self, student: nn.Module, losses: dict[str, nn.Module], weights: dict[str, float]):
        super().__init__()
        self.student = student
        self.losses = nn.ModuleDict(losses)
        self.weights = weights

    def forward(self, images, mask, teacher_out, batch):
        student_out = self.student(images, mask=mask)
        batch = dict(batch, mask=mask if mask is not None else
                     torch.zeros(images.shape[0], student_out.patches.shape[1], dtype=torch.bool, device=images.device))
        total = images.new_zeros((), dtype=torch.float32)
        terms: dict[str, torch.Tensor] = {}
        for label, loss_fn in self.losses.items():
            value, _ = loss_fn(student_out, teacher_out, batch)
            terms[label] = value.detach()
            total = total + self.weights[label] * value.float()
        return total, terms


class EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, sharded over ranks, yielding (epoch, index) so items can seed themselves.

    ``start`` skips the first ``start`` samples of this rank's shard (resuming mid-epoch).
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __len__(self) -> int:
        return self.n // self.world - self.start

    def __iter__(self) -> Iterator[tuple[int, int]]:
        g = torch.Generator().manual_seed(self.seed * 7919 + self.epoch)
        order = torch.randperm(self.n, generator=g)[: (self.n // self.world) * self.world]
        shard = order[self.rank :: self.world].tolist()
        return iter([(self.epoch, i) for i in shard[self.start :]])


class SeededItems(torch.utils.data.Dataset):
    """Runs each item's transform under its own seed (from run seed, epoch and index): exact resumes with any
    number of workers."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed((self.seed * 1_000_003 + epoch * 10_007 + index) % (2**63))
            return self.dataset[index]


def _param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in module.named_parameters():
        if not p.requires_grad:
            continue
        # Norms, biases, tokens, position embeddings and relative position bias tables are not decayed (timm /
        # DeiT / BEiT convention).
        position = "pos_embed" in name or "rel_pos_bias" in name
        if p.ndim <= 1 or name.endswith(".bias") or "token" in name or position:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def cosine_lr(step: int, total: int, warmup: int, peak: float, floor: float) -> float:
    """Linear warm-up to ``peak`` over ``warmup`` steps, then half a cosine down to ``floor`` at ``total``."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, total - warmup)
    return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, t)))


class Trainer:
    """Builds everything a recipe describes, then ``fit()`` trains, evaluates and writes summary.json."""

    def __init__(self, recipe: Recipe, run_dir: str | Path, *, resume: str | None = None, show_progress: bool = True):
        self.recipe = recipe
        self.run_dir = Path(run_dir)
        self.show_progress = show_progress
        r = recipe
        if r.run.threads:
            torch.set_num_threads(r.run.threads)
        self.dist: DistInfo = init_distributed(r.run.device)
        self.device = self.dist.device
        registry = get_registry()

        self.resume_path = self._find_resume(resume)

        # Data first: a missing data root is the most common mistake and must fail before any model is built.
        from kdforge.data.transforms import build_transform

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

        torch.manual_seed(r.run.seed)  # a randomly initialised teacher (tests, ablations) must be reproducible
        self.teacher = registry.create("teachers", r.teacher, "teacher").to(self.device)
        torch.manual_seed(r.run.seed)  # the student's init must not depend on whether the teacher came from a cache
        self.student = registry.create("students", r.student, "student").to(self.device)
        self.masker = registry.create("maskers", r.masker, "masker") if r.masker else None

        losses, weights = {}, {}
        for label, table in r.losses.items():
            table = dict(table)
            weights[label] = float(table.pop("weight", 1.0))
            losses[label] = registry.create(
                "losses", table, f"losses.{label}",
                student_dim=self.student.embed_dim, teacher_dim=self.teacher.embed_dim,
            )
        needs_patches = any(l.needs_patches for l in losses.values())
        if any(l.needs_mask for l in losses.values()) and self.masker is None:
            label = next(k for k, l in losses.items() if l.needs_mask)
            raise RecipeError(f"losses.{label} ({r.losses[label]['plugin']}) trains on masked patches but the "
                              "recipe has no [masker] table: add [masker] plugin = \"random\" (or \"block\")")
        size = (r.augment.image_size, r.augment.image_size)
        self.grid = self.student.grid(size)
        self.teacher_grid = tuple(self.teacher.grid(size))
        if needs_patches:
            from kdforge.students import check_grids

            check_grids(self.teacher, self.student, size, resize=r.train.resize_teacher_grid)
        self.model = DistillModule(self.student, losses, weights).to(self.device)

        self.batches_per_epoch = per_rank // r.train.batch_size
        self.steps_per_epoch = max(1, self.batches_per_epoch // r.train.accum_steps)
        self.total_steps = self.steps_per_epoch * r.train.epochs
        self.global_batch = r.train.batch_size * r.train.accum_steps * self.dist.world_size
        self.peak_lr = r.optim.lr * self.global_batch / r.optim.lr_scale_batch
        self.warmup_steps = int(round(r.optim.warmup_epochs * self.steps_per_epoch))

        self.optimizer = torch.optim.AdamW(
            _param_groups(self.model, r.optim.weight_decay), lr=self.peak_lr, betas=tuple(r.optim.betas),
            fused=self.device.type == "cuda",
        )
        self.autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.train.precision)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=r.train.precision == "fp16")
        self.ddp_model: nn.Module = self.model
        if self.dist.enabled:
            self.ddp_model = nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                find_unused_parameters=True,  # the mask token idles in batches with no masked image
            )
        self.forward_model = torch.compile(self.ddp_model) if r.train.compile else self.ddp_model

        self.sampler = EpochSampler(len(self.dataset), r.run.seed, self.dist.rank, self.dist.world_size)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.results: dict[str, Any] = {}
        self.last_metrics: dict[str, float] = {}
        self._stop = False
        self._loggers: list = []
        self._skips = None

    # ----------------------------------------------------------------------------------------------- set-up
    def _find_resume(self, resume: str | None) -> Path | None:
        if resume is None:
            return None
        path = self.run_dir / "last.pt" if resume in ("auto", "") else Path(resume)
        if not path.is_file():
            raise KdforgeError(f"--resume: no checkpoint at '{path}' (a run writes <output-dir>/last.pt; "
                               "pass --resume PATH or drop --resume to start fresh)")
        return path

    def _loader(self) -> Iterator[dict]:
        """This epoch's batches from the current position (``self.epoch``, ``self.batch_in_epoch``)."""
        r = self.recipe.train
        # Its own generator: creating a DataLoader iterator otherwise draws from the global RNG, and a resumed run
        # creates one at a different moment than an uninterrupted one.
        common = dict(batch_size=r.batch_size, num_workers=r.num_workers, collate_fn=collate, drop_last=True,
                      pin_memory=self.device.type == "cuda",
                      generator=torch.Generator().manual_seed(self.recipe.run.seed * 7919 + self.epoch))
        if self.streaming:
            # Shards cannot seek: a resumed epoch re-reads and drops the batches already trained on.
            if hasattr(self.dataset, "set_epoch"):
                self.dataset.set_epoch(self.epoch)
            loader = torch.utils.data.DataLoader(self.dataset, **common)
            return itertools.islice(loader, self.batch_in_epoch, self.batches_per_epoch)
        self.sampler.set_position(self.epoch, self.batch_in_epoch * r.batch_size)
        return iter(torch.utils.data.DataLoader(SeededItems(self.dataset, self.recipe.run.seed),
                                                sampler=self.sampler, **common))

    # ----------------------------------------------------------------------------------------------- loop
    def fit(self) -> dict[str, Any]:
        """Train (resuming if asked), evaluate, write curves.png and summary.json; returns the summary."""
        from kdforge.data.skips import SkipCounter

        r = self.recipe
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.dist.is_main:
            (self.run_dir / "recipe.toml").write_text(dump_toml(r))
        self._skips = SkipCounter(max_bad_fraction=r.train.max_bad_fraction)
        if self.resume_path is not None:
            self._load(self.resume_path)
        if self.dist.is_main:
            registry = get_registry()
            self._loggers = [registry.create("loggers", {"plugin": n}, f"loggers.{n}", run_dir=self.run_dir)
                             for n in ("jsonl", "tensorboard")]
        old_handler = signal.signal(signal.SIGTERM, self._on_sigterm)
        t_start = time.time()
        try:
            if self.resume_path is None:
                self._evaluate("before")
            self._train_loop()
            if self.step > 0:
                self.save()
            self._evaluate("after")
            self._write_curves()
        except Preempted:
            self._write_curves()
            raise
        finally:
            signal.signal(signal.SIGTERM, old_handler)
            for lg in self._loggers:
                lg.close()
        summary = self._summary(time.time() - t_start)
        return summary

    def _on_sigterm(self, signum, frame):
        self._stop = True

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
        bar = tqdm(total=last_step, initial=self.step, desc="distil", unit="step", dynamic_ncols=True,
                   disable=not (self.show_progress and self.dist.is_main))
        window_t, window_imgs = time.perf_counter(), 0
        while self.step < last_step:
            micro: list[dict] = []
            for batch in self._loader():
                self._skips.add_batch(batch)
                micro.append(batch)
                self.batch_in_epoch += 1
                epoch_done = self.batch_in_epoch >= self.batches_per_epoch
                if len(micro) < r.train.accum_steps:
                    if epoch_done:  # a partial accumulation group at the end of an epoch is dropped
                        self._end_epoch(last_step)
                    continue
                metrics = self.train_step(micro)
                self.last_metrics = metrics
                window_imgs += sum(b["image"].shape[0] for b in micro) * self.dist.world_size
                micro = []
                bar.update(1)
                if epoch_done:  # before the checkpoint, so that a resume starts the next epoch
                    self._end_epoch(last_step)
                if self.step % r.train.log_every == 0 or self.step == last_step:
                    dt = time.perf_counter() - window_t
                    metrics["img_per_s"] = window_imgs / dt if dt > 0 else 0.0
                    metrics["epoch"] = self.epoch + self.batch_in_epoch / max(1, self.batches_per_epoch)
                    self._log(metrics)
                    bar.set_postfix(loss=f"{metrics['loss']:.4f}", img_s=f"{metrics['img_per_s']:.0f}")
                    window_t, window_imgs = time.perf_counter(), 0
                if r.train.checkpoint_every and self.step % r.train.checkpoint_every == 0:
                    self.save()
                if all_reduce_flag(self._stop, self.dist):
                    self.save()
                    bar.close()
                    raise Preempted(f"SIGTERM at step {self.step}: checkpoint written to {self.run_dir / 'last.pt'}")
                if self.step >= last_step or epoch_done:
                    break
        bar.close()
        self._skips.check()

    def _end_epoch(self, last_step: int) -> None:
        self.epoch += 1
        self.batch_in_epoch = 0
        every = self.recipe.eval.every_epochs
        if every and self.epoch % every == 0 and self.step < last_step:
            self._evaluate(f"epoch{self.epoch}")

    def train_step(self, micro_batches: list[dict]) -> dict[str, float]:
        """One optimizer step over ``accum_steps`` micro-batches; returns the step's metrics."""
        r = self.recipe
        lr = cosine_lr(self.step, self.total_steps, self.warmup_steps, self.peak_lr, r.optim.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.zero_grad(set_to_none=True)
        total_loss, terms_sum = 0.0, {}
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
            grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), r.optim.clip_grad))
        else:
            grad_norm = float("nan")
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1
        metrics = {"loss": total_loss, "lr": lr, **{f"loss/{k}": v for k, v in terms_sum.items()}}
        if r.optim.clip_grad > 0:
            metrics["grad_norm"] = grad_norm
        return metrics

    def forward_backward(self, batch: dict, *, micro_index: int = 0, scale: float = 1.0) -> tuple[float, dict]:
        images = batch["image"].to(self.device, non_blocking=True)
        teacher_out = self.teacher(images)  # frozen: eval mode, inference mode and autocast live in the teacher
        if self.teacher_grid != tuple(self.grid):  # train.resize_teacher_grid (checked at start-up): once per batch
            from kdforge.students import resize_patches

            teacher_out = dataclasses.replace(
                teacher_out, patches=resize_patches(teacher_out.patches, self.teacher_grid, self.grid), grid=self.grid)
        mask = None
        if self.masker is not None:
            g = torch.Generator().manual_seed(
                (self.recipe.run.seed * 1_000_003 + self.step * 1009 + micro_index * 101 + self.dist.rank) % (2**63))
            mask = self.masker(images.shape[0], self.grid, g).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            loss, terms = self.forward_model(images, mask, teacher_out, batch)
        if not bool(torch.isfinite(loss)):
            detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
            raise TrainingDiverged(
                f"loss became {loss.item()} at step {self.step + 1} (terms: {detail}); the last good checkpoint "
                f"is {self.run_dir / 'last.pt'}: lower optim.lr, raise optim.warmup_epochs or set optim.clip_grad, "
                "then --resume"
            )
        self.scaler.scale(loss * scale).backward()
        return float(loss.detach()), {k: float(v) for k, v in terms.items()}

    # ----------------------------------------------------------------------------------------------- eval
    def _evaluate(self, when: str) -> None:
        r = self.recipe.eval
        if not r.evaluators or (when == "before" and not r.before) or (when == "after" and not r.after):
            return
        if self.dist.is_main:
            encoders = {"student": self._student_features}
            if r.teacher and not any(k.startswith("teacher_") for k in self.results):
                encoders["teacher"] = lambda x: pooled(self.teacher(x), r.features)
            was_training = self.student.training
            self.student.eval()
            try:
                results = evaluate_encoders(encoders, r, self.recipe.augment, device=self.device)
            finally:
                self.student.train(was_training)
            for who, metrics in results.items():
                for k, v in metrics.items():
                    self.results[f"teacher_{k}" if who == "teacher" else f"student_{k}_{when}"] = v
            self._log({k: v for k, v in self.results.items() if isinstance(v, float)})
        barrier(self.dist)

    def _student_features(self, images: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return pooled(self.student(images), self.recipe.eval.features).float()

    # ----------------------------------------------------------------------------------------------- state
    def state_dict(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "rng": ckpt.rng_state(),
            "results": dict(self.results),
            "skips": self._skips.state_dict() if self._skips is not None else None,
            "recipe": to_dict(self.recipe),
        }

    def save(self) -> None:
        """Write last.pt (and step_<n>.pt, pruned to keep_checkpoints) atomically, from rank 0."""
        if not self.dist.is_main:
            barrier(self.dist)
            return
        state = self.state_dict()
        ckpt.atomic_save(state, self.run_dir / "last.pt")
        keep = self.recipe.train.keep_checkpoints
        if keep > 0:
            ckpt.atomic_save(state, self.run_dir / f"step_{self.step:08d}.pt")
            old = sorted(self.run_dir.glob("step_*.pt"))[:-keep]
            for p in old:
                p.unlink(missing_ok=True)
        barrier(self.dist)

    def _load(self, path: Path) -> None:
        state = ckpt.load(path)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.results = dict(state.get("results", {}))
        if state.get("skips") is not None:
            self._skips.load_state_dict(state["skips"])
        ckpt.set_rng_state(state["rng"])

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
            tmp = self.run_dir / ".summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=2))
            tmp.replace(self.run_dir / "summary.json")
        return summary

    def close(self) -> None:
        from kdforge.engine.distributed import cleanup

        cleanup(self.dist)
