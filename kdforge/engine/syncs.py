"""Counting the host synchronisations a piece of training code asks for.

A CUDA training step that reads a tensor's value on the host (``.item()``, ``float(t)``, ``bool(t)``, ``.tolist()``,
``.cpu()``, a data-dependent shape such as ``nonzero()``) waits there for the GPU to finish everything queued
before it: the CPU stops running ahead, and the next step's kernels start late. :class:`SyncCounter` counts such
calls made by kdforge's own code, on any device, so a CPU-only test can show that a step asks for none;
``torch.cuda.synchronize`` is counted wherever it is called from. On a GPU,
``torch.cuda.set_sync_debug_mode("error")`` is the complete check (it sees torch's internal synchronisations too);
the counter is the part of it that also runs on a CPU.

    with SyncCounter() as syncs:
        trainer.train_step(batches)
    assert syncs.count == 0, syncs.report()
"""

from __future__ import annotations

import collections
import sys
from pathlib import Path
from typing import Any

import torch

__all__ = ["HOST_SIDE", "SYNC_METHODS", "SyncCounter"]

#: Tensor methods that hand a device value to the host (or, for nonzero / masked_select, wait for a count).
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__", "nonzero",
                "masked_select", "unique", "any_value")
_PACKAGE = str(Path(__file__).resolve().parents[1])
#: kdforge modules that read CPU tensors by design: maskers draw on the CPU's generator (the masking contract), and
#: kdforge.masking.draw_on_host makes the masked patches' indices there, so that the device never counts them;
#: kdforge.data.augment_draws draws the device augmentation's parameters on the CPU and sends them in one copy.
HOST_SIDE = ("kdforge/masking/", "kdforge/data/augment_draws.py")


class SyncCounter:
    """Context manager counting :data:`SYNC_METHODS` calls whose caller is a kdforge module (``calls``: one
    ``(method, "file:line")`` per call; ``count``: how many), plus every ``torch.cuda.synchronize``.

    ``device_only``: count only calls on tensors that are not on the CPU (what synchronises on a GPU); the default
    counts calls on every tensor, so that a CPU run shows where a GPU run would wait. ``exclude``: path fragments
    of kdforge modules whose calls are host-side by design (default :data:`HOST_SIDE`)."""

    def __init__(self, *, device_only: bool = False, exclude: tuple[str, ...] = HOST_SIDE):
        self.device_only = device_only
        self.exclude = tuple(exclude)
        self.calls: list[tuple[str, str]] = []
        self._saved: dict[str, Any] = {}

    @property
    def count(self) -> int:
        return len(self.calls)

    def report(self) -> str:
        """One line per distinct call site: count, method, place."""
        counts = collections.Counter(self.calls)
        return "\n".join(f"{n} x {method} at {where}" for (method, where), n in counts.most_common()) or "none"

    def _caller(self) -> str | None:
        """'file:line' of the code that made the call when it is a kdforge module (not excluded); else None. Calls
        inside torch are not counted (torch.optim reads its CPU step counters; on a GPU the fused optimizer keeps
        them on the device): CUDA's sync debug mode is the check that sees those."""
        frame = sys._getframe(2)
        while frame is not None and frame.f_code.co_filename == __file__:
            frame = frame.f_back
        if frame is None:
            return None
        path = frame.f_code.co_filename
        if path.startswith(_PACKAGE) and not any(part in path for part in self.exclude):
            return f"{Path(path).relative_to(Path(_PACKAGE).parent)}:{frame.f_lineno}"
        return None

    def _wrap(self, name: str, original):
        counter = self

        def wrapper(tensor, *args, **kwargs):
            if not (counter.device_only and tensor.device.type == "cpu"):
                where = counter._caller()
                if where is not None:
                    counter.calls.append((name, where))
            return original(tensor, *args, **kwargs)

        return wrapper

    def __enter__(self) -> "SyncCounter":
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name, None)
            if original is None:
                continue
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        original_sync = torch.cuda.synchronize
        self._saved["cuda.synchronize"] = original_sync

        def synchronize(*args, **kwargs):
            self.calls.append(("torch.cuda.synchronize", self._caller() or "outside kdforge"))
            return original_sync(*args, **kwargs)

        torch.cuda.synchronize = synchronize
        return self

    def __exit__(self, *exc) -> None:
        torch.cuda.synchronize = self._saved.pop("cuda.synchronize")
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
