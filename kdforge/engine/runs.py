"""Run directories: who may write one (a lock), what must hold before a run writes anything, what a resume may
change, and reading a finished or interrupted run back (recipe.toml, last.pt / step_*.pt).

A run directory belongs to one run at a time. Before the first byte is written the trainer checks that the path
can be a directory that this user can write, that no other run holds it, and that a fresh run does not land on an
earlier run's files; a resume first reads its checkpoint and compares the recipes. Only then is the directory
created and locked (:class:`RunLock`).
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, Iterable

from torch import nn

from kdforge.engine import checkpoint as ckpt
from kdforge.errors import CheckpointError, KdforgeError, RunDirectoryError
from kdforge.plugins import get_registry
from kdforge.recipe import STUDENT_TABLE_KEYS, Recipe, load_recipe, plugin_table, to_dict

#: The lock file of a run directory (see :class:`RunLock`).
LOCK_FILE = "run.lock"
#: What a run writes besides checkpoints; finding them in a fresh run's directory means an earlier attempt.
RUN_FILES = ("recipe.toml", "metrics.jsonl", "tb", "summary.json", "curves.png", "confusion.png")


# ------------------------------------------------------------------------------------------------- the lock
class RunLock:
    """An exclusive ``flock`` on ``<run_dir>/run.lock`` for the life of a run. A second run into the directory is
    refused, naming the holder (pid, host, start time, command) that the lock file records. The kernel releases the
    lock when the holder exits, however it exits, so a crashed run never leaves a stale lock behind."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Create the directory if needed and take the lock; :class:`RunDirectoryError` if another run holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise RunDirectoryError(_held_message(self.path)) from None
            raise
        holder = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
                  "command": " ".join(sys.argv)}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(holder) + "\n").encode(), 0)
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @staticmethod
    def holder(run_dir: str | Path) -> str | None:
        """Who holds ``run_dir``'s lock now (None if nobody), found without writing anything."""
        path = Path(run_dir) / LOCK_FILE
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _held_message(path)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)
            return None
        finally:
            os.close(fd)


def _held_message(path: Path) -> str:
    try:
        h = json.loads(path.read_text())
        who = f"pid {h['pid']} on {h['host']}, started {h['started']}: {h['command']}"
    except (OSError, ValueError, KeyError, TypeError):
        who = "a process that has not recorded itself yet"
    return (f"'{path.parent}' is in use by another run ({who}); wait for it to end, stop it, or pick another "
            "--output-dir")


# ------------------------------------------------------------------------------------------------- checks before writing
def check_run_dir(run_dir: str | Path, *, fresh: bool) -> None:
    """Raise :class:`RunDirectoryError` if a run cannot use ``run_dir``; writes nothing.

    The path must be (or be creatable as) a directory this user can write; no other run may hold it; a fresh run
    (no --resume) must not find an earlier run's checkpoints or files there.
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirectoryError(f"the run directory '{run_dir}' is a file: pick another --output-dir (or run.name)")
    existing = run_dir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise RunDirectoryError(f"'{existing}' is a file, so the run directory '{run_dir}' cannot be created under it: "
                                "pick another --output-dir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise RunDirectoryError(f"cannot write to '{existing}' (permission denied), so the run directory '{run_dir}' "
                                "cannot be used: pick another --output-dir or fix the permissions")
    held = RunLock.holder(run_dir)
    if held:
        raise RunDirectoryError(held)
    if fresh and run_dir.is_dir():
        checkpoints = sorted(p.name for p in run_dir.glob("*.pt") if p.name == "last.pt" or p.name.startswith("step_"))
        if checkpoints:
            raise RunDirectoryError(f"'{run_dir}' already holds a run ({', '.join(checkpoints[:3])}): add --resume to "
                                    "continue it, or pick another --output-dir")
        leftovers = [name for name in RUN_FILES if (run_dir / name).exists()]
        if leftovers:
            raise RunDirectoryError(
                f"'{run_dir}' holds files of an earlier attempt that wrote no checkpoint ({', '.join(leftovers)}); a new "
                "run would mix its metrics with them: remove them (or the directory), or pick another --output-dir"
            )


# ------------------------------------------------------------------------------------------------- resuming
#: Recipe keys that a resume may change freely: where and how the run writes, logs and evaluates.
_FREE = ("run.name", "run.output_dir", "run.device", "run.threads", "train.num_workers", "train.checkpoint_every",
         "train.keep_checkpoints", "train.log_every", "train.max_steps", "train.compile", "eval.")
#: Keys a resume may change with --allow-changes: the schedule and paths, not what the models or the data are.
_SCHEDULE = ("optim.", "train.epochs", "train.precision", "train.max_bad_fraction", "data.root", "data.train_urls",
             "data.val_urls", "teacher.autocast", "student.grad_checkpointing")


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: list(tree) if isinstance(tree, tuple) else tree}


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".") and key.startswith(p)) for p in patterns)


#: Schedule keys that a resume can never change: the optimizer state's groups are built from them.
_FIXED = ("optim.layer_decay",)


def _kind_of_change(key: str) -> str:
    if _matches(key, _FIXED):
        return "model"
    if _matches(key, _FREE) or key.endswith("backend"):
        return "free"
    if _matches(key, _SCHEDULE) or (key.startswith("losses.") and key.endswith(".weight")):
        return "schedule"
    return "model"


def check_resume(state: dict, recipe: Recipe, *, path: Path, world_size: int, allow_changes: bool) -> list[str]:
    """Compare the recipe a checkpoint was trained with (``state["recipe"]``) with ``recipe``.

    Returns the accepted differences ("optim.lr: 0.001 -> 0.002"), to be reported. Raises
    :class:`CheckpointError` listing every difference if one changes the models, their shapes or the data (never
    allowed: the state would not fit or would mean something else), or changes the schedule without
    ``allow_changes``.
    """
    old, new = _flatten(state["recipe"]), _flatten(to_dict(recipe))
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key == "profiles" or key.startswith("profiles."):
            continue
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if a != b:
            diffs.append((key, a, b, _kind_of_change(key)))
    saved_world = state.get("world_size", 1)
    if saved_world != world_size:
        diffs.append(("processes (world size)", saved_world, world_size, "model"))
    blocking = [d for d in diffs if d[3] == "model" or (d[3] == "schedule" and not allow_changes)]
    if blocking:
        why = {"model": "changes the models, their shapes, the data or the optimizer's groups: cannot continue this "
                        "run",
               "schedule": "changes the schedule: allowed with --allow-changes"}
        lines = "\n".join(f"  {k}: {a!r} -> {b!r}  ({why[kind]})" for k, a, b, kind in diffs if kind != "free")
        raise CheckpointError(
            f"--resume: the recipe differs from the one '{path}' was trained with:\n{lines}\n"
            "Resume with the run's own recipe (its recipe.toml), or start a new run in another --output-dir."
        )
    return [f"{k}: {a!r} -> {b!r}" for k, a, b, kind in diffs if kind != "free"]


# ------------------------------------------------------------------------------------------------- reading a run back
_KINDS = {"teacher": "teachers", "student": "students", "data": "data_sources", "eval.data": "data_sources"}


def code_it_would_run(recipe: Recipe, sections: Iterable[str]) -> list[str]:
    """What building the recipe's ``sections`` ("teacher", "eval.data" ...) would run besides kdforge's own code and
    its libraries': each component Config may list such settings in ``runs_code()`` (a hub repository's
    hubconf.py, unpickling a checkpoint, shell commands of pipe: URLs)."""
    from kdforge.recipe.schema import build

    registry = get_registry()
    found = []
    for section in sections:
        table = plugin_table(recipe.eval.data if section == "eval.data" else getattr(recipe, section),
                             STUDENT_TABLE_KEYS if section == "student" else {})
        name = table.pop("plugin", None)
        if not table and name is None:
            continue
        cfg = build(registry.get(_KINDS[section], name, section).Config, table, section)
        found += [f"[{section}] {line}" for line in getattr(cfg, "runs_code", lambda: [])()]
    return found


def read_run(
    run_dir: str | Path, checkpoint: str | Path | None = None, overrides: Iterable[str] = (), *,
    builds: Iterable[str] = ("student",), trust: bool = False,
) -> tuple[dict, Recipe]:
    """(checkpoint state, recipe with ``overrides``) of a run directory, read safely: the checkpoint with
    weights_only, and, unless ``trust``, a refusal (:class:`KdforgeError`) if building the recipe's ``builds``
    sections would run code from outside kdforge (a run directory may come from someone else)."""
    run_dir = Path(run_dir)
    recipe_file = run_dir / "recipe.toml"
    if not recipe_file.is_file():
        raise KdforgeError(f"'{run_dir}' holds no recipe.toml: pass a run directory written by kdforge train")
    recipe = load_recipe(recipe_file, overrides=list(overrides))
    risky = code_it_would_run(recipe, builds)
    if risky and not trust:
        raise KdforgeError(
            f"the recipe of '{run_dir}' would run code from outside kdforge:\n  " + "\n  ".join(risky) +
            "\nIf you trust where this run directory comes from, pass --trust-recipe"
            + (" (or --no-teacher to leave the teacher out)" if "teacher" in builds else "")
        )
    state = ckpt.load_run(Path(checkpoint) if checkpoint else run_dir / "last.pt")
    return state, recipe


def load_run_student(
    run_dir: str | Path, checkpoint: str | Path | None = None, overrides: Iterable[str] = (), *,
    builds: Iterable[str] = ("student",), trust: bool = False,
) -> tuple[nn.Module, Recipe]:
    """(student with the checkpoint's weights, in eval mode, on the CPU; the run's recipe with ``overrides``,
    ``--set`` style) from a run directory (recipe.toml and last.pt, or ``checkpoint``); see :func:`read_run`."""
    state, recipe = read_run(run_dir, checkpoint, overrides, builds=builds, trust=trust)
    student = get_registry().create("students", plugin_table(recipe.student, STUDENT_TABLE_KEYS), "student")
    load_student_state(student, state, "the checkpoint's student does not fit the recipe's [student]",
                       "were model keys changed with --set?")
    return student.eval(), recipe


def load_student_state(student: nn.Module, state: dict, what: str, fix: str) -> None:
    """Load the student weights of run checkpoint ``state`` (its ``model`` entries under ``student.``) into
    ``student``, all of them and nothing else. :class:`CheckpointError` (exit 2) if they do not fit: ``what``, then
    every missing, unexpected and differently shaped key (a few of each), the checkpoint's [student] table, ``fix``.
    A student that can take another configuration's weights remaps them first (``remap_state_dict``: the timm
    student's shared relative position bias into one per block)."""
    prefix = "student."
    weights = {k[len(prefix):]: v for k, v in state["model"].items() if k.startswith(prefix)}
    if callable(getattr(student, "remap_state_dict", None)):
        weights = student.remap_state_dict(weights)
    problems = fit_problems(student, weights)
    if problems:
        run_student = {k: v for k, v in state.get("recipe", {}).get("student", {}).items()
                       if v not in ({}, None, "")}
        raise CheckpointError(f"{what}:\n  " + "\n  ".join(problems) +
                              f"\nThe checkpoint's [student] was {run_student}; {fix}")
    student.load_state_dict(weights)


def fit_problems(student: nn.Module, weights: dict, source: str = "the checkpoint") -> list[str]:
    """What keeps ``weights`` (a state dict) from loading into ``student`` exactly: a line each for the missing,
    unexpected and differently shaped keys (a few of each), none when they fit."""
    expected = student.state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    shapes = [f"{k} {tuple(weights[k].shape)} vs {tuple(v.shape)}" for k, v in expected.items()
              if k in weights and weights[k].shape != v.shape]
    return [f"{label} ({len(keys)}): {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
            for label, keys in ((f"missing from {source}", missing), ("not in the student", unexpected),
                                (f"shape in {source} vs the student", shapes)) if keys]


def init_source(value: str) -> Path | None:
    """The run directory or checkpoint of ``[student] init_from`` (None: "" or "none", the student's own init)."""
    return None if value.strip().lower() in ("", "none") else Path(value)


def init_student(student: nn.Module, source: str | Path) -> Path:
    """Load the student weights of a run (``source``: its directory, whose last.pt is read, or a run checkpoint
    file) into ``student``, read with weights_only (:func:`kdforge.engine.checkpoint.load_run`): exactly the
    run's student, no head of its losses. ``source`` may also be a folder ``kdforge export --format timm`` wrote
    (or its model.safetensors): :func:`kdforge.export.load_export_into_student`. Returns the file read;
    :class:`CheckpointError` (exit 2) if there is none or its student has other keys or shapes than ``student``."""
    from kdforge.export import export_folder_of, load_export_into_student

    source = Path(source)
    path = source / "last.pt" if source.is_dir() else source
    if not source.exists():
        raise CheckpointError(f"student.init_from = '{source}': no such run directory, checkpoint or export; give "
                              "the directory of a finished kdforge run (holding last.pt), a folder kdforge export "
                              "wrote, or \"none\" to start from the student's own initialisation")
    exported = export_folder_of(source) is not None and not path.is_file()  # a run directory's last.pt comes first
    if exported or source.suffix == ".safetensors":
        return load_export_into_student(student, source)
    state = ckpt.load_run(path)
    load_student_state(student, state, f"student.init_from: the student of '{path}' does not fit the recipe's "
                       "[student]", "make the recipe's [student] the run's architecture (model, model_kwargs, "
                       "attention, rel_pos_bias), or set student.init_from = \"none\"")
    return path
