"""``kdforge retrieve``: from a task's few labelled images and a large gallery to a transfer set that training reads
(papers/001, section 3.4 and appendix B).

1. The gallery is embedded once (:mod:`kdforge.retrieval.store`): image level (a centred square per image) or crop
   level (``crops`` random resized crops with RandAugment per image), by one or more encoders (teacher plugins);
   fp16 shards, resumable, shared out over torchrun processes.
2. The queries (the task's labelled images, resized and centre-cropped; or, with ``text_queries``, one prompt per
   class name through each encoder's text tower) are embedded by the same encoders; a (query, entry) score is the
   mean of the encoders' cosine similarities.
3. Search: each query's K nearest entries, exact and streamed over the shards (kdforge.ops.knn) or with faiss
   (flat, IVF, IVF-PQ), then the strategy picks ``n`` entries: query_balanced (the paper's), best_matches, random.
4. Cleaning: the selected entries' source images are compared (the mean similarity over encoders, after resize and
   centre crop); duplicates (> ``dedup_threshold``, the paper's 0.99) are clustered and one entry per cluster is
   kept, the most similar to its query; possible leaks (the largest similarity over encoders to any image of the
   task's splits > ``leak_threshold``, 0.95) are flagged with their 5 nearest task images. Flagged entries are dropped
   (``drop_duplicates``, ``drop_leaks``) and the selection is refilled from the next neighbours until ``n`` clean
   entries remain (or the gallery runs out).
5. Output, in the output directory: ``manifest.jsonl`` (one retrieved entry per line: source file, image and crop
   number, crop box, augmentation operations, query, its label, similarity, strategy), ``retrieval.json`` (what
   was retrieved from: gallery table, gallery directory, output size, classes), ``report.json`` (every flagged
   entry with its reason and nearest task images) and ``summary.json``. The ``retrieved`` data source reads the
   manifest and remakes each crop exactly.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from torch import Tensor

from kdforge.data.shards import random_access
from kdforge.engine.checkpoint import atomic_path
from kdforge.errors import DataError, KdforgeError, RecipeError
from kdforge.ranges import ImageSide, NonNegativeInt, PositiveInt, Range, Seed, Workers
from kdforge.retrieval.crops import centre_params, remake
from kdforge.retrieval.store import GallerySpec, GalleryStore, embed_images, embed_store

log = logging.getLogger("kdforge.retrieval")

__all__ = ["RetrieveConfig", "run_retrieval"]

MANIFEST = "manifest.jsonl"
HEADER = "retrieval.json"
REPORT = "report.json"

_Cosine = Annotated[float, Range(ge=-1, le=1)]


@dataclasses.dataclass
class RetrieveConfig:
    gallery: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Data-source table of the gallery (image_folder, webdataset, demo_gallery, ...); its train split is searched."""
    encoders: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Encoders by label, each a teacher table (plugin = "timm", ...): one, or two as papers/001 (OpenCLIP ViT-L/14
    trained on OpenAI's data and on DataComp-1B); a score is the mean of their cosine similarities."""
    features: Literal["cls", "mean_patch"] = "cls"
    """What of an encoder's output is the embedding: its CLS (pooled) vector or its mean patch token."""
    queries: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Data-source table of the query images (empty: the recipe's [data], the task's labelled images)."""
    query_split: str = "train"
    """The split of `queries` that is the query set."""
    text_queries: bool = False
    """Query with the class names instead of the images: one query per class, its name in each encoder's prompt
    template through the encoder's text tower (CLIP encoders: plugin = "open_clip")."""
    class_names: list[str] = dataclasses.field(default_factory=list)
    """Class names for text queries (empty: the classes of `queries`, e.g. its class folders)."""
    level: Literal["image", "crop"] = "crop"
    """Gallery entries: one centred square per image, or `crops` random resized crops with RandAugment (B.2)."""
    crops: PositiveInt = 10
    """Crops per gallery image at crop level (papers/001: 10)."""
    crop_scale: tuple[float, float] = (0.08, 1.0)
    """Area range of a crop, as a fraction of the image (RandomResizedCrop's scale)."""
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect-ratio range of a crop (RandomResizedCrop's ratio)."""
    rand_augment_ops: Annotated[int, Range(ge=0, le=8)] = 2
    """RandAugment operations per crop (0: none)."""
    rand_augment_magnitude: Annotated[float, Range(ge=0, le=10)] = 9.0
    """RandAugment magnitude, 0-10 (timm's m9)."""
    image_size: ImageSide = 224
    """Side of every gallery entry and query, in pixels, as the encoders see them and as the manifest's crops are
    remade."""
    n: PositiveInt = 1000
    """How many entries to retrieve."""
    strategy: Literal["query_balanced", "best_matches", "random"] = "query_balanced"
    """How to pick n entries from the queries' neighbours: the paper's query-balanced rule, or a baseline."""
    neighbors: NonNegativeInt = 0
    """Neighbours searched per query (0: enough for n, found automatically)."""
    backend: Literal["knn", "faiss"] = "knn"
    """Search: exact, streamed over the shards (kdforge.ops.knn), or faiss."""
    faiss_index: Literal["flat", "ivf", "ivfpq"] = "flat"
    """faiss index: exact flat; IVF; IVF-PQ (codes only in memory, for galleries beyond it)."""
    nlist: NonNegativeInt = 0
    """IVF lists (0: about 4 sqrt(entries))."""
    nprobe: PositiveInt = 16
    """IVF lists probed per query."""
    pq_m: NonNegativeInt = 0
    """IVF-PQ sub-quantisers (0: chosen from the width)."""
    seed: Seed = 0
    """Seed of the crops, the random strategy and the query-balanced tie-breaking."""
    gallery_dir: str = ""
    """Where the gallery's embeddings go (empty: <output>/gallery); a gallery embedded once serves every task that
    uses the same gallery, encoders and crop settings."""
    shard_images: PositiveInt = 4096
    """Gallery images per embedding shard (the unit of resumption and of work per process)."""
    batch_size: PositiveInt = 256
    """Entries per encoder forward."""
    num_workers: Workers = 0
    """DataLoader workers decoding and cropping gallery images."""
    dedup_threshold: _Cosine = 0.99
    """Two retrieved entries whose source images are more similar (mean over encoders) are duplicates (B.3)."""
    leak_threshold: _Cosine = 0.95
    """A retrieved entry whose source image is this similar to a task image (largest over encoders) is a possible
    leak (B.4)."""
    leak_data: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Data-source table of the task data set whose every split is checked for leaks (empty: `queries`)."""
    drop_duplicates: bool = True
    """Drop all but one entry of each cluster of duplicates (and refill)."""
    drop_leaks: bool = True
    """Drop possible leaks (and refill); off, they stay in the manifest and are only reported."""

    def __post_init__(self) -> None:
        if not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 1:
            raise ValueError(f"crop_scale must be (lo, hi) with 0 < lo <= hi <= 1, got {tuple(self.crop_scale)}")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise ValueError(f"crop_ratio must be (lo, hi) with 0 < lo <= hi, got {tuple(self.crop_ratio)}")


def retrieve_config(table: dict[str, Any], where: str = "retrieve") -> RetrieveConfig:
    """The [retrieve] table as a :class:`RetrieveConfig`, its component tables checked against their plugins."""
    from kdforge.plugins import get_registry
    from kdforge.recipe.schema import build

    cfg = build(RetrieveConfig, table, where)
    registry = get_registry()
    if not cfg.gallery:
        raise RecipeError(f"[{where}] needs gallery = {{plugin = \"image_folder\", root = \"/data/gallery\"}} (the "
                          "images to search)")
    if not cfg.encoders:
        raise RecipeError(f"[{where}] needs at least one encoder: [{where}.encoders.NAME] plugin = \"timm\" ...")
    components = [("data_sources", cfg.gallery, f"{where}.gallery")]
    components += [("teachers", t, f"{where}.encoders.{label}") for label, t in cfg.encoders.items()]
    components += [("data_sources", t, f"{where}.{k}") for k, t in (("queries", cfg.queries),
                                                                     ("leak_data", cfg.leak_data)) if t]
    for kind, table_, at in components:
        if not isinstance(table_, dict) or not isinstance(table_.get("plugin"), str):
            raise RecipeError(f"[{at}] needs `plugin = \"...\"` naming one of {', '.join(registry.names(kind))}")
        rest = dict(table_)
        build(registry.get(kind, rest.pop("plugin"), at).Config, rest, at)
    return cfg


# ------------------------------------------------------------------------------------------------ the pipeline


def _encoders(cfg: RetrieveConfig, device: torch.device) -> tuple[list[tuple[str, Any]], dict[str, Any]]:
    """[(label, images -> embeddings)] for embed_images, and the encoder models by label."""
    from kdforge.eval import Encoder
    from kdforge.plugins import get_registry

    registry = get_registry()
    out, models = [], {}
    for label, table in cfg.encoders.items():
        model = registry.create("teachers", table, f"retrieve.encoders.{label}").to(device).eval()
        encoder = Encoder(model, cfg.features, role=f"encoder {label}")
        out.append((label, lambda x, e=encoder: e(x.to(device, non_blocking=True))))
        models[label] = model
    return out, models


def _check_text_towers(cfg: RetrieveConfig, models: dict[str, Any]) -> None:
    for label, model in models.items():
        if not callable(getattr(model, "encode_text", None)):
            raise KdforgeError(f"retrieve.text_queries = true, but encoder '{label}' ({cfg.encoders[label]['plugin']})"
                               " has no text tower (encode_text): use CLIP encoders (plugin = \"open_clip\") or "
                               "image queries")


def _text_queries(cfg: RetrieveConfig, models: dict[str, Any], classes: list[str]) -> tuple[Tensor, list[str]]:
    """Rows of one text query per class (each encoder's text tower on its prompt for the class name) and the
    prompts; KdforgeError when an encoder has no text tower or there are no class names."""
    from kdforge.retrieval.store import combine

    if not classes:
        raise KdforgeError("retrieve.text_queries = true needs class names: set retrieve.class_names, or use "
                           "queries whose data source names its classes (class folders)")
    _check_text_towers(cfg, models)
    rows, prompts = [], None
    for model in models.values():
        texts = model.class_prompts(classes) if callable(getattr(model, "class_prompts", None)) else list(classes)
        prompts = prompts or texts
        with torch.inference_mode():
            rows.append(model.encode_text(texts).float().cpu())
    return combine(rows), prompts


def _raw_dataset(table: dict[str, Any], split: str, where: str) -> tuple[Any, torch.utils.data.Dataset]:
    from kdforge.plugins import get_registry

    source = get_registry().create("data_sources", table, where)
    if split not in getattr(source, "splits", ("train", "val")):
        raise DataError(f"[{where}] has splits {', '.join(source.splits)}, not '{split}'")
    ds = random_access(source, split, None)  # webdataset shards: indexed (IndexedShards), not streamed
    if isinstance(ds, torch.utils.data.IterableDataset) or not hasattr(ds, "__getitem__"):
        raise DataError(
            f"[{where}] ({table.get('plugin')}) reads its images as a stream; retrieval needs each image by its "
            "number (to remake a retrieved crop later): use an image folder, or local webdataset shards (indexed)")
    return source, ds


def _embed_images(encoders, dataset, size: int, batch: int, desc: str, show: bool) -> tuple[Tensor, Tensor, list]:
    """Rows (image level) of every readable image of ``dataset``, their labels, and [index, path] of unreadable
    ones."""
    from tqdm.auto import tqdm

    from kdforge.data import Skipped
    from kdforge.retrieval.store import source_of

    rows, labels, kept, skipped = [], [], [], []
    pending: list[Tensor] = []
    pending_labels: list[int] = []

    def flush():
        if pending:
            rows.append(embed_images(encoders, torch.stack(pending))[0])
            labels.extend(pending_labels)
            pending.clear()
            pending_labels.clear()

    for i in tqdm(range(len(dataset)), desc=desc, unit="img", disable=not show or not sys.stderr.isatty()):
        item = dataset[i]
        if isinstance(item, Skipped):
            skipped.append([i, item.path, item.reason])
            continue
        image = item["image"]
        pending.append(remake(image, centre_params(int(image.shape[-2]), int(image.shape[-1])), size))
        pending_labels.append(int(item["label"]))
        kept.append([i, source_of(dataset, i)])
        if len(pending) == batch:
            flush()
    flush()
    out = torch.cat(rows) if rows else torch.zeros(0, 0)
    return out, torch.tensor(labels, dtype=torch.long), kept, skipped


def _search(cfg: RetrieveConfig, queries: Tensor, store: GalleryStore, k: int) -> tuple[Tensor, Tensor]:
    from kdforge.retrieval.nearest import search

    return search(queries, store.shards, k, metric="ip", backend=cfg.backend, index=cfg.faiss_index,
                  nlist=cfg.nlist, nprobe=cfg.nprobe, pq_m=cfg.pq_m, seed=cfg.seed)


def _compact(scores: Tensor, neighbors: Tensor, banned: set[int]) -> tuple[Tensor, Tensor]:
    """The neighbour lists without banned ids, each row keeping its order, cut to the shortest row's length."""
    if not banned:
        return scores, neighbors
    ok = ~torch.isin(neighbors, torch.tensor(sorted(banned), dtype=torch.long)) & (neighbors >= 0)
    width = int(ok.sum(dim=1).min())
    order = torch.sort((~ok).to(torch.int8), dim=1, stable=True).indices[:, :width]
    return scores.gather(1, order), neighbors.gather(1, order)


def _select(cfg: RetrieveConfig, scores: Tensor, neighbors: Tensor, n: int, num_entries: int,
            banned: set[int]) -> Tensor:
    from kdforge.retrieval.selection import best_matches, query_balanced

    if cfg.strategy == "random":
        return _random_draw(num_entries, n, banned, cfg.seed)
    s, nb = _compact(scores, neighbors, banned)
    if nb.shape[1] == 0:
        raise ValueError("no neighbours left after the dropped entries")
    if cfg.strategy == "query_balanced":
        return query_balanced(nb, n, seed=cfg.seed)
    return best_matches(nb, s, n, metric="ip")


def _random_draw(num_entries: int, n: int, banned: set[int], seed: int) -> Tensor:
    """The random baseline: the first n distinct, not banned ids of a seeded stream of uniform draws (a stream, not
    a permutation of a gallery of billions; a stream's prefix does not change when more is drawn, so replacing a
    dropped id keeps the others). Ascending; ValueError when fewer than n are left."""
    if n > num_entries - len(banned):
        raise ValueError(f"random: cannot draw n={n} from {num_entries - len(banned)} entries")
    draws = 2 * n + len(banned) + 16
    while True:
        stream = torch.randint(num_entries, (draws,), generator=torch.Generator().manual_seed(int(seed)))
        ids = [i for i in dict.fromkeys(stream.tolist()) if i not in banned]  # first draws first, no repeats
        if len(ids) >= n:
            return torch.tensor(ids[:n], dtype=torch.long).sort().values
        draws *= 2


def _source_rows(encoders, store: GalleryStore, gallery_ds, entries: list[int], size: int, batch: int,
                 cache: dict[int, Tensor]) -> Tensor:
    """Image-level rows of the entries' source images (the gallery's own rows at image level), memoised by
    image."""
    items = [store.entry(e)[0] for e in entries]
    if store.spec.level == "image":
        return store.rows(entries)
    todo = sorted({i for i in items if i not in cache})
    for start in range(0, len(todo), batch):
        chunk = todo[start : start + batch]
        images = []
        for i in chunk:
            image = gallery_ds[i]["image"]
            images.append(remake(image, centre_params(int(image.shape[-2]), int(image.shape[-1])), size))
        rows = embed_images(encoders, torch.stack(images))[0]
        cache.update(zip(chunk, rows))
    return torch.stack([cache[i] for i in items]) if items else torch.zeros(0, store.width)


def _blocks(rows: Tensor, widths: list[int]) -> list[Tensor]:
    """Each encoder's block of combined rows (unit rows again)."""
    out, start = [], 0
    for w in widths:
        out.append(torch.nn.functional.normalize(rows[:, start : start + w], dim=1))
        start += w
    return out


def _flag(cfg: RetrieveConfig, picked: list[int], best: dict[int, float], sources: Tensor, widths: list[int],
          task_rows: Tensor, task_sources: list) -> tuple[list[dict], list[dict]]:
    """(duplicates, leaks) among the picked entries: each a report record; the entries to drop are the
    duplicates' non-kept members and the leaks."""
    from kdforge.retrieval.dedup import duplicate_clusters

    dups: list[dict] = []
    if len(picked) > 1:
        labels = duplicate_clusters(sources, threshold=cfg.dedup_threshold, k=16).tolist()
        clusters: dict[int, list[int]] = {}
        for j, lab in enumerate(labels):
            clusters.setdefault(lab, []).append(j)
        for members in clusters.values():
            if len(members) < 2:
                continue
            keep = max(members, key=lambda j: (best[picked[j]], -picked[j]))
            for j in members:
                if j != keep:
                    dups.append({"entry": picked[j], "duplicate_of": picked[keep],
                                 "similarity": float(sources[j] @ sources[keep])})
    leaks: list[dict] = []
    if task_rows.numel() and len(picked):
        from kdforge.ops import knn

        mine, theirs = _blocks(sources, widths), _blocks(task_rows, widths)
        top = torch.stack([knn(m, t, 1, metric="ip")[0][:, 0] for m, t in zip(mine, theirs)], dim=1).amax(dim=1)
        flagged = (top > cfg.leak_threshold).nonzero().squeeze(1).tolist()
        if flagged:
            rows = sources[flagged]
            k = min(5, task_rows.shape[0])
            sim, near = knn(rows, task_rows, k, metric="ip")
            for j, f in enumerate(flagged):
                leaks.append({"entry": picked[f], "largest_similarity": float(top[f]),
                              "nearest_task_images": [{"index": task_sources[int(t)][0],
                                                       "source": task_sources[int(t)][1],
                                                       "similarity": float(s)}
                                                      for s, t in zip(sim[j].tolist(), near[j].tolist())]})
    return dups, leaks


def run_retrieval(recipe: Any, out_dir: str | Path, *, show_progress: bool = True,
                  echo=lambda line: print(line, file=sys.stderr)) -> dict[str, Any]:
    """Run the recipe's [retrieve] (see the module docstring) into ``out_dir``; returns the summary (also written
    to summary.json, which marks the retrieval finished). None-equivalent {} on torchrun ranks other than 0."""
    from kdforge.engine.distributed import pick_device

    cfg = retrieve_config(recipe.retrieve)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = pick_device(recipe.run.device)
    started = time.monotonic()
    torch.manual_seed(recipe.run.seed)
    encoders, models = _encoders(cfg, device)
    if cfg.text_queries:
        _check_text_towers(cfg, models)  # before hours of gallery embedding
    _, gallery_ds = _raw_dataset(cfg.gallery, "train", "retrieve.gallery")
    spec = GallerySpec(source=cfg.gallery, encoders=[[label, None] for label in cfg.encoders], level=cfg.level,
                       crops=cfg.crops if cfg.level == "crop" else 1, scale=list(cfg.crop_scale),
                       ratio=list(cfg.crop_ratio), num_ops=cfg.rand_augment_ops,
                       magnitude=cfg.rand_augment_magnitude, image_size=cfg.image_size, seed=cfg.seed,
                       items=len(gallery_ds), shard_images=cfg.shard_images,
                       models={"encoders": cfg.encoders, "features": cfg.features})
    gallery_dir = Path(cfg.gallery_dir) if cfg.gallery_dir else out_dir / "gallery"
    done = len(list(gallery_dir.glob("shard-*.json"))) if gallery_dir.is_dir() else 0
    echo(f"kdforge: embedding the gallery ({len(gallery_ds)} images x {spec.per_item} "
         f"{'crops' if cfg.level == 'crop' else 'entry'}, {spec.num_shards} shards"
         + (f", {done} done earlier" if done else "") + f") into {gallery_dir}")
    t0 = time.monotonic()
    store = embed_store(encoders, gallery_ds, gallery_dir, spec, batch_size=cfg.batch_size,
                        num_workers=cfg.num_workers, show_progress=show_progress)
    if store is None:
        return {}
    embed_seconds = time.monotonic() - t0
    widths = [w for _, w in store.spec.encoders]

    query_table = cfg.queries or recipe.data
    query_source, query_ds = _raw_dataset(query_table, cfg.query_split, "retrieve.queries")
    classes = list(cfg.class_names or getattr(query_source, "classes", None) or [])
    if cfg.text_queries:  # one query per class: its name through the encoders' text towers
        queries, prompts = _text_queries(cfg, models, classes)
        query_labels = torch.arange(len(classes))
        query_items, query_skipped = [[f"text:{p}", p] for p in prompts], []
    else:
        queries, query_labels, query_items, query_skipped = _embed_images(
            encoders, query_ds, cfg.image_size, cfg.batch_size, "queries", show_progress)
    if queries.shape[0] == 0:
        raise DataError("none of the query images could be read: nothing to retrieve for")
    leak_table = cfg.leak_data or query_table
    leak_source = query_source if leak_table is query_table else None
    task_rows, task_sources = [], []
    from kdforge.plugins import get_registry

    leak_source = leak_source or get_registry().create("data_sources", leak_table, "retrieve.leak_data")
    for split in getattr(leak_source, "splits", ("train", "val")):
        ds = random_access(leak_source, split, None)
        rows, _, kept, _ = _embed_images(encoders, ds, cfg.image_size, cfg.batch_size, f"task {split}",
                                         show_progress)
        task_rows.append(rows)
        task_sources += [[f"{split}:{i}", src] for i, src in kept]
    task = torch.cat([r for r in task_rows if r.numel()]) if any(r.numel() for r in task_rows) else torch.zeros(0)

    n, total = cfg.n, len(store)
    if n > total:
        raise KdforgeError(f"retrieve.n = {n} but the gallery has {total} entries: retrieve fewer")
    k = min(total, cfg.neighbors or max(8, 2 * math.ceil(n / queries.shape[0]) + 4))
    t0 = time.monotonic()
    scores, neighbors = _search(cfg, queries, store, k)
    search_seconds = time.monotonic() - t0
    # Cleaning runs over every candidate (each id in the neighbour lists; for random, each id drawn), so that the
    # one entry kept per cluster of duplicates is the cluster's best match whichever of its members the strategy
    # would pick; flagged entries are then excluded from the selection, which is made once over the clean ones.
    checked: list[int] = []
    cache: dict[int, Tensor] = {}
    dups: list[dict] = []
    leaks: list[dict] = []
    picked: list[int] = []
    for _ in range(16):
        candidates = picked if cfg.strategy == "random" else torch.unique(neighbors[neighbors >= 0]).tolist()
        fresh = sorted(set(candidates) - set(checked))
        if fresh or not checked:
            checked = sorted(set(checked) | set(fresh))
            best = dict(zip(checked, _nearest_query(store, checked, queries)[0].tolist()))
            sources = _source_rows(encoders, store, gallery_ds, checked, cfg.image_size, cfg.batch_size, cache)
            dups, leaks = _flag(cfg, checked, best, sources, widths, task, task_sources)
        banned = {d["entry"] for d in dups} if cfg.drop_duplicates else set()
        banned |= {x["entry"] for x in leaks} if cfg.drop_leaks else set()
        try:
            chosen = _select(cfg, scores, neighbors, n, total, banned).tolist()
        except ValueError:
            if k >= total:
                raise KdforgeError(f"the gallery has too few clean entries for n = {n} ({len(banned)} of "
                                   f"{len(checked)} candidates flagged): retrieve fewer") from None
            k = min(total, 2 * k)
            echo(f"kdforge: {len(banned)} of {len(checked)} candidates flagged; searching {k} neighbours per query")
            scores, neighbors = _search(cfg, queries, store, k)
            continue
        if chosen == picked or cfg.strategy != "random" or set(chosen) <= set(checked):
            picked = chosen
            break
        picked = chosen  # random: check the new draw
    else:
        raise KdforgeError("retrieval did not settle after 16 rounds of cleaning")
    sim, nearest = _nearest_query(store, picked, queries)
    dups_all = dups
    leaks_all = leaks

    records = []
    for e, s, q in zip(picked, sim.tolist(), nearest.tolist()):
        item, crop, params, source = store.entry(e)
        records.append({"entry": e, "source": source, "item": item, "crop": crop, "box": list(params.box),
                        "ops": [[a, b] for a, b in params.ops], "query": query_items[q][0],
                        "query_label": int(query_labels[q]), "similarity": round(float(s), 6),
                        "strategy": cfg.strategy})
    header = {"format": 1, "gallery": cfg.gallery, "gallery_dir": str(gallery_dir.resolve()),
              "image_size": cfg.image_size, "level": cfg.level, "strategy": cfg.strategy, "n": len(records),
              "encoders": list(cfg.encoders), "queries": query_table, "query_split": cfg.query_split,
              "num_queries": int(queries.shape[0]), "num_classes": getattr(query_source, "num_classes", None),
              "classes": classes}
    with atomic_path(out_dir / MANIFEST) as tmp:
        tmp.write_text("".join(json.dumps(r) + "\n" for r in records))
    with atomic_path(out_dir / HEADER) as tmp:
        tmp.write_text(json.dumps(header, indent=1))
    report = {"duplicates": [_described(store, d) for d in dups_all], "leaks": [_described(store, x) for x in leaks_all],
              "dropped": {"duplicates": cfg.drop_duplicates, "leaks": cfg.drop_leaks},
              "unreadable_gallery_images": store.skipped(), "unreadable_queries": query_skipped}
    with atomic_path(out_dir / REPORT) as tmp:
        tmp.write_text(json.dumps(report, indent=1))
    summary = {"retrieved": len(records), "gallery_images": spec.items, "gallery_entries": total,
               "queries": int(queries.shape[0]), "strategy": cfg.strategy, "level": cfg.level,
               "duplicates_flagged": len(dups_all), "leaks_flagged": len(leaks_all),
               "mean_similarity": float(np.mean([r["similarity"] for r in records])) if records else 0.0,
               "neighbors_searched": k, "embed_seconds": round(embed_seconds, 2),
               "search_seconds": round(search_seconds, 3), "seconds": round(time.monotonic() - started, 2)}
    with atomic_path(out_dir / "summary.json") as tmp:  # last: marks the retrieval finished
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def _nearest_query(store: GalleryStore, picked: list[int], queries: Tensor) -> tuple[Tensor, Tensor]:
    from kdforge.ops import knn

    if not picked:
        return torch.zeros(0), torch.zeros(0, dtype=torch.long)
    sim, idx = knn(store.rows(picked), queries, 1, metric="ip")
    return sim[:, 0], idx[:, 0]


def _described(store: GalleryStore, record: dict) -> dict:
    item, crop, _, source = store.entry(record["entry"])
    return {"source": source, "item": item, "crop": crop, **record}
