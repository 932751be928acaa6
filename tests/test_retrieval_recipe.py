"""Retrieval-augmented transfer sets end to end (issue 12): ``kdforge retrieve plugins/retrieval.toml --profile
smoke`` on the embedded gallery (task shapes among distractors, planted leaks and near-duplicates), then ``kdforge
train ... --resume`` distilling and fine-tuning from its manifest; the manifest remakes the embedded crops exactly;
cleaning flags what was planted; the command's bad inputs."""

import collections
import json
from pathlib import Path

import pytest
import torch
from cli_helpers import TINY, kdforge

from kdforge.plugins import create
from kdforge.retrieval.crops import remake
from kdforge.retrieval.pipeline import RetrieveConfig, _flag
from kdforge.retrieval.store import GalleryStore, embed_images

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "plugins" / "retrieval.toml"


def _manifest(run):
    return [json.loads(line) for line in (run / "retrieve" / "manifest.jsonl").read_text().splitlines()]


def _kind(record):
    return Path(record["source"]).name.split("-")[0]  # demo gallery file names: task-, shape-, digit-, leak-, ...


def test_retrieve_writes_a_manifest_of_n_entries_better_than_chance(retrieval_smoke_run):
    run = retrieval_smoke_run
    summary = json.loads((run / "retrieve" / "summary.json").read_text())
    records = _manifest(run)
    assert summary["retrieved"] == len(records) == 600
    assert summary["gallery_entries"] == summary["gallery_images"] * 4 and summary["queries"] == 60
    assert len({r["entry"] for r in records}) == 600
    for r in records[:50]:
        assert set(r) >= {"source", "item", "crop", "box", "ops", "query", "query_label", "similarity", "strategy"}
        assert r["strategy"] == "query_balanced" and 0 <= r["query_label"] < 6 and len(r["box"]) == 4
    # the task's shapes are 600 of the 2410 gallery images (25%); retrieval must find far more of them than that
    kinds = collections.Counter(_kind(r) for r in records)
    assert kinds["task"] / len(records) > 0.35, kinds
    # query-balanced: every one of the 60 queries contributes
    assert len({r["query"] for r in records}) >= 50


def test_planted_leaks_and_near_duplicates_are_flagged_and_dropped(retrieval_smoke_run):
    run = retrieval_smoke_run
    report = json.loads((run / "retrieve" / "report.json").read_text())
    leak_files = {Path(x["source"]).name for x in report["leaks"]}
    assert leak_files and all(name.startswith("leak-") for name in leak_files), leak_files  # no false alarm
    assert len(leak_files) >= 3  # of the 5 planted
    for x in report["leaks"]:
        assert len(x["nearest_task_images"]) == 5 and x["largest_similarity"] > 0.95
    entries = {d["entry"]: Path(d["source"]).name for d in report["duplicates"]}
    pairs = [(Path(d["source"]).name, d["duplicate_of"]) for d in report["duplicates"]]
    store = GalleryStore(run / "retrieve" / "gallery")
    planted = {name for name, kept in pairs if name.startswith("dup-")}
    planted |= {Path(store.entry(kept)[3]).name for name, kept in pairs if Path(store.entry(kept)[3]).name.startswith("dup-")}
    assert len(planted) >= 3, planted  # planted near-copies found among the candidates
    # crops of one image are duplicates of each other (their source images are one): one crop per image stays
    records = _manifest(run)
    assert len({r["item"] for r in records}) == len(records)
    assert not {r["entry"] for r in records} & (set(entries) | {x["entry"] for x in report["leaks"]})


def test_the_retrieved_source_remakes_the_embedded_crops(retrieval_smoke_run):
    run = retrieval_smoke_run
    store = GalleryStore(run / "retrieve" / "gallery")
    records = _manifest(run)
    source = create("data_sources", {"plugin": "retrieved", "manifest": str(run / "retrieve"), "labels": "query"},
                    "data")
    assert source.num_classes == 6
    ds = source.build("train", None)
    assert len(ds) == len(records)
    encoders = [(label, _encoder(table)) for label, table in store.spec.models["encoders"].items()]
    picks = [0, 17, 311, 599]
    pixels = torch.stack([(ds[i]["image"] * 255).round().to(torch.uint8) for i in picks])
    for i, p in zip(picks, pixels):
        assert ds[i]["label"] == records[i]["query_label"]
        item, _, params, _ = store.entry(records[i]["entry"])
        assert torch.equal(p, remake(ds.gallery[item]["image"], params, 32))
    rows, _ = embed_images(encoders, pixels)
    stored = store.rows([records[i]["entry"] for i in picks])
    torch.testing.assert_close(rows, stored, atol=2e-3, rtol=0)  # fp16 storage


def _encoder(table):
    from kdforge.eval import Encoder

    return Encoder(create("teachers", table, "encoder"), "cls")


def test_train_reads_the_manifest_the_retrieve_command_wrote(retrieval_smoke_run):
    run = retrieval_smoke_run
    stderr = (run.parent / "stderr.txt").read_text()
    assert "stage retrieve finished earlier" in stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["unfinished"] == []
    assert set(summary["stages"]) == {"retrieve", "adapt", "distill", "finetune"}
    distill = summary["stages"]["distill"]
    assert distill["steps"] > 0 and distill["skipped_images"] == 0
    recipe = (run / "distill" / "recipe.toml").read_text()
    assert 'plugin = "retrieved"' in recipe and str(run / "retrieve") in recipe
    assert summary["stages"]["finetune"]["student_classifier_top1_after"] > 100 / 6  # above chance


def test_flag_finds_planted_duplicates_and_leaks():
    g = torch.Generator().manual_seed(0)
    task = torch.nn.functional.normalize(torch.randn(20, 16, generator=g), dim=1)
    picked_rows = torch.nn.functional.normalize(torch.randn(12, 16, generator=g), dim=1)
    picked_rows[3] = picked_rows[8] + 1e-4  # near-duplicates (source similarity > 0.99)
    picked_rows[5] = task[7] * 0.999 + 0.001  # a leak of task image 7
    picked_rows = torch.nn.functional.normalize(picked_rows, dim=1)
    rows = torch.cat([picked_rows[:, :8], picked_rows[:, 8:]], dim=1)
    picked = list(range(100, 112))
    best = {e: 0.5 for e in picked}
    best[108] = 0.9  # the better match of the two duplicates is kept, not the lower id
    task_sources = [[f"val:{i}", f"t{i}.png"] for i in range(20)]
    dups, leaks = _flag(RetrieveConfig(), picked, best, rows, [8, 8], task, task_sources)
    assert [(d["entry"], d["duplicate_of"]) for d in dups] == [(103, 108)]
    assert [x["entry"] for x in leaks] == [105]
    assert leaks[0]["nearest_task_images"][0]["source"] == "t7.png"


def test_bad_inputs_exit_2_with_one_message(tmp_path):
    res = kdforge("retrieve", TINY, "--output-dir", tmp_path / "r")
    assert res.returncode == 2 and "has no [retrieve] table" in res.stderr
    res = kdforge("retrieve", RECIPE, "--profile", "smoke", "--set", "retrieve.strategy='balanced'", "--dry-run")
    assert res.returncode == 2 and "'query_balanced'" in res.stderr, res.stderr
    res = kdforge("retrieve", RECIPE, "--profile", "smoke", "--set", "retrieve.crop=3", "--dry-run")
    assert res.returncode == 2 and "unknown key 'crop'" in res.stderr and "'crops'" in res.stderr, res.stderr
    res = kdforge("retrieve", RECIPE, "--profile", "smoke", "--dry-run")
    assert res.returncode == 0 and "[retrieve]" in res.stdout
    assert not (tmp_path / "r").exists()


def test_faiss_backend_retrieves_the_same_set_from_the_same_gallery(retrieval_smoke_run, tmp_path):
    pytest.importorskip("faiss", reason="faiss-cpu is not installed (pip install faiss-cpu)")
    gallery = retrieval_smoke_run / "retrieve" / "gallery"
    before = sorted(p.stat().st_mtime_ns for p in gallery.glob("shard-*"))
    res = kdforge("retrieve", RECIPE, "--profile", "smoke", "--output-dir", tmp_path / "run", "--no-progress",
                  "--set", "retrieve.backend='faiss'", "--set", f"retrieve.gallery_dir='{gallery}'")
    assert res.returncode == 0, res.stderr[-3000:]
    assert sorted(p.stat().st_mtime_ns for p in gallery.glob("shard-*")) == before  # embedded once, reused
    ours = [(r["entry"], r["query"]) for r in _manifest(retrieval_smoke_run)]
    theirs = [(r["entry"], r["query"]) for r in _manifest(tmp_path / "run")]
    assert ours == theirs
