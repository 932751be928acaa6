"""Images per second per DataLoader worker: today's train transform against the lean one (issue 14).

On generated ImageNet-sized JPEGs (500 x 375, procedural content) in a temporary image_folder data set, a real
``torch.utils.data.DataLoader`` over kdforge's image_folder source reads the train split with

- (a) today's path, with plugins/proteus.toml's [augment] (224 px, bicubic random resized crop and flip, timm
  RandAugment rand-m9-mstd0.5-inc1 on PIL, random erasing 0.25, float32 out), and
- (b) the lean path, the same recipe with ``augment.device_augment = true`` (decode_jpeg, uint8 crop and flip),

for k = 1 and 2 workers, rounds of (a) and (b) interleaved (their order alternating) so that the noise of a shared
machine hits both. Reported: img/s per worker (median over rounds), the ratio (b) / (a) per round (median, min,
max), the CPU time per image of :class:`kdforge.data.device_augment.DeviceAugment` at batch 64 (on a GPU that work
is batched device work, off the workers), and the per-image times of the decode and crop choices the lean path
chose between. The issue's bar: (b) >= 3 x (a) per worker.

    python -m benchmarks.data_path            # about two minutes on 2 CPU cores
    python -m benchmarks.data_path --quick    # a harness check, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import tomllib
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]


def proteus_augment(image_size: int):
    """plugins/proteus.toml's [augment] as a TransformConfig, at ``image_size``."""
    from kdforge.data.transforms import TransformConfig

    table = tomllib.loads((REPO / "plugins" / "proteus.toml").read_text())["augment"]
    table = {k: tuple(v) if isinstance(v, list) else v for k, v in table.items()}
    return TransformConfig(**{**table, "image_size": image_size})


def write_jpegs(root: Path, count: int, width: int = 500, height: int = 375) -> list[Path]:
    """``count`` procedural photo-like JPEGs (quality 90) in two class folders under ``root / "train"``."""
    from PIL import Image

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        f = rng.uniform(3, 40, 4)
        img = np.stack([128 + 110 * np.sin(x / f[0] + i), 128 + 110 * np.cos(y / f[1] - x / f[2]),
                        (x * y / (f[3] * 50) + 40 * i) % 256], -1)
        img += rng.normal(0, 12, img.shape)
        folder = root / "train" / f"c{i % 2}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.JPEG"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
        paths.append(path)
    return paths


def loader_rate(dataset, workers: int, batch_size: int) -> float:
    """Images per second per worker of one pass over ``dataset`` after its first batch (worker start-up and the
    first batch are left out), read as the engine reads it: items seeded one by one (``SeededItems``) in the
    order of an ``EpochSampler``."""
    from kdforge.data import collate
    from kdforge.engine.trainer import EpochSampler, SeededItems

    loader = torch.utils.data.DataLoader(SeededItems(dataset, 0), batch_size=batch_size,
                                         sampler=EpochSampler(len(dataset), seed=0), num_workers=workers,
                                         collate_fn=collate, prefetch_factor=2 if workers else None)
    it = iter(loader)
    next(it)
    t0 = time.perf_counter()
    count = sum(len(batch["image"]) for batch in it)
    return count / (time.perf_counter() - t0) / max(1, workers)


def device_augment_cpu(cfg, batch: int, repeats: int) -> float:
    """Median ms per image of DeviceAugment on the CPU at ``batch`` images (after a warm-up call)."""
    from kdforge.data.device_augment import DeviceAugment

    aug = DeviceAugment(cfg)
    images = torch.randint(0, 256, (batch, 3, cfg.image_size, cfg.image_size), dtype=torch.uint8)
    aug(images, seed=0)
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        aug(images, seed=r + 1)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) / batch * 1e3


def decode_choices(paths: list[Path], size: int, repeats: int) -> dict[str, float]:
    """Median ms per image of the decode + crop routes CropFlipTransform chose between, on the same crops."""
    from PIL import Image
    from torchvision.io import decode_jpeg
    from torchvision.transforms import v2
    from torchvision.transforms.v2 import functional as F

    bicubic = v2.InterpolationMode.BICUBIC
    rrc = v2.RandomResizedCrop(size, scale=(0.08, 1.0), interpolation=bicubic, antialias=True)
    data = [p.read_bytes() for p in paths]
    torch.manual_seed(0)
    boxes = [rrc.make_params([Image.open(io.BytesIO(d))]) for d in data]

    def box_of(b, sx=1.0, sy=1.0):
        return (b["left"] * sx, b["top"] * sy, (b["left"] + b["width"]) * sx, (b["top"] + b["height"]) * sy)

    def pil_resize_box(d, b, draft):
        im = Image.open(io.BytesIO(d))
        w, h = im.size
        if draft:  # decode at 1/2, 1/4 or 1/8 scale when the crop is that much larger than the output
            im.draft("RGB", (max(1, w * size // b["width"]), max(1, h * size // b["height"])))
        sx, sy = im.size[0] / w, im.size[1] / h
        return np.asarray(im.resize((size, size), Image.BICUBIC, box=box_of(b, sx, sy)))

    def pil_decode_tv_crop(d, b):
        x = torch.from_numpy(np.asarray(Image.open(io.BytesIO(d)).convert("RGB")).copy()).permute(2, 0, 1)
        return F.resized_crop(x, **b, size=[size, size], interpolation=bicubic, antialias=True)

    def decode_jpeg_tv_crop(d, b):
        x = decode_jpeg(torch.frombuffer(bytearray(d), dtype=torch.uint8))
        return F.resized_crop(x, **b, size=[size, size], interpolation=bicubic, antialias=True)

    routes = {
        "pil_decode+pil_resize_box": lambda d, b: pil_resize_box(d, b, False),
        "pil_draft_decode+pil_resize_box": lambda d, b: pil_resize_box(d, b, True),
        "pil_decode+torchvision_uint8_crop": pil_decode_tv_crop,
        "decode_jpeg+torchvision_uint8_crop": decode_jpeg_tv_crop,
    }
    out = {}
    for name, fn in routes.items():
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for d, b in zip(data, boxes):
                fn(d, b)
            times.append((time.perf_counter() - t0) / len(data))
        out[name] = statistics.median(times) * 1e3
    return out


def run(files: int, size: int, workers: list[int], rounds: int, batch_size: int, aug_repeats: int) -> dict:
    from kdforge.data.image_folder import ImageFolderSource
    from kdforge.data.transforms import build_transform

    torch.set_num_threads(1)  # the main process only collects batches; workers get one thread each anyway
    today_cfg = proteus_augment(size)
    lean_cfg = dataclasses.replace(today_cfg, device_augment=True)
    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), files)
        source = ImageFolderSource(ImageFolderSource.Config(root=tmp))
        datasets = {"today": source.build("train", build_transform(today_cfg, train=True)),
                    "lean": source.build("train", build_transform(lean_cfg, train=True))}
        assert datasets["lean"][0]["image"].dtype == torch.uint8 and datasets["today"][0]["image"].is_floating_point()
        per_workers = {}
        for k in workers:
            rates: dict[str, list[float]] = {"today": [], "lean": []}
            for r in range(rounds):
                for name in (("today", "lean") if r % 2 == 0 else ("lean", "today")):
                    rates[name].append(loader_rate(datasets[name], k, batch_size))
            ratios = [b / a for a, b in zip(rates["today"], rates["lean"])]
            per_workers[str(k)] = {
                "today_img_per_s_per_worker": statistics.median(rates["today"]),
                "lean_img_per_s_per_worker": statistics.median(rates["lean"]),
                "ratio_lean_over_today_median": statistics.median(ratios),
                "ratio_min": min(ratios), "ratio_max": max(ratios),
                "rounds": {"today": rates["today"], "lean": rates["lean"]},
            }
        choices = decode_choices(paths[: min(len(paths), 48)], size, repeats=3)
    torch.set_num_threads(os.cpu_count() or 1)
    aug_ms = device_augment_cpu(lean_cfg, batch=64, repeats=aug_repeats)
    worst = min(v["ratio_lean_over_today_median"] for v in per_workers.values())
    return {
        "benchmark": "data_path",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "python": sys.version.split()[0], "torch": torch.__version__},
        "setup": {"files": files, "jpeg": "500 x 375, quality 90, procedural", "image_size": size,
                  "batch_size": batch_size, "rounds": rounds, "augment_today": dataclasses.asdict(today_cfg),
                  "lean": "augment.device_augment = true: decode_jpeg + uint8 crop and flip in the workers"},
        "workers": per_workers,
        "device_augment_cpu_ms_per_img_at_batch_64": aug_ms,
        "device_augment_cpu_threads": torch.get_num_threads(),
        "decode_choices_ms_per_img": choices,
        "done_when_3x_per_worker": worst >= 3.0,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a harness check: few files, one round, 1 worker")
    parser.add_argument("--files", type=int, default=None, help="JPEGs to generate (default 160; --quick 16)")
    parser.add_argument("--size", type=int, default=224, help="output side in pixels (the Proteus recipe's 224)")
    parser.add_argument("--workers", type=int, nargs="+", default=None, help="worker counts (default 1 2)")
    parser.add_argument("--rounds", type=int, default=None, help="interleaved rounds per worker count (default 4)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "data_path_cpu.json")
    args = parser.parse_args(argv)
    files = args.files or (16 if args.quick else 160)
    result = run(files=files, size=args.size, workers=args.workers or ([1] if args.quick else [1, 2]),
                 rounds=args.rounds or (1 if args.quick else 4), batch_size=8 if args.quick else 16,
                 aug_repeats=2 if args.quick else 5)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    for k, v in result["workers"].items():
        print(f"{k} worker(s): today {v['today_img_per_s_per_worker']:.1f} img/s/worker, lean "
              f"{v['lean_img_per_s_per_worker']:.1f}: x{v['ratio_lean_over_today_median']:.2f} "
              f"(rounds {v['ratio_min']:.2f}..{v['ratio_max']:.2f})")
    print(f"DeviceAugment on the CPU: {result['device_augment_cpu_ms_per_img_at_batch_64']:.2f} ms/img at batch 64")
    print("decode + crop routes (ms/img): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                      result["decode_choices_ms_per_img"].items()))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
