"""kdforge's real Proteus train step against the loop of the released Proteus code, on one device (issue 14).

Three configurations run in one process, on the same batch and the same architectures (random weights):

- ``kdforge_eager``: :class:`kdforge.engine.trainer.Trainer` built from plugins/proteus.toml (its losses, heads,
  masker, optimizer and precision), ``Trainer.train_step`` on a batch already collated by kdforge's loader;
- ``kdforge_compiled_teacher``: the same with ``train.compile_teacher = true``;
- ``proteus_released_loop``: a plain PyTorch loop doing per step what the released Proteus code (DeiT's engine
  around DINOv2's models) does: images transformed on the CPU to normalised float, moved to the device; fp16
  autocast with ``torch.amp.GradScaler``; teacher forward under ``no_grad``; one student forward of the clean and the
  masked view; token / feature / patch MSE losses through LayerNorm + Linear heads; AdamW step; ``.item()`` of
  the three terms and the total (its logger and finiteness check; pretrain/main.py train_one_epoch) and
  ``torch.cuda.synchronize()`` every step. Timm models, no kdforge engine.

Sizes: "full" is the recipe's (DINOv2 ViT-B/14 teacher, ViT-S/14 student, 224 px, batch 128, bf16; the recipe's
torch_hub teacher cannot download here, so the ``timm`` teacher plugin builds the same architecture with
pretrained = false) and needs a GPU; "tiny" (32 px, ViTs of width 64 / 32 and depth 2, batch 4, float32) checks
the harness on a CPU in seconds. Timing: after warm-up steps (torch.compile runs there), rounds interleave the
configurations, the order rotating from round to round; each round times ``calls`` steps of each on the wall clock
after a synchronise. Per configuration the JSON gives img/s, the median step time, FLOPs per step (counted with
``torch.utils.flop_counter.FlopCounterMode`` on one eager step; the compiled teacher does the same arithmetic), MFU
(FLOPs / (step time x the GPU's dense bf16 peak); null on a CPU or an unknown GPU) and host synchronisations per
step: :class:`kdforge.engine.syncs.SyncCounter` (the ones kdforge's code, or this loop, asks for; any device) and,
on CUDA, the ones ``torch.cuda.set_sync_debug_mode("warn")`` reports (torch's own included).

    python -m benchmarks.train_step                  # full size on a GPU; tiny harness check only on a CPU
    python -m benchmarks.train_step --quick          # tiny size wherever it runs
    python -m benchmarks.goals benchmarks/results/train_step_cpu.json   # the goal's verdict from a JSON
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks import goals
from benchmarks.harness import RESULTS_DIR, Record, environment_info, synchronize
from kdforge.engine import syncs as _syncs
from kdforge.engine.syncs import SyncCounter

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "plugins" / "proteus.toml"
CONFIGS = ("kdforge_eager", "kdforge_compiled_teacher", "proteus_released_loop")
SYNCS_FILE = _syncs.__file__
NO_CUDA = "no CUDA device: the full-size step benchmark needs a GPU; ran the tiny CPU harness check only"
#: Dense bf16 / fp16 tensor-core peak FLOP/s by GPU name (first match wins; specific names before general ones).
PEAK_FLOPS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("A10G", 70e12), ("L4", 121e12))


@dataclasses.dataclass(frozen=True)
class Size:
    """One benchmark size: the models, images and precision of every configuration."""

    name: str
    image: int
    batch: int
    teacher: dict[str, Any]  # the [teacher] table (kdforge's timm teacher plugin)
    student_model: str
    student_kwargs: dict[str, Any]
    precision: str  # kdforge's train.precision; the released loop runs fp16 with a scaler wherever CUDA runs

    @property
    def tag(self) -> str:
        return f"{self.name}_{self.image}px_b{self.batch}"


SIZES = {
    "full": Size("full", 224, 128,
                 {"plugin": "timm", "model": "vit_base_patch14_dinov2", "pretrained": False, "autocast": "bf16",
                  "model_kwargs": {"img_size": 224}},
                 "vit_small_patch14_dinov2", {"img_size": 224, "init_values": 1.0}, "bf16"),
    "tiny": Size("tiny", 32, 4,
                 {"plugin": "timm", "model": "vit_tiny_patch16_224", "pretrained": False, "autocast": "none",
                  "model_kwargs": {"img_size": 32, "patch_size": 4, "embed_dim": 64, "depth": 2, "num_heads": 2}},
                 "vit_tiny_patch16_224",
                 {"img_size": 32, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, "init_values": 1.0},
                 "fp32"),
}


def label(size: Size, config: str) -> str:
    """The record label of ``config`` at ``size`` (goals name the full-size ones)."""
    return f"train_step/{size.tag}/{config}"


# ---------------------------------------------------------------------------------------------------------------
# the goal (issue 14)
# ---------------------------------------------------------------------------------------------------------------

GOAL_TEXT = "kdforge train step img/s >= 1.5x the released Proteus loop's on the same GPU (ViT-B/14 -> ViT-S/14, " \
            "224 px, batch 128)"


def _judge_goal(eager: Record, compiled: Record, released: Record) -> tuple[bool, str]:
    """The faster kdforge configuration (by its median speedup over interleaved rounds) against the released loop;
    never judged from CPU figures."""
    for rec in (eager, compiled, released):
        if not rec.device.startswith("cuda"):
            raise goals._Unmeasured(f"{rec.label} ran on {rec.device}: the goal is judged on a GPU only")
    best = max((eager, compiled), key=lambda r: r.speedups.get(released.label, 0.0))
    ok, figure = goals._judge_speedup(best, released, 1.5, ">= 1.5x")
    return ok, f"{best.label.rsplit('/', 1)[1]}: {figure}"


goals.register(goals.Goal(14, GOAL_TEXT, tuple(label(SIZES["full"], c) for c in CONFIGS), _judge_goal))


# ---------------------------------------------------------------------------------------------------------------
# the configurations
# ---------------------------------------------------------------------------------------------------------------


def build_trainer(size: Size, device: torch.device, run_dir: Path, *, compile_teacher: bool):
    """A :class:`Trainer` of plugins/proteus.toml at ``size`` on procedural images (no data set needed), without
    evaluation; returns it and one collated batch of its loader (CPU, pinned on CUDA)."""
    from kdforge.engine.trainer import Trainer
    from kdforge.recipe import load_recipe

    def toml(value: Any) -> str:
        if isinstance(value, dict):
            return "{" + ", ".join(f"{k} = {toml(v)}" for k, v in value.items()) + "}"
        return json.dumps(value)

    recipe = load_recipe(RECIPE, overrides=[
        f"run.device={json.dumps(device.type)}",  # the Literal takes "cpu" / "cuda" (rank 0: cuda:0)
        f"data={toml({'plugin': 'procedural', 'image_size': size.image, 'num_train': 2 * size.batch})}",
        f"augment.image_size={size.image}",
        f"teacher={toml(size.teacher)}",
        f"student.model={json.dumps(size.student_model)}",
        f"student.model_kwargs={toml(size.student_kwargs)}",
        f"train.batch_size={size.batch}", "train.num_workers=0", "train.repeated_aug=1",
        f"train.precision={json.dumps(size.precision)}", f"train.compile_teacher={str(compile_teacher).lower()}",
        "eval.evaluators={}",
    ])  # fmt: skip
    trainer = Trainer(recipe, run_dir, show_progress=False)
    batch = next(iter(trainer._loader()))
    if device.type == "cuda":
        batch = dict(batch, image=batch["image"].pin_memory())
    return trainer, batch


class ReleasedLoop:
    """What the released Proteus code does per training step, written plainly with timm models (see the module
    docstring). ``images``: Tensor[B, 3, H, W] float in [0, 1] on the CPU, normalised here once as the released
    transforms do on the CPU; the masks are drawn per step on the CPU (the released collate function): the first
    int(B / 2) images of the batch, half of their patches each."""

    def __init__(self, size: Size, device: torch.device, images: torch.Tensor):
        import timm

        torch.manual_seed(0)
        self.device, self.amp = device, device.type == "cuda"  # fp16 autocast and the scaler where CUDA runs
        kwargs = dict(size.teacher["model_kwargs"])
        self.teacher = timm.create_model(size.teacher["model"], pretrained=False, num_classes=0, **kwargs)
        self.teacher.to(device).eval().requires_grad_(False)
        self.student = timm.create_model(size.student_model, pretrained=False, num_classes=0,
                                         **size.student_kwargs).to(device)
        ds, dt = self.student.embed_dim, self.teacher.embed_dim
        self.mask_token = nn.Parameter(torch.zeros(1, 1, ds, device=device))
        self.heads = nn.ModuleDict({k: nn.Sequential(nn.LayerNorm(ds), nn.Linear(ds, dt))
                                    for k in ("token", "feature", "patch")}).to(device)
        params = [*self.student.parameters(), self.mask_token, *self.heads.parameters()]
        self.optimizer = torch.optim.AdamW(params, lr=5e-4 * size.batch / 512, weight_decay=0.05)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.images = ((images - mean) / std).contiguous()
        if device.type == "cuda":
            self.images = self.images.pin_memory()
        self.n_patches = self.student.patch_embed.num_patches
        self.generator = torch.Generator().manual_seed(0)

    def _masks(self, b: int) -> torch.Tensor:
        masks = torch.zeros(b, self.n_patches, dtype=torch.bool)
        for i in range(int(b * 0.5)):
            masks[i, torch.randperm(self.n_patches, generator=self.generator)[: int(self.n_patches * 0.5)]] = True
        return masks

    def _student(self, x: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Tokens Tensor[B, 1 + N, D] of the student, masked patches replaced by the mask token."""
        m = self.student
        tokens = m.patch_embed(x)
        tokens = torch.where(masks[..., None], self.mask_token.to(tokens.dtype), tokens)
        return m.norm(m.blocks(m.norm_pre(m._pos_embed(tokens))))

    def step(self) -> None:
        b = self.images.shape[0]
        x = self.images.to(self.device, non_blocking=True)
        masks = self._masks(b).to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
            with torch.no_grad():
                t = self.teacher.forward_features(x)
            t_cls, t_patches = t[:, 0], t[:, self.teacher.num_prefix_tokens:]
            s = self._student(torch.cat([x, x]), torch.cat([masks, torch.zeros_like(masks)]))
            k = self.student.num_prefix_tokens
            masked, clean = s[:b, k:], s[b:]
            token = self.heads["token"](clean[:, 0])
            token_loss = F.mse_loss(token, t_cls)
            rows = torch.cat([token[:, None], self.heads["feature"](clean[:, k:])], dim=1)
            feature_loss = F.mse_loss(rows, torch.cat([t_cls[:, None], t_patches], dim=1))
            patch_loss = F.mse_loss(self.heads["patch"](masked[masks]), t_patches[masks])
            loss = token_loss + feature_loss + patch_loss
        # The released train_one_epoch reads the three terms and the total every step (for its logger and its
        # finiteness check): four reads of the device.
        _terms = (patch_loss.item(), token_loss.item(), feature_loss.item())
        loss_value = loss.item()
        if loss_value != loss_value or abs(loss_value) == float("inf"):
            raise RuntimeError(f"the released loop's loss is {loss_value}")
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.device.type == "cuda":
            torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------


class _StepSyncs(SyncCounter):
    """SyncCounter that also counts the calls made by this file (the released loop's ``loss.item()``)."""

    def _caller(self) -> str | None:
        where = super()._caller()
        if where is not None:
            return where
        frame = sys._getframe(1)  # the counter's wrapper; the first frame outside syncs.py made the call
        while frame is not None and frame.f_code.co_filename == SYNCS_FILE:
            frame = frame.f_back
        if frame is None or frame.f_code.co_filename != __file__:
            return None
        return f"benchmarks/train_step.py:{frame.f_lineno}"


def count_syncs(step: Callable[[], Any], device: torch.device, *, flops: bool) -> dict[str, Any]:
    """Host synchronisations of one call of ``step``: the counter's (calls on device tensors only where a GPU runs:
    CPU-side work such as drawing masks waits for nothing there), and on CUDA the sync debug mode's. ``flops``:
    count the step's FLOPs in the same call (``flops_per_step``; not under torch.compile, whose kernels the
    counter cannot see)."""
    from torch.utils.flop_counter import FlopCounterMode

    flop_counter = FlopCounterMode(display=False) if flops else contextlib.nullcontext()
    with _StepSyncs(device_only=device.type != "cpu") as counter, flop_counter:
        step()
    out: dict[str, Any] = {"syncs_per_step": counter.count, "sync_sites": counter.report().splitlines()}
    if flops:
        out["flops_per_step"] = float(flop_counter.get_total_flops())
    out["cuda_syncs_per_step"] = None
    if device.type == "cuda":
        synchronize(device)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step()
            finally:
                torch.cuda.set_sync_debug_mode(0)
        out["cuda_syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught)
        synchronize(device)
    return out


def peak_flops(device: torch.device) -> tuple[float | None, str]:
    """(dense bf16 peak FLOP/s, the device's name); None on a CPU or a GPU the table lacks."""
    if device.type != "cuda":
        return None, "cpu"
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS if key in name), None), name


def interleaved(steps: dict[str, Callable[[], Any]], device: torch.device, *, rounds: int,
                calls: int) -> dict[str, list[float]]:
    """Per configuration, the mean step time (s) of each round; every round times ``calls`` steps of each, the
    order rotating from round to round so that a drifting machine does not favour one configuration."""
    names = list(steps)
    per_round: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            synchronize(device)
            t0 = time.perf_counter()
            for _ in range(calls):
                steps[name]()
            synchronize(device)
            per_round[name].append((time.perf_counter() - t0) / calls)
    return per_round


def run(size: Size, device: torch.device, *, rounds: int, calls: int, warmup: int) -> dict[str, Any]:
    """Build the three configurations at ``size`` on ``device``, warm them up, time them in interleaved rounds;
    returns {"records": [Record], "configs": [per-configuration figures]}."""
    with tempfile.TemporaryDirectory(prefix="kdforge-train-step-") as tmp:
        eager, batch = build_trainer(size, device, Path(tmp) / "eager", compile_teacher=False)
        compiled, _ = build_trainer(size, device, Path(tmp) / "compiled", compile_teacher=True)
        released = ReleasedLoop(size, device, batch["image"])
        steps = {
            "kdforge_eager": lambda: eager.train_step([batch]),
            "kdforge_compiled_teacher": lambda: compiled.train_step([batch]),
            "proteus_released_loop": released.step,
        }
        for name, step in steps.items():
            for _ in range(warmup):
                step()
        synchronize(device)
        # FLOPs and syncs in one step per configuration; the compiled teacher does the eager one's arithmetic.
        syncs = {name: count_syncs(step, device, flops=name != "kdforge_compiled_teacher")
                 for name, step in steps.items()}
        flops = {name: figures.pop("flops_per_step", None) for name, figures in syncs.items()}
        flops["kdforge_compiled_teacher"] = flops["kdforge_eager"]
        times = interleaved(steps, device, rounds=rounds, calls=calls)
    peak, device_name = peak_flops(device)
    base = "proteus_released_loop"
    records, configs = [], []
    for name in CONFIGS:
        median = statistics.median(times[name])
        rounds_speedup = [b / t for b, t in zip(times[base], times[name])]
        mfu = None if peak is None else flops[name] / (median * peak)
        figures = {
            "config": name, "img_per_s": size.batch / median, "step_median_s": median,
            "step_times_s": times[name], "flops_per_step": flops[name], "mfu": mfu,
            "speedup_vs_released": statistics.median(rounds_speedup) if name != base else 1.0,
            "precision": "fp16+GradScaler" if name == base and device.type == "cuda" else
            ("fp32" if name == base else size.precision),
            **syncs[name],
        }
        configs.append(figures)
        records.append(Record(
            label=label(size, name), group=f"train_step/{size.tag}", nodeid="benchmarks/train_step.py",
            device=str(device), median_s=median, timing_method="perf_counter", reps=len(times[name]) * calls,
            flops=flops[name], anchors=[] if name == base else [label(size, base)],
            speedups={} if name == base else {label(size, base): figures["speedup_vs_released"]},
            round_speedups={} if name == base else {label(size, base): rounds_speedup},
            params={k: v for k, v in figures.items() if k not in ("config", "step_times_s")},
        ))
    return {"size": dataclasses.asdict(size), "device_name": device_name, "peak_flops": peak, "records": records,
            "configs": configs}


def device_slug(device: torch.device) -> str:
    """"cpu", or the GPU's model in lower case ("h200"), as .ci/gpu names its files."""
    if device.type != "cuda":
        return "cpu"
    parts = torch.cuda.get_device_name(device).split()
    return (parts[1] if len(parts) > 1 else parts[0]).lower()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_step", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the tiny size only (a harness check)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON to write (default: benchmarks/results/train_step_<device>.json)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved timing rounds (default 7; 5 tiny)")
    parser.add_argument("--calls", type=int, default=None, help="steps per configuration and round (5; 1 tiny)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per configuration (3; 1 tiny)")
    args = parser.parse_args(argv)
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    skipped = None
    if device.type != "cuda" and not args.quick:
        skipped = NO_CUDA
        print(skipped)
    size = SIZES["tiny" if args.quick or device.type != "cuda" else "full"]
    full = size.name == "full"
    result = run(size, device, rounds=args.rounds or (7 if full else 5), calls=args.calls or (5 if full else 1),
                 warmup=args.warmup if args.warmup is not None else (3 if full else 1))
    verdicts = goals.evaluate(result["records"], [goals.REGISTRY[GOAL_TEXT]])
    payload = {
        "environment": {**environment_info(), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")},
        "benchmark": "train_step", "size": result["size"], "device_name": result["device_name"],
        "peak_flops": result["peak_flops"], "skipped": skipped, "configs": result["configs"],
        "records": [r.as_dict() for r in result["records"]],
        "goals": [dataclasses.asdict(v) for v in verdicts],
    }
    out = args.out or RESULTS_DIR / f"train_step_{device_slug(device)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"train step, {size.tag} on {result['device_name']}:")
    for c in result["configs"]:
        mfu = "-" if c["mfu"] is None else f"{100 * c['mfu']:.1f}%"
        cuda = "" if c["cuda_syncs_per_step"] is None else f", {c['cuda_syncs_per_step']} by CUDA's sync debug mode"
        print(f"  {c['config']:<26} {c['img_per_s']:9.1f} img/s  step {c['step_median_s'] * 1e3:8.2f} ms  "
              f"MFU {mfu:>6}  {c['flops_per_step'] / 1e9:.3g} GFLOP/step  x{c['speedup_vs_released']:.2f} vs "
              f"released  syncs/step {c['syncs_per_step']}{cuda}")
    print(goals.format_verdicts(verdicts))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        sys.exit(main())
