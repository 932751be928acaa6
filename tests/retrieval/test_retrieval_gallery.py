"""kdforge.retrieval.embed_gallery: rows in dataset order, NaN for unreadable images, resume after a crash, and the
file feeding kdforge.ops.knn."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kdforge.data import Skipped
from kdforge.errors import KdforgeError
from kdforge.ops import knn
from kdforge.retrieval import embed_gallery
from kdforge.retrieval.gallery import progress_path


class Images(torch.utils.data.Dataset):
    """Random 8x8 images; the positions in ``broken`` cannot be read."""

    def __init__(self, n, broken=()):
        self.images = torch.rand(n, 3, 8, 8, generator=torch.Generator().manual_seed(0))
        self.broken = set(broken)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        if i in self.broken:
            return Skipped(path=f"img{i}.jpg", reason="truncated file")
        return {"image": self.images[i], "label": -1, "index": i}


class Encoder(torch.nn.Module):
    """A fixed linear map of the flattened image; fails on the batch number ``fail_on`` (a crash mid-run)."""

    def __init__(self, fail_on=None):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, 6)
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(1))
        torch.nn.init.zeros_(self.proj.bias)
        self.calls, self.fail_on = 0, fail_on

    def forward(self, x):
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated crash")
        return self.proj(x.flatten(1))


def _expected(dataset, normalize=True):
    with torch.no_grad():
        emb = Encoder().proj(dataset.images.flatten(1))
    return torch.nn.functional.normalize(emb, dim=1) if normalize else emb


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_rows_follow_the_dataset_and_unreadable_images_are_nan(tmp_path, dtype):
    data = Images(23, broken=[0, 1, 2, 3, 4, 9, 22])  # the whole first batch is unreadable
    out = embed_gallery(Encoder(), data, tmp_path / "g.npy", batch_size=5, dtype=dtype)
    assert out.shape == (23, 6) and out.dtype == np.dtype(dtype)
    good = [i for i in range(23) if i not in data.broken]
    tol = 1e-6 if dtype == "float32" else 2e-3
    np.testing.assert_allclose(out[good], _expected(data)[good].numpy(), atol=tol, rtol=tol)
    assert np.isnan(out[sorted(data.broken)]).all()
    state = json.loads(progress_path(tmp_path / "g.npy").read_text())
    assert state["done"] == 23 and [pos for pos, _ in state["skipped"]] == sorted(data.broken)
    assert state["skipped"][0] == [0, "img0.jpg"]


def test_a_crash_resumes_where_it_stopped(tmp_path):
    data = Images(30, broken=[7])
    path = tmp_path / "g.npy"
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_gallery(Encoder(fail_on=4), data, path, batch_size=4, dtype="float32")
    assert json.loads(progress_path(path).read_text())["done"] == 12  # three batches were written
    again = Encoder()
    out = embed_gallery(again, data, path, batch_size=4, dtype="float32")
    assert again.calls == 5  # rows 12..29 only
    good = [i for i in range(30) if i != 7]
    np.testing.assert_allclose(out[good], _expected(data)[good].numpy(), atol=1e-6)
    assert np.isnan(out[7]).all()
    done = Encoder()
    embed_gallery(done, data, path, batch_size=4, dtype="float32")
    assert done.calls == 0  # finished: nothing to do


def test_the_file_feeds_knn_and_nan_rows_rank_last(tmp_path):
    data = Images(40, broken=[5])
    gallery = embed_gallery(Encoder(), data, tmp_path / "g.npy", batch_size=16, dtype="float32", normalize=True)
    queries = _expected(data)[[5, 6, 7]] + 0.01
    scores, ids = knn(queries, gallery, 40, metric="ip", backend="reference")
    assert ids[0, -1] == 5 and ids[1, 0] == 6 and ids[2, 0] == 7
    assert torch.isinf(scores[:, -1]).all()


def test_refusals(tmp_path):
    data = Images(10)
    embed_gallery(Encoder(), data, tmp_path / "g.npy", batch_size=4)
    with pytest.raises(KdforgeError, match="started for another gallery .* delete it"):
        embed_gallery(Encoder(), Images(12), tmp_path / "g.npy", batch_size=4)
    np.save(tmp_path / "other.npy", np.zeros((10, 6), np.float16))
    with pytest.raises(KdforgeError, match="has no other.progress.json"):
        embed_gallery(Encoder(), data, tmp_path / "other.npy")
    with pytest.raises(ValueError, match="must end in .npy"):
        embed_gallery(Encoder(), data, tmp_path / "g.bin")
    with pytest.raises(KdforgeError, match="none of the 3 gallery images could be read"):
        embed_gallery(Encoder(), Images(3, broken=[0, 1, 2]), tmp_path / "bad.npy")
    with pytest.raises(Exception, match=r"embeddings \[B, D\]"):
        embed_gallery(lambda x: x, data, tmp_path / "shape.npy")
