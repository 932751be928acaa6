"""AdamW parameter groups, with weight decay decided by parameter identity, never by substrings of module names.

Not decayed: 1-D parameters (norm weights), biases, and every parameter that a module of the model names in its
``no_weight_decay()`` (timm's convention, names relative to that module): a timm ViT's position embedding and
class / register tokens, a kdforge student's mask token and relative position bias tables. Everything else is
decayed, the loss heads' weights included. ``decay_also`` lists fnmatch patterns of full parameter names to decay
anyway (the released Proteus code decays every parameter of two or more dimensions: ``["*"]``; the released FD
code decays the shared relative position bias: ``["student.rel_pos_bias.*"]``).
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

from torch import nn

__all__ = ["param_groups", "weight_decay_split"]


def _exempt(model: nn.Module) -> set[int]:
    """ids of the parameters some module of ``model`` names in its ``no_weight_decay()``."""
    found: set[int] = set()
    for module in model.modules():
        names = getattr(module, "no_weight_decay", None)
        if not callable(names):
            continue
        params = dict(module.named_parameters())
        found |= {id(params[n]) for n in names() if n in params}
    return found


def weight_decay_split(model: nn.Module, decay_also: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """(decayed, not decayed) names of ``model``'s trainable parameters (see the module docstring)."""
    exempt = _exempt(model)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        skip = p.ndim <= 1 or name.endswith(".bias") or id(p) in exempt
        if skip and id(p) in exempt and p.ndim > 1 and any(fnmatch.fnmatchcase(name, pat) for pat in decay_also):
            skip = False
        (no_decay if skip else decay).append(name)
    return decay, no_decay


def param_groups(model: nn.Module, weight_decay: float, decay_also: Sequence[str] = ()) -> list[dict]:
    """The two AdamW groups of :func:`weight_decay_split`: ``weight_decay`` for the decayed, 0 for the rest."""
    decay, no_decay = weight_decay_split(model, decay_also)
    params = dict(model.named_parameters())
    return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
            {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
