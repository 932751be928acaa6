"""Loading local weight files into a model, with errors that say what to do.

Accepted files: ``.safetensors`` (or a folder holding ``model.safetensors``: timm's and the Hugging Face hub's
layout, which ``kdforge export`` writes), or ``.pth`` / ``.pt`` / ``.bin`` / ``.ckpt`` written by ``torch.save``
holding a state dict, ``{"model": state_dict}``, ``{"state_dict": state_dict}`` (or any key named by ``key``).
Prefixes that wrappers add (``module.`` from DDP, ``_orig_mod.`` from torch.compile) are stripped.
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from kdforge.errors import KdforgeError, ShapeError

__all__ = ["read_state_dict", "load_into", "WRAPPER_PREFIXES"]

WRAPPER_PREFIXES = ("module.", "_orig_mod.")
_NESTED_KEYS = ("model", "state_dict", "model_state_dict", "teacher")
_HOW_MANY = 5  # keys listed per kind of mismatch; more would bury the message
_HINT = ("Check that the model name and model_kwargs (embed_dim, depth, patch_size, img_size, reg_tokens ...) match "
         "the ones the file was trained with.")


def read_state_dict(path: str, *, key: str = "", trust_pickle: bool = False, where: str = "checkpoint") -> dict:
    """The flat ``{name: Tensor}`` state dict stored in ``path``.

    ``key`` picks a nested entry (``"model"``, ``"teacher"`` ...); empty tries ``model``, ``state_dict``,
    ``model_state_dict``, ``teacher`` and then the top level. ``trust_pickle`` allows torch.load to run arbitrary
    pickled code (only for files you trust; needed by checkpoints that store Python objects beside the weights).
    """
    path = os.path.expanduser(str(path))
    if os.path.isdir(path) and os.path.isfile(os.path.join(path, "model.safetensors")):
        path = os.path.join(path, "model.safetensors")  # a timm / Hugging Face folder (kdforge export writes one)
    if not os.path.isfile(path):
        hint = "it is a directory; name the weight file inside it" if os.path.isdir(path) else "no such file"
        raise KdforgeError(
            f"{where} = '{path}': {hint}. Point it at a local .safetensors / .pth / .pt weight file "
            "(download it first on a machine with network access), or remove the key to skip loading weights."
        )
    if path.endswith(".safetensors"):
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(path, device="cpu")
        except (SafetensorError, OSError) as exc:
            raise KdforgeError(f"{where} = '{path}' is not a readable .safetensors file: {exc}") from exc
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
        except pickle.UnpicklingError as exc:
            raise KdforgeError(
                f"{where} = '{path}' stores Python objects besides tensors, which torch.load refuses to unpickle "
                f"safely ({str(exc).splitlines()[0]}). If you trust the file, set trust_pickle = true; better, "
                "re-save only the weights: torch.save(ckpt['model'], 'weights.pth')"
            ) from exc
        except (RuntimeError, OSError, EOFError) as exc:
            raise KdforgeError(f"{where} = '{path}' is not a readable torch checkpoint: {exc}") from exc
    return _unwrap(obj, key, path, where)


def _unwrap(obj: Any, key: str, path: str, where: str) -> dict:
    if key:
        if not isinstance(obj, Mapping) or key not in obj:
            keys = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
            raise KdforgeError(f"{where} = '{path}' has no entry '{key}'; top-level entries: {keys}")
        obj = obj[key]
    else:
        while isinstance(obj, Mapping) and not _is_state_dict(obj):
            nested = next((k for k in _NESTED_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if nested is None:
                break
            obj = obj[nested]
    if not isinstance(obj, Mapping) or not _is_state_dict(obj):
        keys = list(obj.keys())[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise KdforgeError(
            f"{where} = '{path}' does not hold a state dict of tensors (found {keys}); name the entry that holds "
            "the weights with checkpoint_key"
        )
    sd = {}
    for name, value in obj.items():
        for prefix in WRAPPER_PREFIXES:
            while name.startswith(prefix):
                name = name[len(prefix):]
        sd[name] = value
    return sd


def _is_state_dict(obj: Mapping) -> bool:
    return len(obj) > 0 and all(isinstance(k, str) for k in obj) and any(isinstance(v, torch.Tensor) for v in obj.values())


def load_into(
    model: nn.Module,
    state_dict: dict,
    *,
    path: str,
    where: str = "checkpoint",
    ignore: Callable[[str], bool] = lambda name: False,
    hint: str = _HINT,
) -> None:
    """Copy ``state_dict`` into ``model``, all keys and shapes matching (keys for which ``ignore`` is true may be
    extra or missing). Raises ShapeError listing a few missing, unexpected and mis-shaped keys otherwise, then
    ``hint`` (what to check)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict and not ignore(k)]
    unexpected = [k for k in state_dict if k not in own and not ignore(k)]
    mis_shaped = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or mis_shaped:
        parts = []
        for label, items in (("missing in file", missing), ("not in model", unexpected), ("shape differs", mis_shaped)):
            if items:
                more = f" (+{len(items) - _HOW_MANY} more)" if len(items) > _HOW_MANY else ""
                parts.append(f"{label} ({len(items)}): {', '.join(items[:_HOW_MANY])}{more}")
        raise ShapeError(f"{where} = '{path}' does not fit the model: " + "; ".join(parts) + ". " + hint)
    model.load_state_dict({k: v for k, v in state_dict.items() if k in own}, strict=False)
