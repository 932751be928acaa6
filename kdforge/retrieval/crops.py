"""What a gallery entry is: a box of a source image, resized, with the augmentation it was given (papers/001, B.2).

An image-level gallery has one entry per image: the centred square of its shorter side, resized to the output
size (the same as "resize the shorter side, then centre-crop", which is how queries are embedded too). A crop-level
gallery has ``crops`` entries per image: random resized crops (torchvision's RandomResizedCrop rule, scale
0.08-1 by default) each followed by RandAugment (``ops`` random operations of magnitude ``magnitude``, timm's
"rand-m9-n2" by default).

Every random choice is drawn from a generator seeded by (seed, image index, crop index) and stored as plain numbers
(:class:`CropParams`): the box in source pixels and each operation with its resolved value. :func:`remake` applies
them to the source image and gives back exactly the pixels that were embedded, so a manifest of retrieved crops is
a few numbers per item, not a copy of the images.

All pixel work is on uint8 ``Tensor[3, H, W]`` with torchvision's functional ops on the CPU, which are
deterministic: the same source image and parameters give the same bytes in every process.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

__all__ = ["OPS", "CropParams", "centre_params", "remake", "sample_params", "to_uint8"]

#: How far each RandAugment operation goes at magnitude 10 (timm's _LEVEL_DENOM), as timm's rand_augment_ops do.
_MAX_LEVEL = 10.0


def _signed(level: float, top: float, gen: torch.Generator) -> float:
    value = level / _MAX_LEVEL * top
    return -value if torch.rand((), generator=gen).item() < 0.5 else value


# name -> (draw the value from the magnitude, apply it to a uint8 image)
def _affine(img: Tensor, **kw: Any) -> Tensor:
    from torchvision.transforms.v2 import functional as F

    base = {"angle": 0.0, "translate": [0, 0], "scale": 1.0, "shear": [0.0, 0.0]}
    return F.affine(img, **{**base, **kw}, interpolation=F.InterpolationMode.BILINEAR, fill=128)


def _ops() -> dict[str, tuple[Callable[[float, torch.Generator], float], Callable[[Tensor, float], Tensor]]]:
    from torchvision.transforms.v2 import functional as F

    def height(img: Tensor) -> int:
        return img.shape[-2]

    def width(img: Tensor) -> int:
        return img.shape[-1]

    return {
        "auto_contrast": (lambda m, g: 0.0, lambda img, v: F.autocontrast(img)),
        "equalize": (lambda m, g: 0.0, lambda img, v: F.equalize(img)),
        "invert": (lambda m, g: 0.0, lambda img, v: F.invert(img)),
        "rotate": (lambda m, g: _signed(m, 30.0, g), lambda img, v: _affine(img, angle=v)),
        "posterize": (lambda m, g: float(8 - int(m / _MAX_LEVEL * 4)), lambda img, v: F.posterize(img, int(v))),
        "solarize": (lambda m, g: 256.0 - m / _MAX_LEVEL * 256.0, lambda img, v: F.solarize(img, v)),
        "color": (lambda m, g: 1.0 + _signed(m, 0.9, g), lambda img, v: F.adjust_saturation(img, v)),
        "contrast": (lambda m, g: 1.0 + _signed(m, 0.9, g), lambda img, v: F.adjust_contrast(img, v)),
        "brightness": (lambda m, g: 1.0 + _signed(m, 0.9, g), lambda img, v: F.adjust_brightness(img, v)),
        "sharpness": (lambda m, g: 1.0 + _signed(m, 0.9, g), lambda img, v: F.adjust_sharpness(img, v)),
        "shear_x": (lambda m, g: math.degrees(math.atan(_signed(m, 0.3, g))),
                    lambda img, v: _affine(img, shear=[v, 0.0])),
        "shear_y": (lambda m, g: math.degrees(math.atan(_signed(m, 0.3, g))),
                    lambda img, v: _affine(img, shear=[0.0, v])),
        "translate_x": (lambda m, g: _signed(m, 0.45, g),
                        lambda img, v: _affine(img, translate=[round(v * width(img)), 0])),
        "translate_y": (lambda m, g: _signed(m, 0.45, g),
                        lambda img, v: _affine(img, translate=[0, round(v * height(img))])),
    }


#: RandAugment's operations (timm's "rand" set without the increasing variants), by name.
OPS: tuple[str, ...] = tuple(_ops())


@dataclass(frozen=True)
class CropParams:
    """One gallery entry's pixels, as numbers: ``box`` = (top, left, height, width) in the source image, resized
    to the gallery's output size, then each ``ops`` (name, value) applied in order."""

    box: tuple[int, int, int, int]
    ops: tuple[tuple[str, float], ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {"box": list(self.box), "ops": [[name, value] for name, value in self.ops]}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> CropParams:
        box = tuple(int(v) for v in data["box"])
        if len(box) != 4 or box[2] < 1 or box[3] < 1 or box[0] < 0 or box[1] < 0:
            raise ValueError(f"a crop box is [top, left, height, width] with a positive size, got {data['box']}")
        ops = tuple((str(name), float(value)) for name, value in data.get("ops", ()))
        unknown = [name for name, _ in ops if name not in OPS]
        if unknown:
            raise ValueError(f"unknown augmentation operation(s) {unknown}; known: {', '.join(OPS)}")
        return cls(box=box, ops=ops)  # type: ignore[arg-type]


def centre_params(height: int, width: int) -> CropParams:
    """Image level: the centred square of the shorter side (resize + centre crop), no augmentation."""
    side = min(height, width)
    return CropParams(box=((height - side) // 2, (width - side) // 2, side, side))


def sample_params(
    height: int,
    width: int,
    seed: int,
    *,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    num_ops: int = 2,
    magnitude: float = 9.0,
) -> CropParams:
    """A random resized crop of an image of ``height`` x ``width`` (torchvision's rule: 10 tries at a random area
    fraction in ``scale`` and log-uniform aspect ratio in ``ratio``, then the centred crop that fits the ratio
    range) and ``num_ops`` RandAugment operations drawn with replacement, each at ``magnitude`` (0-10), all drawn
    from a generator seeded with ``seed`` (callers mix the image and crop index into it)."""
    gen = torch.Generator().manual_seed(int(seed))
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    box = None
    for _ in range(10):
        target = area * float(torch.empty(()).uniform_(scale[0], scale[1], generator=gen))
        aspect = math.exp(float(torch.empty(()).uniform_(log_ratio[0], log_ratio[1], generator=gen)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (), generator=gen))
            left = int(torch.randint(0, width - w + 1, (), generator=gen))
            box = (top, left, h, w)
            break
    if box is None:  # fallback: the whole image, cut to the ratio range (as torchvision does)
        in_ratio = width / height
        if in_ratio < ratio[0]:
            w, h = width, round(width / ratio[0])
        elif in_ratio > ratio[1]:
            h, w = height, round(height * ratio[1])
        else:
            w, h = width, height
        box = ((height - h) // 2, (width - w) // 2, h, w)
    table = _ops()
    ops = []
    for _ in range(num_ops):
        name = OPS[int(torch.randint(0, len(OPS), (), generator=gen))]
        ops.append((name, float(table[name][0](magnitude, gen))))
    return CropParams(box=box, ops=tuple(ops))


def to_uint8(image: Any) -> Tensor:
    """A source image as uint8 ``Tensor[3, H, W]``: a PIL image, a uint8 tensor, or a float tensor in [0, 1] whose
    values are multiples of 1/255 (what kdforge's data sources give for decoded 8-bit images)."""
    from kdforge.data.transforms import to_image_tensor

    x = to_image_tensor(image)
    if x.dtype != torch.uint8:
        x = (x.float().clamp(0.0, 1.0) * 255.0).round().to(torch.uint8)
    return x


def remake(image: Any, params: CropParams, size: int) -> Tensor:
    """The entry's pixels: uint8 ``Tensor[3, size, size]`` (the box cut from ``image``, resized with antialiasing,
    then the operations). ValueError when the box does not fit the image (the source changed since it was
    embedded)."""
    from torchvision.transforms.v2 import functional as F

    img = to_uint8(image)
    top, left, h, w = params.box
    if top + h > img.shape[-2] or left + w > img.shape[-1]:
        raise ValueError(f"crop box {list(params.box)} (top, left, height, width) does not fit an image of "
                         f"{img.shape[-2]} x {img.shape[-1]}: the source image is not the one that was embedded")
    out = F.resized_crop(img, top, left, h, w, [size, size], interpolation=F.InterpolationMode.BILINEAR,
                         antialias=True)
    table = _ops()
    for name, value in params.ops:
        out = table[name][1](out, value)
    return out
