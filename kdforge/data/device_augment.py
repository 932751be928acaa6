"""The device half of ``augment.device_augment``: RandAugment, colour jitter, conversion to float and random
erasing, batched on the images' device.

With ``augment.device_augment = true`` the DataLoader workers only decode, crop and flip, in uint8
(:class:`kdforge.data.transforms.CropFlipTransform`), and the trainer calls ``DeviceAugment(cfg)(images, seed)``
on each batch right after moving it to the device. What :class:`kdforge.data.transforms.ImageTransform` does per
image after the flip happens here per batch:

- timm's RandAugment (``cfg.auto_augment``, the "rand-..." policies: layers per image, the probability of each,
  magnitude and its noise ``mstd``, the operation set incl. ``inc1``'s increasing one, choice weights), with
  timm's argument ranges and sign flips (:mod:`kdforge.data.augment_draws`), fill ``re_mean * 255`` and the
  recipe's interpolation, as :func:`kdforge.data.transforms._auto_augment` gives timm;
- colour jitter (``cfg.color_jitter`` s: probability 0.8, brightness, contrast and saturation 0.4 s, hue
  min(0.1 s, 0.5), in a random order), as torchvision's ``ColorJitter`` on uint8 images;
- conversion to float32 in [0, 1], then random erasing (``re_prob``, ``re_mode``, ``re_count``) in the space
  normalised by ``re_mean`` / ``re_std``, exactly as ImageTransform documents it (erased pixels may leave [0, 1]).

Every per-sample parameter is drawn on the CPU from a ``torch.Generator`` seeded with ``seed`` (the trainer's
per-step seed: a resumed run redraws them identically), packed into one small tensor and moved to the device in
one transfer; operations are grouped by kind from those CPU-side values, so the device never reports anything
back: no ``.item()``, no data-dependent shape, no host synchronisation. The per-pixel noise of "pixel" erasing is
the exception to drawing on the CPU (it is as large as the images): it comes from a generator on the images'
device seeded from ``seed``, so it repeats on a given kind of device, not across CPU and GPU.

Same augmentation distribution as the worker path, not bit-identical (tests/data/test_device_augment.py compares
each operation with timm's PIL one):

- the random numbers come from torch's generator, not Python's ``random`` and numpy's;
- rotate, shear and translate resample with ``grid_sample`` (bicubic: a = -0.75, PIL's a = -0.5; edge pixels
  clamped), fill where the source point falls outside the image as PIL does;
- the working image is float in 0..255, rounded to integers after every operation as PIL's uint8 images are;
  autocontrast, equalize, invert, posterize, solarize and solarize-add are Pillow's lookup tables computed
  exactly; the blends (brightness, colour, contrast, sharpness and its smoothing filter) follow Pillow's integer
  and truncation rules in float32 (Pillow: float), equal on the tests' images, a level apart at worst;
- colour jitter's hue works in float HSV and rounds; torchvision truncates.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from kdforge.data.augment_draws import Plan, RandAugmentPolicy, draw_plan, policy_from_timm
from kdforge.data.transforms import TransformConfig, _auto_augment

__all__ = ["DeviceAugment", "check_policy"]


def check_policy(cfg: TransformConfig) -> RandAugmentPolicy:
    """The RandAugment policy of ``cfg.auto_augment`` as DeviceAugment runs it; ValueError for a policy it cannot
    run (AutoAugment, AugMix, operations outside timm's RandAugment sets), saying what to do instead."""
    transform = _auto_augment(cfg)
    if not cfg.auto_augment.startswith("rand") or not hasattr(transform, "num_layers"):
        raise ValueError(
            f"augment.device_augment runs timm's RandAugment policies ('rand-...'), not auto_augment = "
            f"'{cfg.auto_augment}': use a RandAugment policy such as 'rand-m9-mstd0.5-inc1', or set "
            "augment.device_augment = false to run this policy in the workers"
        )
    try:
        return policy_from_timm(transform, 0.45, cfg.image_size * 0.45)
    except ValueError as exc:
        raise ValueError(
            f"auto_augment = '{cfg.auto_augment}': {exc}; drop it from the policy (e.g. 'rand-m9-mstd0.5-inc1') or "
            "set augment.device_augment = false"
        ) from None


# ------------------------------------------------------------------------------------------ operations
# Each takes x: float Tensor[n, 3, S, S] of integers in 0..255 and a: Tensor[n] of arguments, returns the same.

def _grey(x: torch.Tensor) -> torch.Tensor:
    """Pillow's RGB -> L: (R 19595 + G 38470 + B 7471 + 2^15) >> 16, Tensor[n, 1, S, S] (exact in float32)."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    return torch.floor((r * 19595 + g * 38470 + b * 7471 + 32768) / 65536)


def _blend(degenerate: torch.Tensor, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(degenerate, x, factor)`` on 8-bit images: clipped to 0..255, truncated."""
    return (degenerate + factor.view(-1, 1, 1, 1) * (x - degenerate)).clamp_(0, 255).floor_()


def _brightness(x, a):
    return _blend(torch.zeros_like(x), x, a)


def _color(x, a):
    return _blend(_grey(x).expand_as(x), x, a)


def _contrast(x, a):
    mean = torch.floor(_grey(x).mean(dim=(1, 2, 3), keepdim=True) + 0.5)
    return _blend(mean.expand_as(x), x, a)


def _sharpness(x, a):
    # Pillow's SMOOTH filter (3x3, centre 5, others 1, / 13); it leaves the one-pixel border as it is
    kernel = torch.ones(3, 1, 3, 3, dtype=x.dtype, device=x.device)
    kernel[:, :, 1, 1] = 5.0
    smooth = torch.round(F.conv2d(x, kernel / 13.0, groups=3))
    degenerate = x.clone()
    degenerate[:, :, 1:-1, 1:-1] = smooth
    return _blend(degenerate, x, a)


def _invert(x, a):
    return 255.0 - x


def _posterize(x, a):
    step = torch.pow(2.0, 8.0 - a.clamp(0, 8)).view(-1, 1, 1, 1)  # keep `bits` high bits; 0 bits: black
    return torch.floor(x / step) * step


def _solarize(x, a):
    return torch.where(x >= a.view(-1, 1, 1, 1), 255.0 - x, x)


def _solarize_add(x, a):
    return torch.where(x < 128, (x + a.view(-1, 1, 1, 1)).clamp(max=255), x)


def _autocontrast(x, a):
    """Pillow's autocontrast (cutoff 0), per channel: lut[i] = int(i * scale + offset), identity when flat."""
    n, c, h, w = x.shape
    lo = x.amin(dim=(2, 3)).double().unsqueeze(-1)  # [n, 3, 1]
    hi = x.amax(dim=(2, 3)).double().unsqueeze(-1)
    scale = 255.0 / (hi - lo).clamp(min=1)
    # the 256-entry table in float64, as Pillow computes it: float32 would put some levels one lower
    levels = torch.arange(256, device=x.device, dtype=torch.float64)
    lut = torch.floor(levels * scale + (-lo * scale)).clamp_(0, 255).to(x.dtype)
    lut = torch.where(hi > lo, lut, levels.to(x.dtype))
    return lut.view(n * c, 256).gather(1, x.reshape(n * c, h * w).long()).view(n, c, h, w)


def _equalize(x, a):
    """Pillow's equalize, per channel: step = (pixels - count of the highest level present) // 255,
    lut[i] = (step // 2 + pixels below i) // step; identity when one level or step 0."""
    n, c, h, w = x.shape
    levels = x.reshape(n * c, h * w).long()
    hist = torch.zeros(n * c, 256, dtype=torch.long, device=x.device).scatter_add_(1, levels, torch.ones_like(levels))
    present = hist > 0
    top = (present * torch.arange(256, device=x.device)).amax(dim=1, keepdim=True)
    step = torch.div(h * w - hist.gather(1, top), 255, rounding_mode="floor")
    below = hist.cumsum(1) - hist
    lut = torch.div(below + torch.div(step, 2, rounding_mode="floor"), step.clamp(min=1), rounding_mode="floor")
    out = lut.clamp(max=255).gather(1, levels).to(x.dtype).view(n, c, h, w)
    keep = ((present.sum(1, keepdim=True) <= 1) | (step == 0)).view(n, c, 1, 1)
    return torch.where(keep, x, out)


def _affine(x: torch.Tensor, m: torch.Tensor, fill: torch.Tensor, mode: str) -> torch.Tensor:
    """PIL's ``transform(AFFINE, (a, b, c, d, e, f))`` batched: output point (x, y) (pixel corners at integers)
    samples the input at (a x + b y + c, d x + e y + f); ``m``: Tensor[n, 2, 3] of those; points outside the
    input get ``fill`` (Tensor[3])."""
    n, _, h, w = x.shape
    # to grid_sample's normalised coordinates (align_corners=False: -1 and 1 are the outer pixel edges):
    # p = D (u + 1) with D = diag(w / 2, h / 2), so u_in = D^-1 (A D (u_out + 1) + t) - 1
    d = torch.tensor([w / 2.0, h / 2.0], dtype=x.dtype, device=x.device)
    a = m[:, :, :2] * d.view(1, 1, 2) / d.view(1, 2, 1)
    t = (m[:, :, :2] @ d.view(1, 2, 1).expand(n, 2, 1) + m[:, :, 2:]) / d.view(1, 2, 1) - 1
    grid = F.affine_grid(torch.cat([a, t], dim=2), [n, 3, h, w], align_corners=False)
    out = F.grid_sample(x, grid, mode=mode, padding_mode="border", align_corners=False)
    inside = ((grid >= -1) & (grid < 1)).all(dim=-1).unsqueeze(1)
    return torch.where(inside, out, fill.view(1, 3, 1, 1)).round_().clamp_(0, 255)


def _affine_op(build: Callable[[torch.Tensor, int], torch.Tensor]):
    def op(self: "DeviceAugment", x: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return _affine(x, build(a, x.shape[-1]), self._fill.to(x.device), self._mode)
    return op


def _matrix(*rows) -> torch.Tensor:
    return torch.stack([torch.stack(list(r), dim=-1) for r in rows], dim=1)


def _rotate_matrix(a: torch.Tensor, side: int) -> torch.Tensor:
    # PIL's rotate(degrees) about the centre: the inverse map of a counter-clockwise rotation
    t = -a * (math.pi / 180.0)
    cos, sin = torch.cos(t), torch.sin(t)
    c = side / 2.0
    return _matrix((cos, sin, c - cos * c - sin * c), (-sin, cos, c + sin * c - cos * c))


def _shear_x(a, side):
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return _matrix((one, a, zero), (zero, one, zero))


def _shear_y(a, side):
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return _matrix((one, zero, zero), (a, one, zero))


def _translate_x(a, side):  # a in pixels
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return _matrix((one, zero, a), (zero, one, zero))


def _translate_y(a, side):
    one, zero = torch.ones_like(a), torch.zeros_like(a)
    return _matrix((one, zero, zero), (zero, one, a))


def _plain(fn):
    return lambda self, x, a: fn(x, a)


# torchvision's ColorJitter on uint8 images (v2.functional): greyscale 0.2989 R + 0.587 G + 0.114 B, truncated
def _tv_grey(x):
    return torch.floor(0.2989 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _tv_blend(x, other, f):
    f = f.view(-1, 1, 1, 1)
    return (f * x + (1 - f) * other).clamp_(0, 255).floor_()


def _jitter_contrast(x, a):
    return _tv_blend(x, _tv_grey(x).mean(dim=(1, 2, 3), keepdim=True), a)


def _jitter_hue(x, a):
    """Rotate the hue by ``a`` turns (in [-0.5, 0.5]) in HSV, as torchvision's adjust_hue."""
    rgb = x / 255.0
    maxc, argmax = rgb.max(dim=1)
    minc = rgb.amin(dim=1)
    delta = maxc - minc
    safe = torch.where(delta > 0, delta, torch.ones_like(delta))
    r, g, b = rgb.unbind(1)
    hue = torch.where(argmax == 0, (g - b) / safe, torch.where(argmax == 1, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue = torch.where(delta > 0, hue / 6.0, torch.zeros_like(hue))
    hue = torch.remainder(hue + a.view(-1, 1, 1), 1.0)
    sat = torch.where(maxc > 0, delta / torch.where(maxc > 0, maxc, torch.ones_like(maxc)), torch.zeros_like(maxc))
    # HSV -> RGB: channel k = v - v s max(0, min(k', 4 - k', 1)), k' = (n + 6 h) mod 6 for n = 5, 3, 1
    n = torch.tensor([5.0, 3.0, 1.0], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    k = torch.remainder(n + 6.0 * hue.unsqueeze(1), 6.0)
    out = maxc.unsqueeze(1) * (1 - sat.unsqueeze(1) * torch.clamp(torch.minimum(k, 4 - k), 0, 1))
    return (out * 255.0).round_().clamp_(0, 255)


_OPS: dict[str, Callable] = {
    "AutoContrast": _plain(_autocontrast), "Equalize": _plain(_equalize), "Invert": _plain(_invert),
    "Rotate": _affine_op(_rotate_matrix), "ShearX": _affine_op(_shear_x), "ShearY": _affine_op(_shear_y),
    "TranslateX": _affine_op(_translate_x), "TranslateY": _affine_op(_translate_y),
    "TranslateXRel": _affine_op(_translate_x), "TranslateYRel": _affine_op(_translate_y),
    **{k: _plain(_posterize) for k in ("Posterize", "PosterizeIncreasing", "PosterizeOriginal")},
    **{k: _plain(_solarize) for k in ("Solarize", "SolarizeIncreasing")}, "SolarizeAdd": _plain(_solarize_add),
    **{k: _plain(_color) for k in ("Color", "ColorIncreasing")},
    **{k: _plain(_contrast) for k in ("Contrast", "ContrastIncreasing")},
    **{k: _plain(_brightness) for k in ("Brightness", "BrightnessIncreasing")},
    **{k: _plain(_sharpness) for k in ("Sharpness", "SharpnessIncreasing")},
    "JitterBrightness": _plain(lambda x, a: _tv_blend(x, torch.zeros_like(x), a)),
    "JitterContrast": _plain(_jitter_contrast),
    "JitterSaturation": _plain(lambda x, a: _tv_blend(x, _tv_grey(x), a)),
    "JitterHue": _plain(_jitter_hue),
}  # fmt: skip


class DeviceAugment:
    """``DeviceAugment(cfg)(images, seed) -> float32 Tensor[B, 3, S, S]``: the photometric half of the train
    augmentation for uint8 ``images`` Tensor[B, 3, S, S] on any device (see the module docstring)."""

    def __init__(self, cfg: TransformConfig):
        self.cfg = cfg
        self.policy = check_policy(cfg) if cfg.auto_augment else None
        self._mode = cfg.interpolation  # grid_sample's "bilinear" / "bicubic"
        self._fill = torch.tensor([min(255, round(255 * m)) for m in cfg.re_mean], dtype=torch.float32)
        self._re_mean = torch.tensor(cfg.re_mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._re_std = torch.tensor(cfg.re_std, dtype=torch.float32).view(1, 3, 1, 1)

    def draw(self, batch: int, seed: int) -> Plan:
        """The per-sample parameters of a batch of ``batch`` images, on the CPU (:func:`draw_plan`)."""
        return draw_plan(batch, self.cfg.image_size, seed, self.policy, self.cfg.color_jitter, self.cfg.re_prob,
                         self.cfg.re_count)

    def __call__(self, images: torch.Tensor, seed: int) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(
                f"DeviceAugment takes uint8 images [B, 3, S, S] (the output of the uint8 worker transform, "
                f"augment.device_augment), got {images.dtype} {list(images.shape)}"
            )
        plan = self.draw(images.shape[0], seed)
        return self.apply(images, plan, seed)

    def apply(self, images: torch.Tensor, plan: Plan, seed: int) -> torch.Tensor:
        """``images`` augmented with the parameters of ``plan`` (``seed`` seeds the device's erasing noise)."""
        device = images.device
        packed = plan.packed
        if device.type == "cuda":
            packed = packed.pin_memory()
        packed = packed.to(device, non_blocking=True)  # the one host-to-device transfer of parameters
        x = images.float()
        for layer in plan.layers:
            index = packed[layer.index_at: layer.index_at + layer.count].long()
            args = packed[layer.arg_at: layer.arg_at + layer.count]
            part = x.index_select(0, index)
            done = [_OPS[name](self, part[start:end], args[start:end]) for name, start, end in layer.groups]
            x.index_copy_(0, index, torch.cat(done) if len(done) > 1 else done[0])
        x = x.div_(255.0)
        if plan.erase is not None:
            x = self._erase(x, plan, packed, seed)
        return x

    def _erase(self, x: torch.Tensor, plan: Plan, packed: torch.Tensor, seed: int) -> torch.Tensor:
        e = plan.erase
        n, k, side = e.count, e.boxes, x.shape[-1]
        index = packed[e.index_at: e.index_at + n].long()
        boxes = packed[e.box_at: e.box_at + n * k * 4].view(n, k, 4, 1, 1)
        mean, std = self._re_mean.to(x.device), self._re_std.to(x.device)
        if self.cfg.re_mode == "pixel":  # one N(0, 1) value per pixel, in the normalised space; row i for sample i
            g = torch.Generator(device=x.device).manual_seed((seed * 1_000_003 + 17) % 2**63)
            noise = torch.randn(x.shape, generator=g, device=x.device, dtype=x.dtype).index_select(0, index)
        part = x.index_select(0, index)
        pos = torch.arange(side, device=x.device, dtype=x.dtype)
        for b in range(k):  # later boxes over earlier ones, as timm erases them in turn
            top, left, h, w = boxes[:, b, 0], boxes[:, b, 1], boxes[:, b, 2], boxes[:, b, 3]
            rows = (pos.view(1, side, 1) >= top) & (pos.view(1, side, 1) < top + h)
            cols = (pos.view(1, 1, side) >= left) & (pos.view(1, 1, side) < left + w)
            box = (rows & cols).unsqueeze(1)
            if self.cfg.re_mode == "pixel":
                fill = noise
            elif self.cfg.re_mode == "rand":
                fill = packed[e.colour_at: e.colour_at + n * k * 3].view(n, k, 3, 1, 1)[:, b]
            else:  # "const": zero in the normalised space
                fill = torch.zeros(n, 3, 1, 1, device=x.device, dtype=x.dtype)
            part = torch.where(box, fill * std + mean, part)
        return x.index_copy_(0, index, part)

    def __repr__(self) -> str:
        return (f"DeviceAugment(auto_augment='{self.cfg.auto_augment}', color_jitter={self.cfg.color_jitter}, "
                f"re_prob={self.cfg.re_prob}, re_mode='{self.cfg.re_mode}', re_count={self.cfg.re_count})")
