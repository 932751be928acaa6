"""kdforge.retrieval.store and .crops: crop parameters that remake the embedded pixels, two-encoder rows whose
inner products are the mean of the two cosine similarities, and shards that a kill mid-way leaves resumable with
the same bytes as an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kdforge.data import Skipped
from kdforge.errors import KdforgeError
from kdforge.retrieval.crops import CropParams, centre_params, remake, sample_params
from kdforge.retrieval.nearest import search
from kdforge.retrieval.store import GallerySpec, GalleryStore, embed_images, embed_store

REPO = Path(__file__).resolve().parents[2]


class Images(torch.utils.data.Dataset):
    """Seeded random images of irregular sizes (uint8 steps as float, like decoded files); ``broken`` unreadable."""

    def __init__(self, n, broken=()):
        g = torch.Generator().manual_seed(0)
        sizes = torch.randint(20, 41, (n, 2), generator=g).tolist()
        self.images = [torch.randint(0, 256, (3, h, w), generator=g).float() / 255 for h, w in sizes]
        self.broken = set(broken)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i in self.broken:
            return Skipped(path=f"img{i}.jpg", reason="truncated file")
        return {"image": self.images[i], "label": -1, "index": i}


class Linear(torch.nn.Module):
    def __init__(self, width, seed):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 16 * 16, width)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(seed))
        torch.nn.init.normal_(self.proj.bias, generator=torch.Generator().manual_seed(seed + 1))

    def forward(self, x):
        return self.proj(x.flatten(1))


def _spec(n, level="crop", crops=3, shard_images=4):
    return GallerySpec(source={"plugin": "test"}, encoders=[["a", None], ["b", None]], level=level, crops=crops,
                       scale=[0.08, 1.0], ratio=[0.75, 4 / 3], num_ops=2, magnitude=9.0, image_size=16, seed=3,
                       items=n, shard_images=shard_images)


ENCODERS = [("a", Linear(5, 1)), ("b", Linear(7, 2))]


def test_crop_parameters_are_seeded_and_remake_the_same_pixels():
    image = Images(1).images[0]
    first = sample_params(image.shape[1], image.shape[2], 11, num_ops=3)
    assert first == sample_params(image.shape[1], image.shape[2], 11, num_ops=3)
    assert first != sample_params(image.shape[1], image.shape[2], 12, num_ops=3)
    top, left, h, w = first.box
    assert 0 <= top and top + h <= image.shape[1] and 0 <= left and left + w <= image.shape[2]
    again = CropParams.from_json(json.loads(json.dumps(first.to_json())))
    assert torch.equal(remake(image, first, 16), remake(image, again, 16))
    assert remake(image, first, 16).dtype == torch.uint8 and remake(image, first, 16).shape == (3, 16, 16)
    # the operations matter: without them the pixels differ (for operations that change this image)
    plain = CropParams(box=first.box)
    assert not torch.equal(remake(image, first, 16), remake(image, plain, 16))
    assert centre_params(30, 40).box == (0, 5, 30, 30)
    with pytest.raises(ValueError, match="does not fit"):
        remake(image, CropParams(box=(0, 0, 100, 100)), 16)
    with pytest.raises(ValueError, match="unknown augmentation"):
        CropParams.from_json({"box": [0, 0, 4, 4], "ops": [["warp", 1.0]]})


def test_two_encoder_scores_are_the_mean_of_the_two_cosine_matrices(tmp_path):
    data = Images(10)
    store = embed_store(ENCODERS, data, tmp_path / "g", _spec(10), show_progress=False)
    assert len(store) == 30 and store.width == 12 and [w for _, w in store.spec.encoders] == [5, 7]
    # the entries' pixels, remade from the index, and the two encoders' raw outputs on them
    pixels = []
    for e in range(len(store)):
        item, _, params, source = store.entry(e)
        assert source == f"#{item}"
        pixels.append(remake(data[item]["image"], params, 16))
    x = torch.stack(pixels).float() / 255
    queries = torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        cos = [torch.nn.functional.normalize(enc(queries), dim=1) @ torch.nn.functional.normalize(enc(x), dim=1).T
               for _, enc in ENCODERS]
    dense = (cos[0] + cos[1]) / 2
    q_rows, _ = embed_images(ENCODERS, (queries * 255).round().to(torch.uint8))
    scores, ids = search(q_rows, store.shards, len(store))
    got = torch.empty_like(dense).scatter_(1, ids, scores)
    # the stored rows are fp16: a relative error of about 1e-3 of the similarities' scale
    torch.testing.assert_close(got, dense, atol=2e-3 * dense.abs().max().item(), rtol=0)
    assert not torch.allclose(got, cos[0], atol=2e-2)  # not one encoder's similarity alone


def test_skipped_images_are_listed_and_have_no_rows(tmp_path):
    store = embed_store(ENCODERS, Images(9, broken={2, 7}), tmp_path / "g", _spec(9), show_progress=False)
    assert len(store) == 7 * 3
    assert sorted(s[0] for s in store.skipped()) == [2, 7]
    assert {store.entry(e)[0] for e in range(len(store))} == set(range(9)) - {2, 7}


_KILLED = textwrap.dedent("""
    import os, signal, sys, torch
    sys.path.insert(0, {tests!r})
    from test_retrieval_store import ENCODERS, Images, _spec
    from kdforge.retrieval.store import embed_store

    calls = [0]
    name, enc = ENCODERS[1]
    def dying(x):
        calls[0] += 1
        if calls[0] == {kill_at}:
            os.kill(os.getpid(), signal.SIGKILL)  # no cleanup, no finally: as a machine that loses power
        return enc(x)
    embed_store([ENCODERS[0], (name, dying)], Images(23), {out!r}, _spec(23), batch_size=6, show_progress=False)
""")


@pytest.mark.parametrize("kill_at", [3, 6])
def test_killed_mid_way_then_resumed_gives_the_shards_of_an_uninterrupted_run(tmp_path, kill_at):
    clean = embed_store(ENCODERS, Images(23), tmp_path / "clean", _spec(23), batch_size=6, show_progress=False)
    assert clean.spec.num_shards == 6  # 23 images, 4 per shard, 2 per batch (6 entries): shards of 2 batches
    out = tmp_path / "killed"
    script = _KILLED.format(tests=str(Path(__file__).parent), kill_at=kill_at, out=str(out))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300, check=False)
    assert res.returncode == -9, res.stderr[-2000:]
    done = sorted(p.name for p in out.glob("shard-*.json"))
    assert len(done) == (kill_at - 1) // 2  # the shards finished before the kill, and no other
    calls = []
    counted = [(name, lambda x, enc=enc: calls.append(len(x)) or enc(x)) for name, enc in ENCODERS[:1]] + ENCODERS[1:]
    resumed = embed_store(counted, Images(23), out, _spec(23), batch_size=6, show_progress=False)
    assert sum(calls) == (23 - 4 * len(done)) * 3  # only the unfinished shards' entries are embedded again
    names = sorted(p.name for p in out.glob("shard-*"))
    assert names == sorted(p.name for p in (tmp_path / "clean").glob("shard-*"))  # none missing, none extra
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert len(resumed) == len(clean) == 23 * 3
    assert [resumed.entry(e)[:2] for e in range(len(resumed))] == [(i, c) for i in range(23) for c in range(3)]


def test_a_directory_of_another_gallery_is_refused(tmp_path):
    embed_store(ENCODERS, Images(5), tmp_path / "g", _spec(5), show_progress=False)
    other = _spec(5)
    other.crops = 4
    with pytest.raises(KdforgeError, match="another gallery's embeddings .*crops"):
        embed_store(ENCODERS, Images(5), tmp_path / "g", other, show_progress=False)
    (tmp_path / "g" / "shard-000001.json").unlink()
    with pytest.raises(KdforgeError, match="missing 1 of 2 shards .*shard-000001"):
        GalleryStore(tmp_path / "g")


def test_image_level_entries_are_the_centred_squares(tmp_path):
    data = Images(6)
    store = embed_store(ENCODERS, data, tmp_path / "g", _spec(6, level="image"), show_progress=False)
    assert len(store) == 6
    for e in range(6):
        item, crop, params, _ = store.entry(e)
        h, w = data.images[item].shape[1:]
        assert (item, crop) == (e, 0) and params == centre_params(h, w)
    rows = store.rows([0, 3]).numpy()
    expected, _ = embed_images(ENCODERS, torch.stack([remake(data[i]["image"], centre_params(
        *data.images[i].shape[1:]), 16) for i in (0, 3)]))
    np.testing.assert_allclose(rows, expected.numpy(), atol=2e-3)


_RANK = textwrap.dedent("""
    import sys
    sys.path.insert(0, {tests!r})
    from test_retrieval_store import ENCODERS, Images, _spec
    from kdforge.retrieval.store import embed_store

    calls = []
    counted = [(n, lambda x, e=e: calls.append(len(x)) or e(x)) for n, e in ENCODERS[:1]] + ENCODERS[1:]
    store = embed_store(counted, Images(23), {out!r}, _spec(23), batch_size=6, show_progress=False)
    print("store" if store is not None else "none", sum(calls))
""")


def test_processes_of_a_torchrun_job_share_the_shards_out(tmp_path):
    import socket

    clean = embed_store(ENCODERS, Images(23), tmp_path / "clean", _spec(23), batch_size=6, show_progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "shared"
    script = _RANK.format(tests=str(Path(__file__).parent), out=str(out))
    procs = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
        procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [r[1][-2000:] for r in results]
    # rank 0 goes on to search, the others stop; each embedded its own shards only (0, 2, 4 and 1, 3, 5 of 4 images)
    assert [r[0].split() for r in results] == [["store", str(12 * 3)], ["none", str(11 * 3)]]
    names = sorted(p.name for p in out.glob("shard-*"))
    assert names == sorted(p.name for p in (tmp_path / "clean").glob("shard-*"))
    for name in names:
        assert (out / name).read_bytes() == (tmp_path / "clean" / name).read_bytes(), name
    assert len(GalleryStore(out)) == len(clean)
