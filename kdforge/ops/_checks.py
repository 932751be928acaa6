"""Argument checks shared by the op wrappers: each failure says what was wrong, what was expected, what to do."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdforge.errors import ShapeError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def is_compiling() -> bool:
    """True while torch.compile traces: data-dependent checks (which sync the device) are skipped then."""
    try:
        return bool(torch.compiler.is_compiling())
    except AttributeError:  # older torch
        return False


def tensor(op: str, name: str, value: Any) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def floating(op: str, name: str, value: Tensor) -> None:
    if value.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{op}: {name} must be float16, bfloat16, float32 or float64, got {value.dtype}; cast it with "
            f"{name}.float()"
        )


def same_device(op: str, **tensors: Tensor | None) -> torch.device:
    named = [(n, t) for n, t in tensors.items() if t is not None]
    device = named[0][1].device
    for n, t in named[1:]:
        if t.device != device:
            where = ", ".join(f"{m} on {u.device}" for m, u in named)
            raise ShapeError(f"{op}: all tensors must be on one device, got {where}; move them with .to({device!s})")
    return device


def choice(op: str, name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{op}: {name} must be one of {', '.join(repr(a) for a in allowed)}, got {value!r}")


def row_index(op: str, index: Any, num_rows: int, device: torch.device) -> Tensor:
    """index as LongTensor[M] of distinct rows in [0, num_rows), on ``device``."""
    index = tensor(op, "index", index)
    if index.dim() != 1:
        raise ShapeError(f"{op}: index must be a 1-D LongTensor of flat row positions, got shape {tuple(index.shape)}")
    if index.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{op}: index must be an integer tensor (torch.long), got {index.dtype}")
    if index.device != device:
        raise ShapeError(f"{op}: index is on {index.device} but the inputs are on {device}; move it with .to({device!s})")
    index = index.long()
    if index.numel() and not is_compiling():
        # One host sync covers the range and the uniqueness check (sorted neighbours must differ).
        srt = index.sort().values
        bad = (srt[0] < 0) | (srt[-1] >= num_rows)
        if srt.numel() > 1:
            bad = bad | (srt[1:] == srt[:-1]).any()
        if bool(bad):
            lo, hi = int(srt[0]), int(srt[-1])
            if lo < 0 or hi >= num_rows:
                raise ShapeError(
                    f"{op}: index holds rows {lo}..{hi} but the inputs have {num_rows} rows (of "
                    f"x.reshape(-1, D)); every index must lie in [0, {num_rows})"
                )
            raise ShapeError(f"{op}: index lists a row more than once; pass distinct rows (e.g. index.unique())")
    return index


def bool_mask(op: str, mask: Any, leading: tuple[int, ...], what: str) -> Tensor:
    mask = tensor(op, "mask", mask)
    if mask.dtype != torch.bool:
        raise TypeError(f"{op}: mask must be a bool tensor, got {mask.dtype}; build it with a comparison or .bool()")
    if tuple(mask.shape) != tuple(leading):
        raise ShapeError(f"{op}: mask must be {list(leading)} (the leading dims of {what}), got {list(mask.shape)}")
    return mask
