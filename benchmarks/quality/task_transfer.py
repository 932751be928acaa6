"""The claims of papers/001 in miniature: on an embedded task with 10 labels per class and an unlabelled
task-related pool, the student's test top-1 after

  (i)   fine-tuning from scratch on the labelled images;
  (ii)  task-agnostic transfer (the raw foundation model's global features distilled with contrastive.global on
        the pool), then fine-tuning;
  (iii) task-oriented transfer (the foundation model fine-tuned on the task, its predictions distilled with KL on
        the pool), then fine-tuning;
  (iv)  (iii) from a linear-probed instead of a fine-tuned foundation model;

each for several seeds, as a table (mean and spread) and JSON. Every arm is plugins/task_transfer.toml's smoke
profile (a narrow ResNet-10 student, the embedded teacher trained on six procedural shapes as the foundation model,
six other shapes as the task) run through ``kdforge train`` with a few ``--set`` overrides, so the arms differ
only in what they say. The papers' direction is (iii) > (ii) > (i); the table reports what it measures.

    python -m benchmarks.quality.task_transfer                       # 3 seeds, ~10 min on 2 CPU cores
    python -m benchmarks.quality.task_transfer --seeds 0 --out /tmp/q.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "plugins" / "task_transfer.toml"
FOUNDATION = "{plugin='embedded', data={plugin='procedural', num_classes=6}}"

#: arm -> list of (stage to run or None for all, --set overrides)
ARMS: dict[str, list[tuple[str | None, list[str]]]] = {
    "(i) scratch, fine-tuned": [
        ("finetune", ["stages.finetune.student.init_from=none"]),
    ],
    "(ii) task-agnostic transfer, fine-tuned": [
        (stage, [f"stages.distill.teacher={FOUNDATION}",
                 "stages.distill.losses={contrastive={plugin='contrastive.global', dim=128}}"])
        for stage in ("distill", "finetune")
    ],
    "(iii) task-oriented transfer (fine-tuned teacher), fine-tuned": [
        (None, []),
    ],
    "(iv) task-oriented transfer (probed teacher), fine-tuned": [
        (None, ["stages.adapt.student.tune='head'", "stages.adapt.optim.lr=1e-2"]),
    ],
}


def run_arm(steps, seed: int, out: Path) -> dict:
    """Run one arm for one seed in ``out``; returns {stage: its summary}."""
    for stage, overrides in steps:
        cmd = [sys.executable, "-m", "kdforge.cli", "train", str(RECIPE), "--profile", "smoke", "--no-progress",
               "--output-dir", str(out), "--set", f"run.seed={seed}"]
        for o in overrides:
            cmd += ["--set", o]
        if stage is not None:
            cmd += ["--stage", stage]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
        if res.returncode != 0:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())["stages"]


def spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quality_task_transfer.json")
    args = parser.parse_args(argv)

    import torch

    rows: dict[str, dict] = {}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for arm, steps in ARMS.items():
            student, teacher = [], []
            for seed in args.seeds:
                stages = run_arm(steps, seed, Path(tmp) / f"{len(rows)}-{seed}")
                student.append(stages["finetune"]["student_classifier_top1_after"])
                if "adapt" in stages:
                    teacher.append(stages["adapt"]["student_classifier_top1_after"])
                print(f"{arm} seed {seed}: student {student[-1]:.1f}"
                      + (f", adapted teacher {teacher[-1]:.1f}" if teacher else ""), file=sys.stderr)
            rows[arm] = {"student_top1": student, "student_top1_mean": statistics.mean(student),
                         "student_top1_std": spread(student)}
            if teacher:
                rows[arm].update(teacher_top1=teacher, teacher_top1_mean=statistics.mean(teacher))
    result = {
        "benchmark": "papers/001 in miniature (benchmarks/quality/task_transfer.py)",
        "recipe": "plugins/task_transfer.toml --profile smoke",
        "task": "procedural shapes 6-11 (6 classes), 10 labelled images per class, 3000 unlabelled task images as "
                "the transfer set, 1000 test images; foundation model: the embedded teacher trained on shapes 0-5",
        "seeds": args.seeds, "arms": rows,
        "date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads", "torch": torch.__version__, "wall_s": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| arm | student test top-1 (%), mean ± std over seeds {args.seeds} | adapted teacher |")
    print("| --- | --- | --- |")
    for arm, row in rows.items():
        teacher = f"{row['teacher_top1_mean']:.1f}" if "teacher_top1_mean" in row else "-"
        print(f"| {arm} | {row['student_top1_mean']:.1f} ± {row['student_top1_std']:.1f} | {teacher} |")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
