"""papers/001's retrieval strategies in miniature: on the embedded gallery (100 other drawings of each of the task's six
shapes among 1800 distractors: the other procedural shapes, digits and photo crops), with the task's 10 labelled
images per class as queries and the same number N of retrieved crops, for query_balanced (the paper's), best_matches
and random:

- class purity: the fraction of retrieved crops cut from an image of one of the task's classes;
- class match: the fraction cut from an image of the class of the query it was retrieved for;
- class balance: the normalised entropy of the task classes among the retrieved task crops (1 = every class alike),
  and the smallest class's share of them relative to a uniform share;
- the downstream student's test top-1 when the retrieved set is the transfer set of task-oriented distillation
  (adapt the foundation model, distil its predictions on the set, fine-tune on the 10 labels per class).

Every arm is ``kdforge train plugins/retrieval.toml --profile smoke`` (all four stages) with ``retrieve.strategy``
set, for several seeds (each seed draws other crops, another random set and other initialisations); the table gives
mean ± std over seeds and the JSON every run's numbers. papers/001 finds query-balanced best; the table reports
what it measures.

    python -m benchmarks.quality.retrieval                           # 3 seeds, ~20 min on 2 CPU cores
    python -m benchmarks.quality.retrieval --seeds 0 --out /tmp/r.json
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import math
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
RECIPE = REPO / "plugins" / "retrieval.toml"
STRATEGIES = ("query_balanced", "best_matches", "random")
TASK_KINDS = ("task", "dup", "leak")  # demo gallery files cut from a task-class image: <kind>-<class>-<n>.png


def set_quality(manifest: Path, num_classes: int) -> dict:
    """Purity, class match and balance of a retrieved set (manifest.jsonl of the demo gallery)."""
    records = [json.loads(line) for line in manifest.read_text().splitlines()]
    classes = []
    match = 0
    for r in records:
        kind, label = Path(r["source"]).name.split("-")[:2]
        if kind in TASK_KINDS:
            classes.append(int(label))
            match += int(label) == r["query_label"]
    counts = collections.Counter(classes)
    shares = [counts.get(c, 0) / max(len(classes), 1) for c in range(num_classes)]
    entropy = -sum(p * math.log(p) for p in shares if p > 0) / math.log(num_classes)
    return {"n": len(records), "purity": len(classes) / len(records), "class_match": match / len(records),
            "balance_entropy": entropy, "smallest_class_vs_uniform": min(shares) * num_classes,
            "per_class": [counts.get(c, 0) for c in range(num_classes)],
            "mean_similarity": statistics.mean(r["similarity"] for r in records)}


def run(strategy: str, seed: int, out: Path, gallery_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "kdforge.cli", "train", str(RECIPE), "--profile", "smoke", "--no-progress",
           "--output-dir", str(out), "--set", f"run.seed={seed}", "--set", f"retrieve.seed={seed}",
           "--set", f"retrieve.strategy='{strategy}'", "--set", f"retrieve.gallery_dir='{gallery_dir}'"]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
    stages = json.loads((out / "summary.json").read_text())["stages"]
    row = set_quality(out / "retrieve" / "manifest.jsonl", 6)
    row.update(student_top1=stages["finetune"]["student_classifier_top1_after"],
               distilled_top1=stages["distill"]["student_classifier_top1_after"],
               teacher_top1=stages["adapt"]["student_classifier_top1_after"],
               duplicates_flagged=stages["retrieve"]["duplicates_flagged"],
               leaks_flagged=stages["retrieve"]["leaks_flagged"])
    return row


def _mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES), choices=STRATEGIES)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "quality_retrieval.json")
    args = parser.parse_args(argv)

    import torch

    runs: dict[str, list[dict]] = {s: [] for s in args.strategies}
    t0 = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for strategy in args.strategies:  # the seed's gallery is embedded once, for its first strategy
                row = run(strategy, seed, Path(tmp) / f"{strategy}-{seed}", Path(tmp) / f"gallery-{seed}")
                runs[strategy].append(row)
                print(f"{strategy} seed {seed}: purity {row['purity']:.3f}, match {row['class_match']:.3f}, balance "
                      f"{row['balance_entropy']:.3f}, student {row['student_top1']:.1f}", file=sys.stderr)
    keys = ("purity", "class_match", "balance_entropy", "smallest_class_vs_uniform", "distilled_top1",
            "student_top1")
    summary = {s: {k: _mean_std([r[k] for r in rows]) for k in keys} for s, rows in runs.items()}
    result = {
        "benchmark": "papers/001 retrieval strategies in miniature (benchmarks/quality/retrieval.py)",
        "recipe": "plugins/retrieval.toml --profile smoke, retrieve.strategy per arm",
        "setup": "gallery: demo_gallery (600 images of the task's 6 shapes, 1800 distractors, 5 planted leaks and "
                 "5 near-duplicates), 4 crops per image; queries: 10 labelled images per class; N = 600; encoders: "
                 "two embedded teachers (mean cosine); then adapt, distil on the retrieved set, fine-tune; test "
                 "top-1 on 1000 held-out images",
        "seeds": args.seeds, "runs": runs,
        "summary": {s: {k: {"mean": m, "std": sd} for k, (m, sd) in row.items()} for s, row in summary.items()},
        "date": datetime.date.today().isoformat(), "machine": f"{platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads", "torch": torch.__version__, "wall_s": round(time.time() - t0, 1),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"| strategy (N = 600, seeds {args.seeds}) | class purity | class match | balance (entropy) | smallest class "
          "/ uniform | distilled top-1 (%) | student top-1 after fine-tuning (%) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for s, row in summary.items():
        cells = [f"{m:.3f} ± {sd:.3f}" for m, sd in (row[k] for k in keys[:4])]
        cells += [f"{m:.1f} ± {sd:.1f}" for m, sd in (row[k] for k in keys[4:])]
        print(f"| {s} | " + " | ".join(cells) + " |")
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
