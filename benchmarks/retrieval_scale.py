"""The measured rates behind the README's billion-image retrieval arithmetic, on the machine it runs on:

- the FLOPs of one gallery crop through an encoder (ViT-L/14 at 224 px, the papers/001 encoders' architecture,
  random weights; counted with torch.utils.flop_counter) and its forward throughput here;
- exact search (kdforge.retrieval.search, backend "knn": kdforge.ops.knn streaming an fp16 memmap) over a
  gallery of G clustered unit rows of width D = 1536 (two 768-wide encoders, concatenated), Q queries: seconds, GFLOP/s
  (2 Q G D per search), GB/s of gallery read;
- the same with faiss flat, and faiss IVF-PQ (its bytes per vector, search time and recall@k against exact).

    python -m benchmarks.retrieval_scale                      # G = 100k, Q = 16: minutes on 2 CPU cores
    python -m benchmarks.retrieval_scale --rows 2000000 --out benchmarks/results/retrieval_scale_<device>.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def encoder_cost(images: int) -> dict:
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    model = timm.create_model("vit_large_patch14_clip_224", pretrained=False, num_classes=0).eval()
    x = torch.rand(1, 3, 224, 224)
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        model(x)
    flops = counter.get_total_flops()
    with torch.inference_mode():
        model(torch.rand(2, 3, 224, 224))  # warm-up
        t0 = time.perf_counter()
        model(torch.rand(images, 3, 224, 224))
        seconds = time.perf_counter() - t0
    return {"model": "vit_large_patch14_clip_224 (random weights)", "gflop_per_image": flops / 1e9,
            "cpu_img_per_s": images / seconds, "cpu_gflop_per_s": flops * images / seconds / 1e9}


#: Embeddings cluster (images of one kind lie together): rows are one of CLUSTERS unit centres plus noise, at a
#: cosine of about 0.9 to their centre. Uniform random rows would be the worst case of every approximate index.
CLUSTERS = 1000


def _clustered(gen, centres, n: int):
    import numpy as np

    rows = centres[gen.integers(0, len(centres), n)]
    rows = rows + 0.5 * gen.standard_normal(rows.shape, dtype=np.float32) / np.sqrt(centres.shape[1])
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def search_cost(rows: int, dim: int, queries: int, k: int, tmp: Path) -> dict:
    import numpy as np
    import torch

    from kdforge.retrieval.nearest import search

    gen = np.random.default_rng(0)
    centres = gen.standard_normal((CLUSTERS, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    shards = []
    per = 250_000
    for s in range(0, rows, per):
        n = min(per, rows - s)
        arr = np.lib.format.open_memmap(tmp / f"s{s}.npy", mode="w+", dtype=np.float16, shape=(n, dim))
        for c in range(0, n, 50_000):
            block = _clustered(gen, centres, min(50_000, n - c))
            arr[c : c + len(block)] = block
        arr.flush()
        shards.append(np.load(tmp / f"s{s}.npy", mmap_mode="r"))
    q = torch.from_numpy(_clustered(np.random.default_rng(1), centres, queries))
    out: dict = {"rows": rows, "dim": dim, "queries": queries, "k": k, "gallery_gb_fp16": rows * dim * 2 / 1e9}
    flops = 2 * queries * rows * dim
    t0 = time.perf_counter()
    _, exact_i = search(q, shards, k)
    sec = time.perf_counter() - t0
    out["knn"] = {"seconds": sec, "gflop_per_s": flops / sec / 1e9, "gb_per_s": out["gallery_gb_fp16"] / sec}
    try:
        import faiss  # noqa: F401
    except ImportError:
        return out
    t0 = time.perf_counter()
    search(q, shards, k, backend="faiss", index="flat")
    sec = time.perf_counter() - t0
    out["faiss_flat"] = {"seconds_build_and_search": sec, "bytes_per_vector": dim * 4}
    t0 = time.perf_counter()
    _, pq_i = search(q, shards, k, backend="faiss", index="ivfpq", pq_m=64, nlist=64, nprobe=16)
    sec = time.perf_counter() - t0
    recall = sum(len(set(a) & set(b)) for a, b in zip(exact_i.tolist(), pq_i.tolist())) / exact_i.numel()
    out["faiss_ivfpq"] = {"seconds_train_build_and_search": sec, "pq_m": 64, "nlist": 64, "nprobe": 16,
                          "bytes_per_vector": 64 + 8, f"recall_at_{k}": recall}
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--queries", type=int, default=16)
    parser.add_argument("--k", type=int, default=64)
    parser.add_argument("--images", type=int, default=8, help="images of the encoder throughput measurement")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "retrieval_scale_cpu.json")
    args = parser.parse_args(argv)
    import torch

    result = {"encoder": encoder_cost(args.images)}
    print(json.dumps(result["encoder"]), file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        result["search"] = search_cost(args.rows, 1536, args.queries, args.k, Path(tmp))
    result.update(date=datetime.date.today().isoformat(), torch=torch.__version__, threads=torch.get_num_threads(),
                  machine=platform.processor() or platform.machine(),
                  device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
