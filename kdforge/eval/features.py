"""Frozen features of a data set: the one input every evaluator shares."""

from __future__ import annotations

import logging
import sys
from typing import Callable

import torch

from kdforge.data import collate
from kdforge.engine import signals
from kdforge.errors import ShapeError

__all__ = ["extract_features"]

log = logging.getLogger("kdforge.eval")


def extract_features(
    encoder: Callable[[torch.Tensor], torch.Tensor],
    dataset: torch.utils.data.Dataset,
    *,
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    num_workers: int = 0,
    desc: str = "features",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run ``encoder`` over ``dataset`` in inference mode: (float32 Tensor[N, D], LongTensor[N]) on the CPU.

    ``encoder`` maps ``Tensor[B, 3, H, W]`` (float in [0, 1], on ``device``) to ``Tensor[B, D]``; an
    ``nn.Module`` is put in eval mode for the pass and restored afterwards. Unreadable items (Skipped) are left
    out, so N can be smaller than ``len(dataset)``; how many is logged. Rows follow the dataset's order.
    """
    from tqdm.auto import tqdm

    device = torch.device(device)
    loader = signals.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=device.type == "cuda",
    )
    module = encoder if isinstance(encoder, torch.nn.Module) else None
    was_training = module.training if module is not None else False
    if module is not None:
        module.eval()
    feats: list[torch.Tensor] = []
    labels: list[torch.Tensor] = []
    skipped = 0
    try:
        with torch.inference_mode():
            bar = tqdm(loader, desc=desc, unit="batch", leave=False, disable=not sys.stderr.isatty())
            for batch in bar:
                signals.check("evaluation")
                skipped += len(batch["skipped"])
                if len(batch["label"]) == 0:
                    continue
                out = encoder(batch["image"].to(device, non_blocking=True))
                if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[0] != len(batch["label"]):
                    got = list(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ShapeError(
                        f"the encoder must map images [B, 3, H, W] to features [B, D], got {got} for "
                        f"B = {len(batch['label'])}: pool or select the tokens (e.g. the CLS token) first"
                    )
                feats.append(out.float().cpu())
                labels.append(batch["label"])
    finally:
        if module is not None:
            module.train(was_training)
    if skipped:
        log.warning("%d unreadable images were left out of the %s", skipped, desc)
    if not feats:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(feats), torch.cat(labels)
