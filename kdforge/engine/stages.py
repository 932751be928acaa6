"""Running a multi-stage recipe (:mod:`kdforge.recipe.stages`): each stage is an ordinary run of the one engine
(:class:`kdforge.engine.trainer.Trainer`) in its own sub-directory of the run directory, in order.

- A fresh run (no ``--resume``) needs every stage it runs to find its directory fresh.
- ``--resume`` skips the finished stages (a stage is finished when its summary.json exists), continues the
  unfinished one from its last.pt, and starts the later ones.
- ``--stage NAME`` runs that stage alone; the stages it reads ("stage:NAME" references) must be finished.
- The run directory holds the recipe (recipe.toml, with its stages) and summary.json, which gathers every finished
  stage's summary under ``stages`` and is rewritten after each stage.

A stage that reads an earlier stage's output (an adapted teacher, a student to fine-tune) is only built once that
stage is finished, so a missing output is one clear error before the stage writes anything.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kdforge.engine import checkpoint as ckpt
from kdforge.engine import runs
from kdforge.errors import KdforgeError, RecipeError, RunDirectoryError
from kdforge.recipe import Recipe, dump_toml
from kdforge.recipe.schema import did_you_mean
from kdforge.recipe.stages import Stage, stage_recipes

__all__ = ["finished", "run_stages"]

SUMMARY = "summary.json"


def finished(stage_dir: Path) -> bool:
    """Whether the stage in ``stage_dir`` ran to its end (the trainer writes summary.json only then)."""
    return (stage_dir / SUMMARY).is_file()


def _read_summary(stage_dir: Path) -> dict[str, Any]:
    try:
        return json.loads((stage_dir / SUMMARY).read_text())
    except (OSError, ValueError) as exc:
        raise KdforgeError(f"cannot read the finished stage's {stage_dir / SUMMARY} ({exc}): remove it to run the "
                           "stage again") from None


def _gather(run_dir: Path, stages: list[Stage]) -> dict[str, Any]:
    """The run's summary: every finished stage's summary by name, and which stages are not finished."""
    done = {s.name: _read_summary(s.run_dir) for s in stages if finished(s.run_dir)}
    summary = {"stages": done, "unfinished": [s.name for s in stages if s.name not in done]}
    with ckpt.atomic_path(run_dir / SUMMARY) as tmp:
        tmp.write_text(json.dumps(summary, indent=2))
    return summary


def _stage_report(name: str, summary: dict[str, Any]) -> str:
    """One line per stage for the terminal: its evaluation results and size."""
    shown = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not k.startswith("skipped")
             and k not in ("total_steps", "global_batch", "peak_lr")}
    return f"stage {name}: " + ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                         for k, v in shown.items())


def run_stages(recipe: Recipe, run_dir: str | Path, *, resume: bool = False, only: str | None = None,
               show_progress: bool = True, allow_changes: bool = False,
               echo: Callable[[str], None] = lambda line: print(line, file=sys.stderr)) -> dict[str, Any]:
    """Run the stages of ``recipe`` in ``run_dir`` (see the module docstring); returns the run's summary.

    Raises :class:`kdforge.engine.signals.Preempted` when SIGTERM stops a stage (its checkpoint written; run again
    with ``resume``), :class:`KdforgeError` for what must be fixed first."""
    from kdforge.engine.trainer import Trainer

    run_dir = Path(run_dir)
    stages = stage_recipes(recipe, run_dir)
    names = [s.name for s in stages]
    if only is not None and only not in names:
        raise KdforgeError(f"--stage {only}: the recipe has no such stage (stages: {', '.join(names)}); "
                           f"{did_you_mean(only, names)}")
    todo = [s for s in stages if only is None or s.name == only]
    runs.check_run_dir(run_dir, fresh=False)
    # Everything that can be checked before the first stage runs is, and nothing is written until it passes: fresh
    # directories, the stages each one reads, and each stage's training data (a few-shot subset larger than a class,
    # a student whose classifier does not match the task), so that a mistake in the last stage does not surface
    # after hours of the first.
    for s in todo:
        if not resume:
            if finished(s.run_dir):
                raise RunDirectoryError(f"stage '{s.name}' already ran in '{s.run_dir}': add --resume to continue "
                                        "the run (finished stages are not run again), or pick another --output-dir")
            runs.check_run_dir(s.run_dir, fresh=True)
        for earlier in s.reads:
            if not finished(run_dir / earlier) and earlier not in [t.name for t in todo[: todo.index(s)]]:
                raise KdforgeError(
                    f"stage '{s.name}' reads the output of stage '{earlier}' ({run_dir / earlier}), which has not "
                    f"finished: run the whole recipe (kdforge train RECIPE --output-dir {run_dir}"
                    f"{' --resume' if resume else ''}) or that stage first (--stage {earlier})")
    for s in todo:
        if not (resume and finished(s.run_dir)):
            pending = [run_dir / r for r in s.reads if not finished(run_dir / r)]
            preflight(s, pending)
    is_main = os.environ.get("RANK", "0") == "0"  # under torchrun every process runs the stages, one writes
    lock = None
    try:
        for s in todo:
            if resume and finished(s.run_dir):
                echo(f"kdforge: stage {s.name} finished earlier ({s.run_dir}): not run again")
                continue
            restart = resume and (s.run_dir / "last.pt").is_file()
            if resume and not restart and is_main:
                _remove_attempt(s.run_dir)
            echo(f"kdforge: stage {s.name} ({names.index(s.name) + 1}/{len(names)}): "
                 f"{'continuing' if restart else 'starting'} in {s.run_dir}")
            if s.kind == "retrieve":
                from kdforge.retrieval.pipeline import run_retrieval

                if lock is None and is_main:
                    lock = _start(run_dir, recipe)
                summary = run_retrieval(s.recipe, s.run_dir, show_progress=show_progress, echo=echo)
            else:
                trainer = Trainer(s.recipe, s.run_dir, resume="auto" if restart else None,
                                  show_progress=show_progress, allow_changes=allow_changes)
                try:
                    if lock is None and is_main:  # the run is known to start: only now is anything written
                        lock = _start(run_dir, recipe)
                    summary = trainer.fit()
                finally:
                    trainer.close()
            if is_main:
                echo(_stage_report(s.name, summary))
                _gather(run_dir, stages)
        return _gather(run_dir, stages) if is_main and run_dir.is_dir() else {}
    finally:
        if lock is not None:
            lock.release()


def _start(run_dir: Path, recipe: Recipe) -> runs.RunLock:
    """Hold the run directory and write the recipe into it: the first stage is known to start."""
    lock = runs.RunLock(run_dir)
    lock.acquire()
    with ckpt.atomic_path(run_dir / "recipe.toml") as tmp:
        tmp.write_text(dump_toml(recipe))
    return lock


def preflight(stage: Stage, pending: list[Path] = ()) -> None:
    """The checks of a stage that need its data but no model: its training data builds (a few-shot subset needs
    enough images of each class), a student with its own classifier has the training data's number of classes,
    and the test set of the "classifier" evaluators is labelled with that many. A stage whose data an unfinished
    earlier stage writes (its directory in ``pending``: a retrieved transfer set) is checked when it starts.
    Raises :class:`KdforgeError` naming the stage."""
    from kdforge.engine.trainer import check_eval_classes
    from kdforge.plugins import get_registry

    r = stage.recipe
    registry = get_registry()
    if stage.kind == "retrieve":
        return  # its data is the gallery: checked when the recipe was read, built when the stage runs
    if any(str(p) in json.dumps(r.data) for p in pending):
        return  # its data is what an earlier stage of this run writes (a retrieved transfer set)
    try:
        source = registry.create("data_sources", r.data, "data")
        source.build("train", None)
        classes = source.num_classes
        want = int(r.student.get("num_classes", 0) or 0)
        if want and classes and want != classes:
            raise RecipeError(f"student.num_classes = {want} but the training data has {classes} classes: set "
                              f"student.num_classes = {classes}")
        check_eval_classes(r, want or classes)
    except KdforgeError as exc:
        raise type(exc)(f"stage '{stage.name}': {exc}") from None


def _remove_attempt(stage_dir: Path) -> None:
    """What a stage's attempt wrote before its first checkpoint (a kill leaves metrics and a recipe behind), so
    that it can start again; never anything else."""
    for name in runs.RUN_FILES:
        path = stage_dir / name
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
