"""Checkpoints: atomic writes, and reads that never run code.

Writes go to a temporary file in the same directory, fsynced, then renamed over the old one, so a crash or SIGTERM
at any moment leaves the previous checkpoint intact; a temporary file left by a killed writer is removed by the
next run in that directory (:func:`remove_stale_temporaries`).

A checkpoint holds only tensors and plain data (dicts, lists, tuples, str, int, float, bool, None): RNG states are
stored as tensors and the recipe as a plain dict, so :func:`load` reads with ``torch.load(weights_only=True)``. A
file that asks for anything else (a pickled object, which could run arbitrary code while it is read) is refused,
whoever wrote it; a truncated, empty or random file is reported as damaged, naming the run's other checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import re
import shutil
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from kdforge.errors import CheckpointError

#: What a run checkpoint says it is (``state["format"]``); FORMAT_VERSION changes when its layout does.
FORMAT = "kdforge-run"
FORMAT_VERSION = 2

_TEMPORARY = re.compile(r"^\..+\.tmp$")  # what atomic_path names its temporary files: .<name>.<random>.tmp
_PLAIN = (str, int, float, bool, type(None), torch.Tensor, torch.Size, torch.dtype, torch.device)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside ``path`` to write to: renamed over ``path`` when the block ends, removed if it
    raises, so a reader (or a crash, or SIGTERM) only ever sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def remove_stale_temporaries(folder: str | Path) -> list[Path]:
    """Delete the temporary files that :func:`atomic_path` writers left in ``folder`` when they were killed
    mid-write (the caller must know that no writer is running there now: a run holds its directory's lock)."""
    removed = []
    for p in Path(folder).iterdir() if Path(folder).is_dir() else ():
        if _TEMPORARY.match(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def check_plain(obj: Any, where: str = "checkpoint") -> None:
    """Raise TypeError if ``obj`` holds anything but tensors and plain data (what :func:`load` can read back)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"{where}: key {k!r} is a {type(k).__name__}, not a str or int")
            check_plain(v, f"{where}.{k}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, _PLAIN):
        raise TypeError(f"{where} is a {type(obj).__module__}.{type(obj).__qualname__}: a checkpoint holds only tensors "
                        "and plain data (dict, list, tuple, str, int, float, bool, None)")


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` atomically; ``obj`` must hold only tensors and plain data (checked first)."""
    check_plain(obj)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """``path`` as a second name of the finished file ``source`` (a hard link; a copy where the file system has
    none), atomically like :func:`atomic_save`: a checkpoint is serialised once and the step checkpoint is the
    same file as last.pt. A later atomic write of ``source`` replaces its name only, so ``path`` keeps its bytes."""
    source, path = Path(source), Path(path)
    with atomic_path(path) as tmp:
        tmp.unlink()
        try:
            os.link(source, tmp)
        except OSError:  # no hard links here (some network and FAT file systems)
            shutil.copyfile(source, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())


def rng_state() -> dict[str, Any]:
    """Every RNG a run draws from (torch CPU and CUDA, numpy, Python), as tensors and plain data."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    version, mt, gauss_next = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(gauss)},
        "python": {"version": int(version), "state": torch.tensor(mt, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = list(torch.cuda.get_rng_state_all())
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def others(path: str | Path) -> list[Path]:
    """The other checkpoints of ``path``'s run directory (last.pt, step_*.pt), newest step first."""
    path = Path(path)
    folder = path.parent
    found = sorted(folder.glob("step_*.pt"), reverse=True) + [folder / "last.pt"]
    return [p for p in found if p.is_file() and p.name != path.name]


def _alternatives(path: Path) -> str:
    alt = others(path)
    if not alt:
        return (" The run has no other checkpoint (a run writes last.pt and step_*.pt); pass one with --resume PATH, "
                "or --checkpoint PATH to eval and diagnose.")
    return (" Other checkpoints of the run, newest first: " + ", ".join(str(p) for p in alt[:5])
            + " (pass one with --resume PATH, or --checkpoint PATH to eval and diagnose).")


def load(path: str | Path) -> Any:
    """What :func:`atomic_save` wrote to ``path``, on the CPU, read with ``weights_only=True``.

    Raises :class:`CheckpointError` (exit code 2) naming the file: missing, empty, truncated or not a checkpoint
    (with the run's other checkpoints to use instead), or holding objects other than tensors and plain data
    (refused: reading them could run code).
    """
    path = Path(path)
    if not path.is_file():
        kind = "a directory" if path.is_dir() else "no such file"
        raise CheckpointError(f"no checkpoint at '{path}' ({kind}).{_alternatives(path)}")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint '{path}' is empty (a write or copy that never finished).{_alternatives(path)}")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a torn file has lost its directory at the end
        raise CheckpointError(f"checkpoint '{path}' is damaged or not a checkpoint (not a complete torch.save "
                              f"archive: truncated, or another kind of file).{_alternatives(path)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        found = re.search(r"GLOBAL ([\w.]+)", text)
        if found or "global" in text.lower():
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(
                f"checkpoint '{path}' holds Python objects besides tensors and plain data{what}. kdforge never writes "
                "such a file: it was not written by kdforge (or by an older version), and reading it could run code, "
                "so it is refused. Use a checkpoint written by this version of kdforge."
            ) from None
        raise CheckpointError(f"checkpoint '{path}' is damaged: {text.splitlines()[0]}.{_alternatives(path)}") from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise CheckpointError(f"checkpoint '{path}' is damaged ({first}).{_alternatives(path)}") from None


_RUN_KEYS = ("model", "optimizer", "scaler", "step", "epoch", "batch_in_epoch", "rng", "recipe")


def load_run(path: str | Path) -> dict[str, Any]:
    """A run checkpoint (``last.pt`` / ``step_*.pt``) read by :func:`load` and checked to be one: a dict with the
    engine's entries, format :data:`FORMAT` version :data:`FORMAT_VERSION`."""
    state = load(path)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"'{path}' is not a checkpoint of a kdforge run (it has no format = '{FORMAT}' entry)."
                              f"{_alternatives(Path(path))}")
    if state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"'{path}' is a kdforge run checkpoint of format version {state.get('format_version')}; "
                              f"this kdforge reads version {FORMAT_VERSION}. Use the kdforge version that wrote it.")
    missing = [k for k in _RUN_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"'{path}' lacks {', '.join(missing)}: it is not a complete run checkpoint."
                              f"{_alternatives(Path(path))}")
    return state
