"""SIGTERM as cluster schedulers send it: a stop request that long loops honour at a safe point.

Slurm and Kubernetes send SIGTERM to every process of the job (the process group), then SIGKILL after a grace
period. kdforge turns it into a flag: inside :func:`stop_on_sigterm` the handler only records the request, and the
loops that take time (training steps, evaluation, first-use teacher training, gallery embedding) call
:func:`check` at points where stopping loses nothing, which raises :class:`Preempted`. The trainer writes a
checkpoint when it has training state and the command exits 0.

DataLoader worker processes must not die of that SIGTERM first (PyTorch's workers exit on it, and the main process
then fails with "DataLoader worker ... is killed by signal"): :class:`DataLoader` starts its workers with SIGTERM
blocked and has them ignore it, so the main process decides when they stop.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from typing import Callable, Iterator

import torch

__all__ = ["DataLoader", "Preempted", "check", "requested", "stop_on_sigterm"]


class Preempted(Exception):
    """SIGTERM arrived and the work stopped at a safe point (a checkpoint was written where there was training
    state); the command exits with code 0."""


_requested = False
_depth = 0  # nesting of stop_on_sigterm: the outermost one installs and restores the handler


def _on_sigterm(signum, frame) -> None:
    global _requested
    _requested = True


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[None]:
    """Within the block, SIGTERM sets the stop request instead of killing the process (see :func:`check`).

    Re-entrant; the outermost block clears the request on entry and restores the previous handler on exit. Outside
    the main thread (where Python cannot install handlers) it does nothing.
    """
    global _depth, _requested
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if _depth == 0:
        _requested = False
        old = signal.signal(signal.SIGTERM, _on_sigterm)
    _depth += 1
    try:
        yield
    finally:
        _depth -= 1
        if _depth == 0:
            signal.signal(signal.SIGTERM, old)


def requested() -> bool:
    """True once SIGTERM arrived inside :func:`stop_on_sigterm`."""
    return _requested


def check(what: str) -> None:
    """Raise :class:`Preempted` if SIGTERM arrived; ``what`` names the work that stops ("evaluation" ...)."""
    if _requested:
        raise Preempted(f"SIGTERM during {what}")


def _ignore_sigterm(worker_init_fn: Callable[[int], None] | None, worker_id: int) -> None:
    # Workers were started with SIGTERM blocked; ignoring it before unblocking drops one that is pending.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
    if worker_init_fn is not None:
        worker_init_fn(worker_id)


@contextlib.contextmanager
def _sigterm_blocked() -> Iterator[None]:
    """SIGTERM held back (not lost) in this thread while worker processes are forked, so none dies of it before it
    can ignore it; delivered to the handler when the block ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


class DataLoader(torch.utils.data.DataLoader):
    """``torch.utils.data.DataLoader`` whose worker processes ignore SIGTERM (see the module docstring); the main
    process shuts them down when it stops. Takes the same arguments."""

    def __init__(self, *args, worker_init_fn: Callable[[int], None] | None = None, **kwargs):
        super().__init__(*args, worker_init_fn=functools.partial(_ignore_sigterm, worker_init_fn), **kwargs)

    def __iter__(self):
        with _sigterm_blocked():
            return super().__iter__()
