"""Embedding a gallery once, to disk, resumably: the input of retrieval (:func:`kdforge.ops.knn` streams it back).

:func:`embed_gallery` writes one row per dataset item to a ``.npy`` file (a numpy memmap; galleries can be far
larger than memory) and records its progress beside it in ``<name>.progress.json`` after every batch, so a run
that crashes or is killed continues where it stopped. An unreadable image leaves its row NaN (it then ranks last
in :func:`kdforge.ops.knn`) and is listed in the progress file.

Crash safety rests on two orders: the progress file is written (atomically) before the ``.npy`` is created, so a
``.npy`` of ours never lacks one; and ``done`` only counts rows already flushed to the ``.npy``. A progress file
with ``done == 0`` therefore holds nothing worth keeping, and the next call starts over.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from kdforge.data import Skipped, collate
from kdforge.engine import signals
from kdforge.engine.checkpoint import atomic_path
from kdforge.errors import KdforgeError, ShapeError

log = logging.getLogger("kdforge.retrieval")

_DTYPES = {"float16": np.float16, "float32": np.float32}


def progress_path(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.stem + ".progress.json")


def _write_progress(path: Path, state: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(state))


def embed_gallery(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    dataset: torch.utils.data.Dataset,
    path: str | Path,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    dtype: str = "float16",
    normalize: bool = True,
    desc: str = "gallery",
) -> np.memmap:
    """Embed every item of ``dataset`` with ``encoder`` into ``path`` (.npy, [len(dataset), D] of ``dtype``).

    ``encoder`` maps Tensor[B, 3, H, W] (float in [0, 1], on ``device``) to Tensor[B, D]; rows follow the
    dataset's order and are L2-normalised when ``normalize`` (cosine retrieval). Resumes a partial file written by
    an earlier call for the same dataset size, whenever that call crashed; a finished one is returned without
    running the encoder. Refuses (:class:`KdforgeError`) to resume with an encoder of another width, or from a
    progress file or ``.npy`` that is torn or does not match. Returns the file as a read-only memmap.
    """
    from tqdm.auto import tqdm

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    path, device = Path(path), torch.device(device)
    if path.suffix != ".npy":
        raise ValueError(f"the gallery file must end in .npy (numpy's format, opened as a memmap), got '{path}'")
    rows = len(dataset)
    progress = progress_path(path)
    state = _resume_state(path, progress, rows, dtype, normalize)
    if 0 < state["done"] == rows:  # finished earlier
        return _open_rows(path, progress, state, "r")
    out = _open_rows(path, progress, state, "r+") if state["done"] > 0 else None

    module = encoder if isinstance(encoder, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    cursor = state["done"]
    loader = signals.DataLoader(
        _Positioned(dataset, cursor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    bar = tqdm(total=rows, initial=cursor, desc=desc, unit="img", disable=not sys.stderr.isatty())
    try:
        with torch.inference_mode():
            pending: list[int] = []  # unreadable rows not yet written as NaN (the file may not exist yet)
            for batch, good, bad in loader:
                state["skipped"] += bad
                pending += [pos for pos, _ in bad]
                if good:
                    emb = encoder(batch["image"].to(device, non_blocking=True))
                    if not isinstance(emb, torch.Tensor) or emb.ndim != 2 or emb.shape[0] != len(good):
                        got = list(emb.shape) if isinstance(emb, torch.Tensor) else type(emb).__name__
                        raise ShapeError(f"the encoder must map images [B, 3, H, W] to embeddings [B, D], got {got}")
                    emb = emb.float()
                    if normalize:
                        emb = torch.nn.functional.normalize(emb, dim=1)
                    if out is None:  # the width is known now; the progress file first (see the module docstring)
                        state["dim"] = int(emb.shape[1])
                        _write_progress(progress, state)
                        shape = (rows, state["dim"])
                        out = np.lib.format.open_memmap(path, mode="w+", dtype=_DTYPES[dtype], shape=shape)
                    elif emb.shape[1] != out.shape[1]:
                        raise KdforgeError(
                            f"the encoder gives {emb.shape[1]}-wide embeddings, but '{path}' holds "
                            f"{out.shape[1]}-wide rows ({state['done']} of {rows} done by an earlier call): resume "
                            f"with the same encoder, or delete it and {progress.name} to start over"
                        )
                    out[good] = emb.cpu().numpy()
                cursor += len(good) + len(bad)
                bar.update(len(good) + len(bad))
                if out is not None:
                    out[pending] = np.nan  # an unreadable image's row
                    pending = []
                    out.flush()
                    state["done"] = cursor
                    _write_progress(progress, state)
    finally:
        bar.close()
        if module is not None:
            module.train(was_training)
    if out is None:
        raise KdforgeError(f"none of the {rows} gallery images could be read: nothing to embed")
    if state["skipped"]:
        log.warning("%d unreadable gallery images left NaN rows in %s (listed in %s)", len(state["skipped"]), path,
                    progress.name)  # fmt: skip
    del out
    return np.load(path, mmap_mode="r")


# what a progress file holds; "dim" is None until the encoder's width is known
_PROGRESS_KEYS = {"rows": int, "dim": (int, type(None)), "dtype": str, "normalize": bool, "done": int, "skipped": list}


def _resume_state(path: Path, progress: Path, rows: int, dtype: str, normalize: bool) -> dict:
    """The progress to continue from: a fresh start, or the saved state once it is checked to fit this call."""
    fresh = {"rows": rows, "dim": None, "dtype": dtype, "normalize": normalize, "done": 0, "skipped": []}
    if not progress.exists():
        if path.exists():
            raise KdforgeError(f"'{path}' exists but has no {progress.name}: it was not written here; move it away")
        return fresh
    saved = _read_progress(path, progress)
    if saved["done"] == 0:
        return fresh  # no row was written yet (a crash in the first batch): nothing to keep
    if (saved["rows"], saved["dtype"], saved["normalize"]) != (rows, dtype, normalize):
        raise KdforgeError(
            f"'{path}' was started for another gallery ({saved['rows']} rows, {saved['dtype']}, "
            f"normalize={saved['normalize']}; now {rows}, {dtype}, normalize={normalize}): delete it and "
            f"{progress.name}, or pick another path"
        )
    return saved


def _read_progress(path: Path, progress: Path) -> dict:
    """The saved state in ``progress``; a file that is not one embed_gallery writes is a :class:`KdforgeError`."""
    try:
        saved = json.loads(progress.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        problem = f"not JSON: {exc}"
    else:
        if not isinstance(saved, dict):
            problem = f"a JSON {type(saved).__name__}, not an object"
        else:
            problem = "; ".join(
                f"no '{key}'" if key not in saved else f"'{key}' is {saved[key]!r}"
                for key, kind in _PROGRESS_KEYS.items()
                if key not in saved or not _is_a(saved[key], kind)
            )
            if not problem and not (saved["dtype"] in _DTYPES and 0 <= saved["done"] <= saved["rows"]):
                problem = f"dtype {saved['dtype']!r}, {saved['done']} of {saved['rows']} rows done"
            if not problem and saved["done"] > 0 and (saved["dim"] is None or saved["dim"] < 1):
                problem = f"{saved['done']} rows done but no width (dim {saved['dim']!r})"
        if not problem:
            return saved
    raise KdforgeError(
        f"'{progress}' is not a valid progress file of embed_gallery ({problem}): it was torn or edited; delete it "
        f"and '{path.name}' to start the gallery over"
    )


def _is_a(value: object, kind: type | tuple[type, ...]) -> bool:
    """isinstance, except that JSON's true and false are not integers here."""
    return isinstance(value, kind) and (kind is bool or not isinstance(value, bool))


def _open_rows(path: Path, progress: Path, state: dict, mode: str) -> np.memmap:
    """The saved ``.npy`` as a memmap, checked against the shape and dtype its progress file records."""
    want_shape, want_dtype = (state["rows"], state["dim"]), np.dtype(_DTYPES[state["dtype"]])
    try:
        out = np.load(path, mmap_mode=mode)
    except (OSError, ValueError) as exc:
        problem = f"cannot be read as a .npy file ({type(exc).__name__}: {exc})"
    else:
        if out.shape == want_shape and out.dtype == want_dtype:
            return out
        problem = f"holds {list(out.shape)} {out.dtype}"
    raise KdforgeError(
        f"'{path}' {problem}, but {progress.name} records {state['done']} of {list(want_shape)} {want_dtype} rows "
        f"done: the two do not belong together; delete both to start the gallery over"
    )


class _Positioned(torch.utils.data.Dataset):
    """Items from ``start`` on, each with its position: (position, item or Skipped)."""

    def __init__(self, dataset: torch.utils.data.Dataset, start: int):
        self.dataset, self.start = dataset, start

    def __len__(self) -> int:
        return len(self.dataset) - self.start

    def __getitem__(self, i: int):
        return self.start + i, self.dataset[self.start + i]


def _collate(pairs: list) -> tuple[dict, list[int], list[list]]:
    """(collated good items, their positions, [position, path] of each unreadable one)."""
    good = [pos for pos, item in pairs if not isinstance(item, Skipped)]
    bad = [[pos, item.path] for pos, item in pairs if isinstance(item, Skipped)]
    return collate([item for _, item in pairs]), good, bad
