"""The host side of :class:`kdforge.data.device_augment.DeviceAugment`: every per-sample random parameter of one
batch, drawn on the CPU from a ``torch.Generator`` seeded with the step's seed, grouped by operation and packed
into one small float32 tensor that reaches the device in a single transfer.

Each sample ``i`` takes its parameters from row ``i`` of one ``Tensor[B, K]`` of uniforms (normals by Box-Muller
from pairs of them), so a sample's parameters depend on the seed and its position only, never on the batch size
or on the other images. The rules that turn uniforms into parameters mirror timm's (``timm/data/auto_augment.py``:
``RandAugment``, ``AugmentOp``, the ``*_level_to_arg`` functions; ``timm/data/random_erasing.py``) and
torchvision's ``ColorJitter``, sample by sample in plain Python: a batch is a few hundred samples, and plain
Python reads like the code it follows.

This module reads the CPU tensor of uniforms on the host (one ``tolist``) by design: it is the one place
:class:`kdforge.engine.syncs.SyncCounter` has to be told to exclude (its tests do so by this file's path, and check
that it is the only call counted). Nothing here touches a device tensor.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch

__all__ = ["ErasePlan", "Layer", "Plan", "RandAugmentPolicy", "draw_plan"]

#: timm's RandAugment operations that DeviceAugment runs, and the level function each uses (see ``_level_arg``).
RAND_AUGMENT_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "PosterizeIncreasing", "PosterizeOriginal",
    "Solarize", "SolarizeIncreasing", "SolarizeAdd", "Color", "ColorIncreasing", "Contrast", "ContrastIncreasing",
    "Brightness", "BrightnessIncreasing", "Sharpness", "SharpnessIncreasing", "ShearX", "ShearY", "TranslateX",
    "TranslateY", "TranslateXRel", "TranslateYRel",
)  # fmt: skip
JITTER_OPS = ("JitterBrightness", "JitterContrast", "JitterSaturation", "JitterHue")
_LEVEL_DENOM = 10.0  # timm's: magnitude M maps to the fraction M / 10 of each operation's range


@dataclasses.dataclass(frozen=True)
class RandAugmentPolicy:
    """What DeviceAugment needs of a timm RandAugment: its operations (names), layers per image, probability of
    each layer, magnitude and its noise, choice weights (None: uniform, with replacement, as timm) and the hparams
    that shape the arguments (translation as a fraction of the side, or in pixels)."""

    ops: tuple[str, ...]
    num_layers: int
    prob: float
    magnitude: float
    magnitude_std: float
    magnitude_max: float
    weights: tuple[float, ...] | None
    translate_pct: float
    translate_const: float


@dataclasses.dataclass
class Layer:
    """One round of operations over the batch: ``count`` samples (those an operation applies to) in the order
    ``packed[index_at : index_at + count]`` gives (sample positions, grouped by operation), their arguments at
    ``packed[arg_at : arg_at + count]``; ``groups``: (operation, start, end) slices of that order."""

    index_at: int
    arg_at: int
    count: int
    groups: list[tuple[str, int, int]]


@dataclasses.dataclass
class ErasePlan:
    """Random erasing: ``count`` erased samples (positions at ``packed[index_at:]``), each with ``boxes`` boxes
    (top, left, height, width; an unused box has height 0) at ``packed[box_at:]`` as [count, boxes, 4], and for
    "rand" mode one normal colour per box at ``packed[colour_at:]`` as [count, boxes, 3]."""

    index_at: int
    box_at: int
    colour_at: int
    count: int
    boxes: int


@dataclasses.dataclass
class Plan:
    """Everything one call draws: ``packed`` (float32 CPU tensor, the one transfer), the layers in order, the
    erasing (None when nothing is erased) and ``params``, each sample's parameters as Python values (for tests
    and debugging: ``params[i]`` is a list of (operation, argument) in the order applied)."""

    packed: torch.Tensor
    layers: list[Layer]
    erase: ErasePlan | None
    params: list[list[tuple[str, float]]]


def _normal(u1: float, u2: float) -> float:
    """A standard normal from two uniforms in [0, 1) (Box-Muller)."""
    return math.sqrt(-2.0 * math.log(1.0 - u1)) * math.cos(2.0 * math.pi * u2)


def _level_arg(name: str, level: float, negate: bool, pol: RandAugmentPolicy, side: int) -> float:
    """timm's argument of operation ``name`` at magnitude ``level`` (its ``LEVEL_TO_ARG``), the sign flip drawn by
    the caller (timm's ``_randomly_negate``); translations in pixels of an image of side ``side``."""
    sign = -1.0 if negate else 1.0
    frac = level / _LEVEL_DENOM
    if name == "Rotate":
        return sign * frac * 30.0
    if name in ("ShearX", "ShearY"):
        return sign * frac * 0.3
    if name in ("TranslateXRel", "TranslateYRel"):
        return sign * frac * pol.translate_pct * side
    if name in ("TranslateX", "TranslateY"):
        return sign * frac * pol.translate_const
    if name == "Posterize":
        return float(int(frac * 4))
    if name == "PosterizeIncreasing":
        return float(4 - int(frac * 4))
    if name == "PosterizeOriginal":
        return float(int(frac * 4) + 4)
    if name == "Solarize":
        return float(min(256, int(frac * 256)))
    if name == "SolarizeIncreasing":
        return float(256 - min(256, int(frac * 256)))
    if name == "SolarizeAdd":
        return float(min(128, int(frac * 110)))
    if name in ("Color", "Contrast", "Brightness", "Sharpness"):
        return frac * 1.8 + 0.1
    if name in ("ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing", "SharpnessIncreasing"):
        return max(0.1, 1.0 + sign * frac * 0.9)
    return 0.0  # AutoContrast, Equalize, Invert take no argument


def _rand_augment(u: list[float], pol: RandAugmentPolicy, side: int) -> list[list[tuple[str, float] | None]]:
    """One sample's RandAugment as timm's ``RandAugment.__call__`` and ``AugmentOp.__call__`` draw it: per layer
    the operation, or None when the layer's probability skips it."""
    n = len(pol.ops)
    if pol.weights is None:  # np.random.choice(ops, num_layers, replace=True)
        chosen = [min(n - 1, int(u[k] * n)) for k in range(pol.num_layers)]
        u = u[pol.num_layers:]
    else:  # weighted, without replacement: the largest keys u ** (1 / w) (Efraimidis-Spirakis)
        keys = [u[k] ** (1.0 / w) if w > 0 else -1.0 for k, w in enumerate(pol.weights)]
        chosen = sorted(range(n), key=lambda k: -keys[k])[: pol.num_layers]
        u = u[n:]
    layers: list[tuple[str, float] | None] = []
    for k, op in enumerate(chosen):
        u_apply, u_m1, u_m2, u_sign = u[4 * k: 4 * k + 4]
        if pol.prob < 1.0 and u_apply > pol.prob:
            layers.append(None)
            continue
        m = pol.magnitude
        if pol.magnitude_std == math.inf:
            m = u_m1 * m
        elif pol.magnitude_std > 0:
            m = m + pol.magnitude_std * _normal(u_m1, u_m2)
        m = max(0.0, min(m, pol.magnitude_max))
        name = pol.ops[op]
        layers.append((name, _level_arg(name, m, u_sign > 0.5, pol, side)))
    return layers


def _rand_augment_width(pol: RandAugmentPolicy) -> int:
    return (pol.num_layers if pol.weights is None else len(pol.ops)) + 4 * pol.num_layers


def _jitter(u: list[float], s: float) -> list[tuple[str, float]] | None:
    """One sample's colour jitter as ``RandomApply([ColorJitter(0.4 s, 0.4 s, 0.4 s, min(0.1 s, 0.5))], p=0.8)``
    draws it: None when not applied, else the four operations in a random order with their factors."""
    if u[0] >= 0.8:  # RandomApply: applied when rand < p
        return None
    b = 0.4 * s
    h = min(0.1 * s, 0.5)
    factors = [max(0.0, 1 - b) + u[1 + k] * (1 + b - max(0.0, 1 - b)) for k in range(3)]
    factors.append(-h + u[4] * 2 * h)
    order = sorted(range(4), key=lambda k: u[5 + k])  # a uniformly random permutation (torch.randperm's law)
    return [(JITTER_OPS[k], factors[k]) for k in order]


def _erase(u: list[float], prob: float, max_count: int, side: int) -> list[tuple[int, int, int, int, list[float]]]:
    """One sample's boxes as timm's ``RandomErasing._erase`` draws them (area 2% to 1/3 of the image split over
    the boxes, log aspect ratio uniform in [log 0.3, log 1 / 0.3], 10 attempts per box), each with a normal colour
    for "rand" mode; [] when not erased."""
    if u[0] > prob:
        return []
    count = 1 if max_count == 1 else 1 + min(max_count - 1, int(u[1] * max_count))
    area = side * side / count
    boxes = []
    for b in range(count):
        for attempt in range(10):
            a = u[2 + (b * 10 + attempt) * 4: 6 + (b * 10 + attempt) * 4]
            target = (0.02 + a[0] * (1 / 3 - 0.02)) * area
            ratio = math.exp(math.log(0.3) + a[1] * (math.log(1 / 0.3) - math.log(0.3)))
            h = int(round(math.sqrt(target * ratio)))
            w = int(round(math.sqrt(target / ratio)))
            if w < side and h < side:
                top = min(side - h, int(a[2] * (side - h + 1)))
                left = min(side - w, int(a[3] * (side - w + 1)))
                c = u[2 + max_count * 40 + b * 6: 8 + max_count * 40 + b * 6]
                boxes.append((top, left, h, w, [_normal(c[2 * k], c[2 * k + 1]) for k in range(3)]))
                break
    return boxes


def draw_plan(batch: int, side: int, seed: int, policy: RandAugmentPolicy | None, jitter: float, re_prob: float,
              re_count: int) -> Plan:
    """The parameters of one batch of ``batch`` images of side ``side``, from a CPU generator seeded with
    ``seed``: RandAugment (``policy``, None: off), colour jitter of strength ``jitter`` (0: off) and random
    erasing (``re_prob``, at most ``re_count`` boxes)."""
    widths = [_rand_augment_width(policy) if policy is not None else 0, 9 if jitter > 0 else 0,
              2 + re_count * 46 if re_prob > 0 else 0]
    g = torch.Generator().manual_seed(seed % 2**63)
    uniforms = torch.rand(batch, max(1, sum(widths)), generator=g, dtype=torch.float64).tolist()
    values: list[float] = []
    params: list[list[tuple[str, float]]] = [[] for _ in range(batch)]
    rounds: list[list[tuple[str, float] | None]] = []  # rounds[i][sample]
    if policy is not None:
        drawn = [_rand_augment(row[: widths[0]], policy, side) for row in uniforms]
        rounds += [[d[k] for d in drawn] for k in range(policy.num_layers)]
    if jitter > 0:
        drawn_j = [_jitter(row[widths[0]: widths[0] + 9], jitter) for row in uniforms]
        rounds += [[d[k] if d is not None else None for d in drawn_j] for k in range(4)]
    layers = []
    for ops in rounds:
        members = sorted((op[0], i, op[1]) for i, op in enumerate(ops) if op is not None)
        groups: list[tuple[str, int, int]] = []
        for k, (name, i, arg) in enumerate(members):
            params[i].append((name, arg))
            if groups and groups[-1][0] == name:
                groups[-1] = (name, groups[-1][1], k + 1)
            else:
                groups.append((name, k, k + 1))
        if members:
            layers.append(Layer(len(values), len(values) + len(members), len(members), groups))
            values += [float(i) for _, i, _ in members] + [arg for _, _, arg in members]
    erase = None
    if re_prob > 0:
        start = widths[0] + widths[1]
        drawn_e = [_erase(row[start: start + widths[2]], re_prob, re_count, side) for row in uniforms]
        erased = [i for i, boxes in enumerate(drawn_e) if boxes]
        if erased:
            erase = ErasePlan(len(values), len(values) + len(erased), 0, len(erased), re_count)
            values += [float(i) for i in erased]
            colours: list[float] = []
            for i in erased:
                boxes = drawn_e[i] + [(0, 0, 0, 0, [0.0, 0.0, 0.0])] * (re_count - len(drawn_e[i]))
                for top, left, h, w, colour in boxes:
                    values += [float(top), float(left), float(h), float(w)]
                    colours += colour
                params[i] += [("Erase", float(len(drawn_e[i])))]
            erase.colour_at = len(values)
            values += colours
    return Plan(torch.tensor(values, dtype=torch.float32), layers, erase, params)


def policy_from_timm(transform: Any, translate_pct: float, translate_const: float) -> RandAugmentPolicy:
    """The :class:`RandAugmentPolicy` of a timm ``RandAugment`` object (its ops' names, layers, probability,
    magnitude and hparams); ValueError naming the first operation DeviceAugment does not run."""
    ops = transform.ops
    names = tuple(op.name for op in ops)
    unknown = [n for n in names if n not in RAND_AUGMENT_OPS]
    if unknown:
        raise ValueError(f"operation {unknown[0]} is not one augment.device_augment runs")
    first = ops[0]
    weights = transform.choice_weights
    return RandAugmentPolicy(
        ops=names, num_layers=int(transform.num_layers), prob=float(first.prob), magnitude=float(first.magnitude),
        magnitude_std=float(first.magnitude_std), magnitude_max=float(first.magnitude_max or _LEVEL_DENOM),
        weights=tuple(float(w) for w in weights) if weights is not None else None,
        translate_pct=float(first.hparams.get("translate_pct", 0.45)),
        translate_const=float(first.hparams.get("translate_const", translate_const)),
    )
