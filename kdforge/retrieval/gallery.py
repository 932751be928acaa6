"""Embedding a gallery once, to disk, resumably: the input of retrieval (:func:`kdforge.ops.knn` streams it back).

:func:`embed_gallery` writes one row per dataset item to a ``.npy`` file (a numpy memmap; galleries can be far
larger than memory) and records its progress beside it in ``<name>.progress.json`` after every batch, so a run
that crashes or is killed continues where it stopped. An unreadable image leaves its row NaN (it then ranks last
in :func:`kdforge.ops.knn`) and is listed in the progress file.
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
    an earlier call for the same dataset size; a finished one is returned without running the encoder. Returns
    the file as a read-only memmap.
    """
    from tqdm.auto import tqdm

    if dtype not in _DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {dtype!r}")
    path, device = Path(path), torch.device(device)
    if path.suffix != ".npy":
        raise ValueError(f"the gallery file must end in .npy (numpy's format, opened as a memmap), got '{path}'")
    rows = len(dataset)
    progress = progress_path(path)
    state = {"rows": rows, "dim": None, "dtype": dtype, "normalize": normalize, "done": 0, "skipped": []}
    if path.exists() and progress.exists():
        saved = json.loads(progress.read_text())
        same = {k: saved.get(k) for k in ("rows", "dtype", "normalize")} == {
            "rows": rows, "dtype": dtype, "normalize": normalize
        }  # fmt: skip
        if not same:
            raise KdforgeError(
                f"'{path}' was started for another gallery ({saved.get('rows')} rows, {saved.get('dtype')}, "
                f"normalize={saved.get('normalize')}; now {rows}, {dtype}, normalize={normalize}): delete it and "
                f"{progress.name}, or pick another path"
            )
        state = saved
    elif path.exists():
        raise KdforgeError(f"'{path}' exists but has no {progress.name}: it was not written here; move it away")
    if state["done"] == rows and path.exists():
        return np.load(path, mmap_mode="r")

    module = encoder if isinstance(encoder, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    cursor = state["done"]
    loader = torch.utils.data.DataLoader(
        _Positioned(dataset, cursor),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        pin_memory=device.type == "cuda",
    )
    out = np.load(path, mmap_mode="r+") if cursor > 0 else None
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
                    if out is None:  # the width is known now
                        state["dim"] = int(emb.shape[1])
                        shape = (rows, state["dim"])
                        out = np.lib.format.open_memmap(path, mode="w+", dtype=_DTYPES[dtype], shape=shape)
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
