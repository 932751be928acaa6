"""Batches on the training device one step ahead: the loader's next batch crosses to the GPU on a side stream
while the current step runs.

The loader pins its batches (``pin_memory``), so each copy is queued and returns at once; the main stream waits for
the side stream only when it takes the batch, and each tensor is marked as used by the main stream
(``record_stream``) so its memory is not handed out again while a step still reads it. On a CPU the batches pass
through as they are. Host-side checks (unreadable images, labels) are the caller's, on the CPU batch it is handed
with the device one: the prefetcher reads one batch ahead, and a batch read but never trained on (the run stops
there) must not be counted.
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch

__all__ = ["DevicePrefetcher", "to_device"]


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """``batch`` with every tensor on ``device`` (non-blocking; a tensor already there is not copied)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class DevicePrefetcher:
    """Iterate ``batches`` (CPU dicts), yielding ``(host_batch, device_batch)`` pairs."""

    def __init__(self, batches: Iterable[dict[str, Any]], device: torch.device):
        self.batches, self.device = batches, device

    def __iter__(self) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
        it = iter(self.batches)
        if self.device.type != "cuda":
            for batch in it:
                yield batch, to_device(batch, self.device)
            return
        side = torch.cuda.Stream(self.device)
        main = torch.cuda.current_stream(self.device)

        def send(batch):
            with torch.cuda.stream(side):
                return to_device(batch, self.device)

        host = next(it, None)
        if host is None:
            return
        sent = send(host)
        while True:
            main.wait_stream(side)
            for v in sent.values():
                if isinstance(v, torch.Tensor) and v.device.type == "cuda":
                    v.record_stream(main)
            current = (host, sent)
            host = next(it, None)
            if host is not None:
                sent = send(host)
            yield current
            if host is None:
                return
