"""kdforge.retrieval.embed_gallery: rows in dataset order, NaN for unreadable images, resume after a crash, and the
file feeding kdforge.ops.knn."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from kdforge.data import Skipped
from kdforge.errors import KdforgeError
from kdforge.ops import knn
from kdforge.retrieval import embed_gallery
from kdforge.retrieval import gallery as gallery_module
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
    """A fixed linear map of the flattened image to ``width`` numbers; fails on the batch number ``fail_on`` (a
    crash mid-run)."""

    def __init__(self, fail_on=None, width=6):
        super().__init__()
        self.proj = torch.nn.Linear(3 * 8 * 8, width)
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


class Crash(BaseException):
    """Raised at a chosen line to stop a call the way a kill does: no ``except Exception`` in the code sees it."""


def _crash_at_line(n):
    """A trace function that raises :class:`Crash` at the n-th line run in kdforge/retrieval/gallery.py."""
    lines = 0

    def in_gallery(frame, event, arg):
        nonlocal lines
        if event == "line":
            lines += 1
            if lines == n:
                raise Crash(n)
        return in_gallery

    return lambda frame, event, arg: in_gallery if frame.f_code.co_filename == gallery_module.__file__ else None


def _check_gallery(out, data):
    good = [i for i in range(len(data)) if i not in data.broken]
    np.testing.assert_allclose(out[good], _expected(data)[good].numpy(), atol=1e-6)
    assert np.isnan(out[sorted(data.broken)]).all()


def test_a_crash_at_any_line_resumes(tmp_path):
    """Crash the first call at its 1st, 2nd, ... line until it runs through; each time the next call finishes."""
    data = Images(9, broken=[0, 5])  # three batches of 4; the first starts with an unreadable image
    for n in range(1, 10_000):
        path = tmp_path / f"crash_at_{n}" / "g.npy"
        path.parent.mkdir()
        previous = sys.gettrace()
        sys.settrace(_crash_at_line(n))
        try:
            embed_gallery(Encoder(), data, path, batch_size=4, dtype="float32")
        except Crash:
            pass
        else:
            break  # n is past the last line: every point of the run was tried
        finally:
            sys.settrace(previous)
        _check_gallery(embed_gallery(Encoder(), data, path, batch_size=4, dtype="float32"), data)
        state = json.loads(progress_path(path).read_text())
        assert state["done"] == 9 and state["skipped"] == [[0, "img0.jpg"], [5, "img5.jpg"]], n  # each listed once
    assert n > 50  # the runs really were cut short at many points


_KILLED_CHILD = """
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    from kdforge.retrieval import embed_gallery, gallery
    from test_retrieval_gallery import Encoder, Images

    path = {path!r}

    def kill_once_the_file_exists(frame, event, arg):
        if event == "line" and os.path.exists(path):
            os.kill(os.getpid(), signal.SIGKILL)  # no finally block, no flush, no cleanup runs
        return kill_once_the_file_exists

    sys.settrace(lambda frame, event, arg: (
        kill_once_the_file_exists if frame.f_code.co_filename == gallery.__file__ else None))
    embed_gallery(Encoder(), Images(9, broken=[0, 5]), path, batch_size=4, dtype="float32")
"""


def test_a_process_killed_as_its_file_appears_resumes(tmp_path):
    path = tmp_path / "g.npy"
    child = textwrap.dedent(_KILLED_CHILD).format(tests=str(Path(__file__).parent), path=str(path))
    repo = str(Path(__file__).parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([repo, os.environ.get("PYTHONPATH", "")]))
    res = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert path.exists()  # killed in the first batch, right after the .npy was created
    data = Images(9, broken=[0, 5])
    _check_gallery(embed_gallery(Encoder(), data, path, batch_size=4, dtype="float32"), data)


def _crashed_mid_run(path, data):
    """A real run stopped by a crash after two of its batches were written."""
    with pytest.raises(RuntimeError, match="simulated crash"):
        embed_gallery(Encoder(fail_on=3), data, path, batch_size=4, dtype="float32")
    assert json.loads(progress_path(path).read_text())["done"] == 8


def test_a_resume_with_an_encoder_of_another_width_is_refused(tmp_path):
    data, path = Images(20), tmp_path / "g.npy"
    _crashed_mid_run(path, data)
    with pytest.raises(KdforgeError) as err:
        embed_gallery(Encoder(width=5), data, path, batch_size=4, dtype="float32")
    msg = str(err.value)
    assert "5-wide embeddings" in msg and "6-wide rows" in msg and "8 of 20 done" in msg
    assert "same encoder" in msg and "g.progress.json to start over" in msg
    _check_gallery(embed_gallery(Encoder(), data, path, batch_size=4, dtype="float32"), data)  # nothing was lost


@pytest.mark.parametrize(
    "tear, problem",
    [
        (lambda text: text[: len(text) // 2], "not JSON"),  # cut short mid-write, e.g. copied from a full disk
        (lambda text: json.dumps({k: v for k, v in json.loads(text).items() if k != "done"}), "no 'done'"),
        (lambda text: json.dumps(dict(json.loads(text), done="8")), "'done' is '8'"),
        (lambda text: json.dumps(dict(json.loads(text), done=99)), "99 of 20 rows done"),
        (lambda text: json.dumps([json.loads(text)]), "a JSON list"),
    ],
)
def test_a_torn_or_invalid_progress_file_is_refused(tmp_path, tear, problem):
    data, path = Images(20), tmp_path / "g.npy"
    _crashed_mid_run(path, data)
    progress = progress_path(path)
    progress.write_text(tear(progress.read_text()))
    with pytest.raises(KdforgeError) as err:
        embed_gallery(Encoder(), data, path, batch_size=4, dtype="float32")
    msg = str(err.value)
    assert f"'{progress}' is not a valid progress file" in msg and problem in msg
    assert "delete it and 'g.npy' to start the gallery over" in msg


def test_a_gallery_file_that_does_not_match_its_progress_is_refused(tmp_path):
    data, path = Images(20), tmp_path / "g.npy"
    _crashed_mid_run(path, data)
    path.write_bytes(path.read_bytes()[:60])  # the .npy torn inside its header
    with pytest.raises(KdforgeError, match=r"cannot be read as a \.npy file.*delete both to start the gallery over"):
        embed_gallery(Encoder(), data, path, batch_size=4, dtype="float32")
    np.save(path, np.zeros((20, 6), np.float16))  # whole, but not what the progress file says
    with pytest.raises(KdforgeError, match=r"holds \[20, 6\] float16, but g.progress.json records 8 of \[20, 6\] f"):
        embed_gallery(Encoder(), data, path, batch_size=4, dtype="float32")
