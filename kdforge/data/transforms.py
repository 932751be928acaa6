"""Image transforms: one path for PIL images, numpy arrays and uint8 or float tensors.

Every input is turned into a ``Tensor[3, H, W]`` first (uint8 stays uint8, so resizing runs on bytes; float stays
float), then :mod:`torchvision.transforms.v2` crops, flips and jitters it, and the result is a float32
``Tensor[3, S, S]`` in [0, 1]. There is no normalisation here: teachers and students normalise their inputs
themselves, because each has its own mean and std.

The DeiT recipe's augmentations come from timm, as DeiT and the released Proteus code use them: RandAugment
(``auto_augment = "rand-m9-mstd0.5-inc1"``, timm's ``rand_augment_transform`` on the PIL image, after the crop and
flip) and random erasing (``re_prob``, timm's ``RandomErasing``, last). timm erases a normalised image with N(0, 1)
noise ("pixel" mode); here, before any normalisation, the noise is drawn in the space normalised by
``re_mean`` / ``re_std`` (ImageNet's, DeiT's) and mapped back to pixels, so a model normalising with those
statistics sees exactly timm's erasing. Erased pixels can then lie outside [0, 1].

Randomness comes from torch's, Python's and numpy's global generators (timm's augmentations draw from the latter
two): the engine seeds all three per item (:class:`kdforge.engine.trainer.SeededItems`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Annotated, Any, Callable, Literal

import numpy as np
import torch

from kdforge.ranges import Fraction, ImageSide, PositiveInt, Range

__all__ = ["BatchMix", "CropFlipTransform", "ImageTransform", "TransformConfig", "as_float_image", "build_transform",
           "to_image_tensor", "to_rgb8"]

# PIL modes of one channel of 16-bit unsigned pixels (16-bit PNG and TIFF greyscale); "I" is 32-bit signed
_UINT16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


@dataclasses.dataclass
class TransformConfig:
    image_size: ImageSide = 224
    "side of the square output image, in pixels"
    scale: tuple[float, float] = (0.08, 1.0)
    "train: range of the random resized crop's area, as a fraction of the image"
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    "train: range of the random resized crop's aspect ratio (width / height)"
    hflip: float = 0.5
    "train: probability of a horizontal flip"
    color_jitter: Annotated[float, Range(ge=0, le=5)] = 0.0
    "train: colour jitter strength s (brightness, contrast, saturation 0.4 s, hue 0.1 s <= 0.5, applied with p 0.8); 0 is off"
    crop_pct: float = 0.875
    "eval: resize the shorter side to image_size / crop_pct, then take the centre image_size crop"
    interpolation: Literal["bilinear", "bicubic"] = "bilinear"
    "resampling filter of every resize (and of RandAugment's geometric operations)"
    auto_augment: str = ""
    "train: timm RandAugment / AutoAugment policy string, e.g. 'rand-m9-mstd0.5-inc1' (DeiT); '' is off"
    re_prob: Fraction = 0.0
    "train: probability of random erasing (timm's RandomErasing; DeiT: 0.25)"
    re_mode: Literal["pixel", "rand", "const"] = "pixel"
    "train: random erasing fill: per-pixel normal noise, one normal colour per block, or the mean"
    re_count: PositiveInt = 1
    "train: at most this many erased blocks per image"
    re_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    "train: mean of the space in which erasing noise is N(0, 1) (ImageNet's, as DeiT normalises)"
    re_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    "train: std of that space (ImageNet's)"
    mixup: Annotated[float, Range(ge=0, le=100)] = 0.0
    "train: Mixup alpha, mixing each batch with itself reversed (FD fine-tuning: 0.8); 0 is off; needs labelled data"
    cutmix: Annotated[float, Range(ge=0, le=100)] = 0.0
    "train: CutMix alpha (FD fine-tuning: 1.0); 0 is off; with mixup too, each batch takes one of the two"
    mix_prob: Annotated[float, Range(ge=0, le=1)] = 1.0
    "train: probability that a batch is mixed at all (when mixup or cutmix is on)"
    mix_switch_prob: Annotated[float, Range(ge=0, le=1)] = 0.5
    "train: probability of CutMix rather than Mixup for a mixed batch, when both are on"
    device_augment: bool = False
    "train: workers only decode, crop and flip (uint8); RandAugment, jitter and erasing run batched on the device"

    def __post_init__(self) -> None:
        if self.image_size < 1:
            raise ValueError(f"image_size must be a positive number of pixels, got {self.image_size}")
        lo, hi = self.scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"scale must be (lo, hi) with 0 < lo <= hi <= 1, got {tuple(self.scale)}")
        lo, hi = self.ratio
        if not 0 < lo <= hi:
            raise ValueError(f"ratio must be (lo, hi) with 0 < lo <= hi, got {tuple(self.ratio)}")
        if not 0 <= self.hflip <= 1:
            raise ValueError(f"hflip is a probability in [0, 1], got {self.hflip}")
        if not 0 < self.crop_pct <= 1:
            raise ValueError(f"crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.auto_augment:
            if self.color_jitter > 0:
                raise ValueError(
                    f"color_jitter = {self.color_jitter:g} with auto_augment = '{self.auto_augment}': timm (and DeiT) "
                    "apply no colour jitter when RandAugment is on; set color_jitter = 0"
                )
            _auto_augment(self)  # a bad policy string fails here, when the recipe is resolved
        if min(self.re_std) <= 0:
            raise ValueError(f"re_std must be positive, got {tuple(self.re_std)}")
        if self.device_augment and self.auto_augment:
            from kdforge.data.device_augment import check_policy

            check_policy(self)  # a policy the device path cannot run fails here, when the recipe is resolved


def _auto_augment(cfg: TransformConfig) -> Callable:
    """timm's RandAugment / AutoAugment / AugMix for ``cfg.auto_augment``, with the hyper-parameters timm's
    ``create_transform`` gives it (translation 45% of the image side, fill = ``re_mean`` in 0..255, the recipe's
    interpolation)."""
    from PIL import Image
    from timm.data import auto_augment as aa

    hparams = {
        "translate_const": int(cfg.image_size * 0.45),
        "img_mean": tuple(min(255, round(255 * m)) for m in cfg.re_mean),
        "interpolation": {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[cfg.interpolation],
    }
    policy = cfg.auto_augment
    try:
        if policy.startswith("rand"):
            transform = aa.rand_augment_transform(policy, hparams)
        elif policy.startswith("augmix"):
            transform = aa.augment_and_mix_transform(policy, hparams)
        else:
            transform = aa.auto_augment_transform(policy, hparams)
    except Exception as e:  # timm's parser asserts, indexes and converts: any failure means a bad string
        raise ValueError(
            f"auto_augment = '{policy}' is not a timm policy string ({type(e).__name__}: {e}); use e.g. "
            "'rand-m9-mstd0.5-inc1' (RandAugment), 'original' or 'v0' (AutoAugment), 'augmix-m5-w3'"
        ) from None
    ops = getattr(transform, "ops", None) or [op for sub in getattr(transform, "policy", []) for op in sub]
    for op in ops:
        if getattr(op, "aug_fn", None) is aa.posterize:
            op.aug_fn = _posterize
    return transform


def _posterize(img: Any, bits_to_keep: int, **_: Any) -> Any:
    """timm's posterize, also for 0 bits: "PosterizeIncreasing" at magnitude 10 (reached by rand-m9-mstd0.5's
    magnitude noise) keeps 0 bits, which Pillow 13 (this project's) refuses and older Pillow (that timm and DeiT
    were written against) turns into a black image. Same result here."""
    from PIL import Image, ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits_to_keep)


def to_rgb8(image: Any) -> Any:
    """A PIL image as an 8-bit RGB PIL image, with deeper pixels scaled to 0..255 rather than clipped.

    PIL's ``convert("RGB")`` clips 16-bit and 32-bit integer pixels at 255 (a 16-bit photo turns almost white)
    and truncates float pixels (a float image in [0, 1] turns black). Here integer pixels (modes "I;16*" and
    "I") map the 16-bit range 0..65535 onto 0..255 (v * 255 / 65535, rounded), the range the file format
    declares, not the image's own min and max, so every image keeps its brightness; float pixels ("F") are by
    convention in [0, 1] and are multiplied by 255 and rounded. Every other mode goes through ``convert("RGB")``
    (palettes, CMYK, alpha dropped; PIL already reads 16-bit RGB PNGs as their high bytes).

    Raises ValueError for pixels that fit no known range: integers below 0 or above 65535, floats outside
    [0, 1] or not finite. Stretching each such image to its own range would change images differently, so a
    reader skips them with that reason (:func:`kdforge.data.datasets.read_image`).
    """
    mode = image.mode
    if mode not in _UINT16_MODES + ("I", "F"):
        return image if mode == "RGB" else image.convert("RGB")
    from PIL import Image

    pixels = np.asarray(image)
    if pixels.size and mode == "F":
        if not np.isfinite(pixels).all() or pixels.min() < 0 or pixels.max() > 1:
            raise ValueError(
                f"float pixels span {pixels.min():g}..{pixels.max():g} (mode F), not [0, 1]: no known range to scale "
                "to 8 bits; save the image as 8 or 16 bits, or as floats in [0, 1]"
            )
    elif pixels.size and (pixels.min() < 0 or pixels.max() > 65535):
        raise ValueError(
            f"integer pixels span {pixels.min()}..{pixels.max()} (mode {mode}), outside 16 bits (0..65535): no "
            "known range to scale to 8 bits; save the image as 8 or 16 bits"
        )
    if mode == "F":
        grey = np.rint(pixels * 255.0).astype(np.uint8)
    else:  # round(v * 255 / 65535) in integers; 65535 * 255 fits in uint32
        grey = ((pixels.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
    return Image.fromarray(grey, "L").convert("RGB")


def to_image_tensor(image: Any) -> torch.Tensor:
    """A PIL image, numpy array (HxW or HxWxC) or tensor ([H, W] or [C, H, W]) as ``Tensor[3, H, W]``.

    uint8 stays uint8 (0..255); floating point becomes float32 (expected in [0, 1]). Grey images are repeated to
    three channels and an alpha channel is dropped (PIL images go through :func:`to_rgb8`: palettes handled,
    16-bit and float pixels scaled, not clipped).
    """
    if isinstance(image, torch.Tensor):
        x = image
    elif isinstance(image, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(image))
        if x.ndim == 3:
            x = x.permute(2, 0, 1)  # numpy images are channel-last
    else:
        try:
            from PIL import Image
        except ImportError:  # pragma: no cover - pillow is a dependency
            Image = None
        if Image is None or not isinstance(image, Image.Image):
            raise TypeError(f"expected a PIL image, numpy array or tensor, got {type(image).__name__}")
        image = to_rgb8(image)
        x = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    if x.ndim == 2:
        x = x.unsqueeze(0)
    if x.ndim != 3 or x.shape[0] not in (1, 3, 4):
        raise ValueError(
            f"expected an image tensor [3, H, W] (or [1, H, W], [4, H, W], [H, W]), got shape {list(x.shape)}; "
            "channel-last tensors must be permuted to channel-first"
        )
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    elif x.shape[0] == 4:
        x = x[:3]
    if x.dtype == torch.uint8:
        return x.contiguous()
    if x.is_floating_point():
        return x.contiguous().float()
    raise TypeError(f"image tensors must be uint8 (0..255) or floating point (0..1), got {x.dtype}")


def as_float_image(image: Any) -> torch.Tensor:
    """Any image (see :func:`to_image_tensor`) as float32 ``Tensor[3, H, W]`` in [0, 1]."""
    x = to_image_tensor(image)
    if x.dtype == torch.uint8:
        return x.float().div_(255.0)
    return x.clamp(0.0, 1.0)


class ImageTransform:
    """``transform(image) -> Tensor[3, S, S]`` float32 in [0, 1], for any input :func:`to_image_tensor` takes."""

    def __init__(self, cfg: TransformConfig, train: bool):
        from torchvision.transforms import v2

        self.cfg = cfg
        self.train = train
        interp = {
            "bilinear": v2.InterpolationMode.BILINEAR,
            "bicubic": v2.InterpolationMode.BICUBIC,
        }[cfg.interpolation]
        size = cfg.image_size
        ops: list[Callable] = []
        if train:
            ops.append(
                v2.RandomResizedCrop(
                    size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio), interpolation=interp, antialias=True
                )
            )
            if cfg.hflip > 0:
                ops.append(v2.RandomHorizontalFlip(cfg.hflip))
            if cfg.auto_augment:  # timm's policies work on PIL images
                ops += [v2.ToPILImage(), _auto_augment(cfg), v2.PILToTensor()]
            if cfg.color_jitter > 0:
                s = cfg.color_jitter
                jitter = v2.ColorJitter(brightness=0.4 * s, contrast=0.4 * s, saturation=0.4 * s, hue=min(0.1 * s, 0.5))
                ops.append(v2.RandomApply([jitter], p=0.8))
        else:
            resize_to = int(math.floor(size / cfg.crop_pct + 1e-6))
            ops += [v2.Resize(resize_to, interpolation=interp, antialias=True), v2.CenterCrop(size)]
        self.ops = v2.Compose(ops)
        self.erase = None
        if train and cfg.re_prob > 0:
            from timm.data.random_erasing import RandomErasing

            self.erase = RandomErasing(cfg.re_prob, mode=cfg.re_mode, max_count=cfg.re_count, device="cpu")
            self._re_mean = torch.tensor(cfg.re_mean).view(3, 1, 1)
            self._re_std = torch.tensor(cfg.re_std).view(3, 1, 1)

    def __call__(self, image: Any) -> torch.Tensor:
        from torchvision import tv_tensors

        x = tv_tensors.Image(to_image_tensor(image))
        x = self.ops(x)
        x = (x if isinstance(x, torch.Tensor) else v2_to_tensor(x)).as_subclass(torch.Tensor)
        if x.dtype == torch.uint8:
            x = x.float().div_(255.0)
        else:
            # bicubic resizing of float images overshoots a little at edges; out of place, because when no op
            # changed the image x is still the caller's tensor
            x = x.clamp(0.0, 1.0)
        if self.erase is not None:
            # timm erases normalised images with N(0, 1) noise: the same, in the space normalised by re_mean/std
            x = self.erase((x - self._re_mean) / self._re_std) * self._re_std + self._re_mean
        return x

    def __repr__(self) -> str:
        erase = f", {self.erase!r}" if self.erase is not None else ""
        return f"ImageTransform(train={self.train}, {self.ops}{erase})"


def v2_to_tensor(image: Any) -> torch.Tensor:
    """A PIL image (what a policy may return) as a uint8 Tensor[3, H, W]."""
    return to_image_tensor(image)


class BatchMix:
    """Mixup / CutMix of a training batch (``augment.mixup``, ``augment.cutmix``), by timm's ``Mixup`` in its
    "batch" mode (one mixing weight per batch, each image mixed with the batch reversed), seeded per call.

    ``mix(images, labels, seed) -> (images, targets)``: images Tensor[B, 3, H, W] (mixed in place), labels
    LongTensor[B] -> soft targets Tensor[B, C], the mixed one-hot labels (label smoothing is the loss's business:
    :func:`kdforge.losses.supervised.soft_target_cross_entropy` smooths hard and mixed targets alike, which gives
    exactly the targets timm's Mixup smooths itself). timm draws from numpy's global generator; here it draws from
    one seeded by ``seed`` (the trainer's per-step seed), and numpy's global state is put back, so a resumed run
    mixes as an uninterrupted one. timm mixes even batches only: in an odd batch (unreadable images skipped) the
    last image stays unmixed.
    """

    def __init__(self, cfg: TransformConfig, num_classes: int):
        from timm.data import Mixup

        self.num_classes = num_classes
        self._mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                            switch_prob=cfg.mix_switch_prob, mode="batch", label_smoothing=0.0,
                            num_classes=num_classes)

    @staticmethod
    def enabled(cfg: TransformConfig) -> bool:
        return cfg.mixup > 0 or cfg.cutmix > 0

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        labels = labels.to(images.device)
        even = images.shape[0] - images.shape[0] % 2
        targets = torch.nn.functional.one_hot(labels, self.num_classes).float()
        if even == 0:
            return images, targets
        state = np.random.get_state()
        try:
            np.random.seed(seed % 2**32)
            mixed, mixed_targets = self._mixup(images[:even], labels[:even])
        finally:
            np.random.set_state(state)
        images[:even] = mixed
        targets[:even] = mixed_targets.to(targets.dtype)
        return images, targets


class CropFlipTransform:
    """The worker half of ``augment.device_augment``: ``transform(image) -> uint8 Tensor[3, S, S]``, decoded, random
    resized crop and horizontal flip only; :class:`kdforge.data.device_augment.DeviceAugment` does the rest on
    the device, batched.

    The crop and the flip are drawn exactly as :class:`ImageTransform` draws them (torchvision's
    ``RandomResizedCrop.make_params`` and ``torch.rand(1) < hflip``, from torch's global generator, which the engine
    seeds per item), and resized by torchvision on uint8 pixels (antialiased, ``cfg.interpolation``): for one seed
    the output is the image today's path hands to RandAugment. Any input :func:`to_image_tensor` takes works; float
    images are cropped as floats and rounded to uint8 last.

    Sources that read files call :meth:`read_file` instead of decoding themselves (``FileImageDataset`` does):
    JPEGs are decoded by ``torchvision.io.decode_jpeg`` from the file's bytes, measured faster than PIL here
    (``benchmarks/data_path.py``, "decode_choices": PIL's ``draft`` rarely applies, an ImageNet photo is seldom
    twice the crop it gives, and PIL's ``resize(box=...)`` was slower than torchvision's uint8 resize).
    """

    #: :func:`kdforge.data.datasets.apply_transform` keeps the output uint8 rather than converting it to float.
    returns_uint8 = True

    def __init__(self, cfg: TransformConfig):
        from torchvision.transforms import v2

        self.cfg = cfg
        self._interpolation = {
            "bilinear": v2.InterpolationMode.BILINEAR,
            "bicubic": v2.InterpolationMode.BICUBIC,
        }[cfg.interpolation]
        self._crop = v2.RandomResizedCrop(cfg.image_size, scale=tuple(cfg.scale), ratio=tuple(cfg.ratio),
                                          interpolation=self._interpolation, antialias=True)

    def __call__(self, image: Any) -> torch.Tensor:
        from torchvision import tv_tensors
        from torchvision.transforms.v2 import functional as F

        if isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.dim() == 3 and image.shape[0] == 3:
            x = image  # as decoded (decode_jpeg's is a channels-last view): made contiguous it costs a copy as long
            # as the decode itself, and the resize reads a view as fast, to the same pixels
        else:
            x = to_image_tensor(image)
        box = self._crop.make_params([tv_tensors.Image(x)])
        size = [self.cfg.image_size, self.cfg.image_size]
        x = F.resized_crop(x, **box, size=size, interpolation=self._interpolation, antialias=True)
        if self.cfg.hflip > 0 and torch.rand(1) < self.cfg.hflip:  # the draw torchvision's RandomHorizontalFlip makes
            x = x.flip(-1)
        if x.dtype != torch.uint8:
            x = x.clamp(0.0, 1.0).mul_(255.0).round_().to(torch.uint8)
        return x.contiguous()

    def read_file(self, path: str, max_pixels: int) -> Any:
        """The transformed image of the file at ``path``, or :class:`kdforge.data.Skipped` (the reasons of
        :func:`kdforge.data.datasets.read_image`, which reads every file that is not a plain RGB or grey JPEG, and
        any JPEG torchvision fails to decode, so that a bad file is reported by PIL as before)."""
        from kdforge.data.datasets import read_image

        image = _decode_jpeg_file(path, max_pixels)
        if image is None:
            image = read_image(path, max_pixels)
        from kdforge.data import Skipped

        return image if isinstance(image, Skipped) else self(image)

    def __repr__(self) -> str:
        return f"CropFlipTransform({self._crop}, hflip={self.cfg.hflip})"


def _decode_jpeg_file(path: str, max_pixels: int) -> torch.Tensor | None:
    """uint8 Tensor[3, H, W] of a baseline or progressive RGB or grey JPEG file; None for anything else (other
    formats, CMYK, images over ``max_pixels``, files torchvision cannot decode): the caller reads those with PIL,
    which applies the same limit and reports the reason."""
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        with open(path, "rb") as f:
            data = f.read()
        frame = _jpeg_frame(data)
        if frame is None:
            return None
        width, height, channels = frame
        if channels not in (1, 3) or width * height > max_pixels:  # CMYK (4) and others: PIL converts them
            return None
        return decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
    except Exception:  # noqa: BLE001 - PIL reads it again and says what is wrong with the file
        return None


def _jpeg_frame(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, channels) from a JPEG's frame header (SOF marker), read by walking the marker segments;
    None when ``data`` is not a JPEG or has no readable frame header before the scan. Ten times quicker than
    opening the file with PIL for the same three numbers."""
    if data[:3] != b"\xff\xd8\xff":
        return None
    at, end = 2, len(data)
    while at + 9 < end:
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:  # no length field
            at += 2
            continue
        if marker == 0xDA:  # start of scan: no frame header came first
            return None
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0..SOF15 (not DHT, JPG, DAC)
            height = int.from_bytes(data[at + 5 : at + 7], "big")
            width = int.from_bytes(data[at + 7 : at + 9], "big")
            return width, height, data[at + 9]
        at += 2 + length
    return None


def build_transform(cfg: TransformConfig | None, train: bool) -> ImageTransform | CropFlipTransform:
    """The train (random resized crop, flip, colour jitter) or eval (resize, centre crop) transform for ``cfg``.

    With ``cfg.device_augment`` the train transform is :class:`CropFlipTransform` (uint8 crop and flip only; the
    trainer finishes the augmentation on the device); eval transforms never change."""
    cfg = cfg if cfg is not None else TransformConfig()
    if train and cfg.device_augment:
        return CropFlipTransform(cfg)
    return ImageTransform(cfg, train)
