"""AdamW parameter groups: weight decay decided by parameter identity, never by substrings of module names, and
optionally a learning-rate scale per layer (layer-wise lr decay).

Not decayed: 1-D parameters (norm weights), biases, and every parameter that a module of the model names in its
``no_weight_decay()`` (timm's convention, names relative to that module): a timm ViT's position embedding and
class / register tokens, a kdforge student's mask token and relative position bias tables. Everything else is
decayed, the loss heads' weights included. ``decay_also`` lists fnmatch patterns of full parameter names to decay
anyway (the released Proteus code decays every parameter of two or more dimensions: ``["*"]``; the released FD
code decays the shared relative position bias: ``["student.rel_pos_bias.*"]``).

Layer-wise lr decay (BEiT; FD's fine-tuning uses 0.6 for ViT-B): with L blocks, a parameter of layer ``i`` (0 for
the embeddings, b + 1 for block b, L + 1 for everything after the blocks, the heads included) trains at
``lr * layer_decay ** (L + 1 - i)``. The student numbers its own parameters (``layer_ids()``, see
:meth:`kdforge.students.timm_student.TimmStudent.layer_ids`); every parameter outside it is in layer L + 1. Each
group then carries its ``lr_scale``, which the trainer multiplies into the scheduled lr. timm's
``param_groups_layer_decay`` is not used: it puts the final norm and the head in the last block's layer, so the
last block would train at the full lr, where FD's and BEiT's released code scale it by ``layer_decay``.
"""

from __future__ import annotations

import fnmatch
from typing import Sequence

from torch import nn

from kdforge.errors import RecipeError

__all__ = ["layer_scales", "param_groups", "weight_decay_split"]


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


def layer_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """{parameter name: lr scale} = ``layer_decay ** (L + 1 - layer)`` (see the module docstring), from the one
    submodule of ``model`` that numbers its layers (``layer_ids() -> ({name: layer}, L)``, names relative to it)."""
    numbered = [(prefix, m) for prefix, m in model.named_modules() if callable(getattr(m, "layer_ids", None))]
    if len(numbered) != 1:
        what = "no module" if not numbered else f"{len(numbered)} modules ({', '.join(p for p, _ in numbered)})"
        raise RecipeError(
            f"optim.layer_decay = {layer_decay:g} needs one student that numbers its layers (layer_ids()), but the "
            f"model has {what}: use a student that does (the timm student), or set optim.layer_decay = 1.0"
        )
    prefix, module = numbered[0]
    ids, num_layers = module.layer_ids()
    full = {f"{prefix}.{n}" if prefix else n: i for n, i in ids.items()}
    return {name: layer_decay ** (num_layers + 1 - full.get(name, num_layers + 1))
            for name, _ in model.named_parameters()}


def param_groups(model: nn.Module, weight_decay: float, decay_also: Sequence[str] = (),
                 layer_decay: float = 1.0) -> list[dict]:
    """AdamW groups: ``weight_decay`` for the decayed parameters of :func:`weight_decay_split`, 0 for the rest;
    with ``layer_decay`` < 1, one such pair per layer, each with its ``lr_scale`` (:func:`layer_scales`)."""
    decay, no_decay = weight_decay_split(model, decay_also)
    params = dict(model.named_parameters())
    if layer_decay == 1.0:
        return [{"params": [params[n] for n in decay], "weight_decay": weight_decay},
                {"params": [params[n] for n in no_decay], "weight_decay": 0.0}]
    scales = layer_scales(model, layer_decay)
    groups: dict[tuple[float, float], dict] = {}
    for names, wd in ((decay, weight_decay), (no_decay, 0.0)):
        for n in names:
            group = groups.setdefault((scales[n], wd), {"params": [], "weight_decay": wd, "lr_scale": scales[n]})
            group["params"].append(params[n])
    return sorted(groups.values(), key=lambda g: (g["lr_scale"], -g["weight_decay"]))
