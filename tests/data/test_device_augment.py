"""augment.device_augment: the uint8 crop-and-flip worker transform and DeviceAugment, against timm's PIL
operations and torchvision's crop, on small CPU images."""


import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data import collate
from kdforge.data.augment_draws import RAND_AUGMENT_OPS
from kdforge.data.datasets import FileImageDataset
from kdforge.data.device_augment import _OPS, DeviceAugment
from kdforge.data.transforms import CropFlipTransform, ImageTransform, TransformConfig, _auto_augment, build_transform
from kdforge.engine.syncs import SyncCounter

S = 40
PROTEUS = dict(image_size=S, interpolation="bicubic", auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25,
               re_mode="pixel", device_augment=True)


def photo(seed: int, h: int = S, w: int = S) -> np.ndarray:
    """A smooth, photo-like uint8 image (gradients, a disc, mild noise): resampling differences stay small on it."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    img = np.stack([128 + 100 * np.sin(x / (5 + seed % 3) + seed), 60 + 150 * y / h,
                    200 - 120 * ((x - w / 2) ** 2 + (y - h / 3) ** 2 < (h / 4) ** 2)], -1)
    return np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)


def timm_op(name: str, cfg: TransformConfig):
    """timm's AugmentOp ``name`` with the hparams kdforge gives timm (fill, interpolation, posterize patch)."""
    ops = {op.name: op for op in _auto_augment(cfg).ops}
    if name not in ops:
        from timm.data.auto_augment import AugmentOp

        hp = dict(next(iter(ops.values())).hparams)
        return AugmentOp(name, prob=1.0, magnitude=9, hparams=hp)
    return ops[name]


# Arguments to compare at, per operation (both signs where timm flips them), and the tolerance in mean absolute
# difference over 255 levels: 0 where the device op is Pillow's lookup table or integer formula.
CASES = {
    "AutoContrast": ([0.0], 0.0), "Equalize": ([0.0], 0.0), "Invert": ([0.0], 0.0),
    "PosterizeIncreasing": ([0.0, 1.0, 3.0, 4.0], 0.0), "SolarizeIncreasing": ([26.0, 128.0, 230.0], 0.0),
    "SolarizeAdd": ([11.0, 99.0], 0.0),
    # blends truncate in float32 here, in float in Pillow: exact on these images; an integer result could land
    # one level lower elsewhere
    "ColorIncreasing": ([0.1, 1.72], 0.02), "ContrastIncreasing": ([0.28, 1.9], 0.02),
    "BrightnessIncreasing": ([0.46, 1.54], 0.02), "SharpnessIncreasing": ([0.1, 1.9], 0.02),
    # grid_sample's bicubic (a = -0.75) against PIL's (a = -0.5): under a level on average, a few levels at edges
    "Rotate": ([-27.0, 13.5], 1.0), "ShearX": ([0.27, -0.12], 1.0), "ShearY": ([-0.27, 0.12], 1.0),
    "TranslateXRel": ([0.36 * S, -0.1 * S], 1.0), "TranslateYRel": ([-0.405 * S, 0.2 * S], 1.0),
}  # fmt: skip


def _timm_call(name: str, img: Image.Image, arg: float, cfg: TransformConfig) -> Image.Image:
    op = timm_op(name, cfg)
    if name in ("TranslateXRel", "TranslateYRel"):
        arg = arg / S  # timm takes a fraction of the side
    args = () if name in ("AutoContrast", "Equalize", "Invert") else (int(arg) if "olarize" in name or "oster" in name
                                                                      else arg,)
    return op.aug_fn(img, *args, **op.kwargs)


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_rand_augment_op_matches_timms_pil_op(name):
    cfg = TransformConfig(**PROTEUS)
    aug = DeviceAugment(cfg)
    args, tol = CASES[name]
    for k, arg in enumerate(args):
        pixels = photo(k)
        want = np.asarray(_timm_call(name, Image.fromarray(pixels), arg, cfg)).astype(np.float64)
        x = torch.from_numpy(pixels).permute(2, 0, 1)[None].float()
        got = _OPS[name](aug, x, torch.tensor([arg])).squeeze(0).permute(1, 2, 0).numpy()
        diff = np.abs(got - want)
        assert diff.mean() <= tol, f"{name}({arg}): mean |diff| {diff.mean():.3f} > {tol} levels"
        assert (diff > 2).mean() <= 0.05, f"{name}({arg}): {(diff > 2).mean():.1%} of values off by more than 2"
        assert np.array_equal(got, np.round(got)) and got.min() >= 0 and got.max() <= 255


def test_the_proteus_policy_runs_every_inc1_op_with_timms_ranges():
    aug = DeviceAugment(TransformConfig(**PROTEUS))
    assert set(aug.policy.ops) == set(CASES) and aug.policy.num_layers == 2 and aug.policy.prob == 0.5
    assert set(aug.policy.ops) <= set(RAND_AUGMENT_OPS) <= set(_OPS)
    params = [p for sample in aug.draw(4000, seed=1).params for p in sample if p[0] != "Erase"]
    assert 0.47 < len(params) / 8000 < 0.53  # two layers, each applied with probability 0.5
    by = {}
    for name, arg in params:
        by.setdefault(name, []).append(arg)
    assert set(by) == set(CASES)  # every op drawn
    rot = np.array(by["Rotate"])
    assert np.abs(rot).max() <= 30 and (rot < 0).mean() == pytest.approx(0.5, abs=0.08)
    assert np.median(np.abs(rot)) == pytest.approx(27, abs=0.5)  # m9: 9 / 10 * 30, noise mstd 0.5
    # m ~ N(9, 0.5) clipped to [0, 10]: 4 - int(m * 0.4) keeps 1 bit, 0 bits when m reaches 10 (P(z >= 2) = 2.3%),
    # 2 bits below m = 7.5 (z < -3)
    bits = np.array(by["PosterizeIncreasing"])
    assert set(bits) <= {0.0, 1.0, 2.0} and 0.005 < (bits == 0).mean() < 0.06 and (bits == 2).mean() < 0.01
    enh = np.array(by["ColorIncreasing"])
    assert enh.min() >= 0.1 and enh.max() <= 1.9 and ((enh > 1).mean() == pytest.approx(0.5, abs=0.08))
    assert np.abs(by["TranslateXRel"]).max() <= 0.45 * S + 1e-9


def test_same_seed_same_output_other_seed_other_output():
    aug = DeviceAugment(TransformConfig(**PROTEUS))
    x = torch.from_numpy(np.stack([photo(i) for i in range(8)])).permute(0, 3, 1, 2).contiguous()
    a = aug(x, seed=11)
    assert a.dtype == torch.float32 and a.shape == (8, 3, S, S)
    assert torch.equal(a, aug(x, seed=11))
    assert not torch.equal(a, aug(x, seed=12))
    assert torch.equal(x, torch.from_numpy(np.stack([photo(i) for i in range(8)])).permute(0, 3, 1, 2))  # untouched


def test_an_image_result_depends_on_its_own_pixels_position_and_seed_only():
    aug = DeviceAugment(TransformConfig(**PROTEUS, color_jitter=0.0))
    x = torch.from_numpy(np.stack([photo(i) for i in range(12)])).permute(0, 3, 1, 2).contiguous()
    full = aug(x, seed=5)
    torch.testing.assert_close(aug(x[:5], seed=5), full[:5], rtol=0, atol=0)  # batch size does not matter
    other = x.clone()
    other[1::2] = torch.from_numpy(photo(99)).permute(2, 0, 1)  # neighbours replaced: grouping mixes nothing
    torch.testing.assert_close(aug(other, seed=5)[0::2], full[0::2], rtol=0, atol=0)


def test_no_host_synchronisation_inside_the_call():
    aug = DeviceAugment(TransformConfig(**PROTEUS, re_count=2))
    x = torch.randint(0, 256, (16, 3, S, S), dtype=torch.uint8)
    # augment_draws reads the CPU tensor of uniforms its own CPU generator made (one tolist, by design): the
    # only host-side read, and one the counter leaves out by default (syncs.HOST_SIDE); nothing reads a device value
    with SyncCounter(exclude=()) as all_calls:
        aug(x, seed=3)
    assert [m for m, where in all_calls.calls] == ["tolist"], all_calls.report()
    assert all_calls.calls[0][1].startswith("kdforge/data/augment_draws.py")
    with SyncCounter() as syncs:
        aug(x, seed=3)
    assert syncs.count == 0, syncs.report()


@pytest.mark.parametrize("mode", ["pixel", "rand", "const"])
def test_erasing_statistics_and_fill_in_the_normalised_space(mode):
    cfg = TransformConfig(image_size=S, re_prob=0.25, re_mode=mode, re_count=1, device_augment=True)
    aug = DeviceAugment(cfg)
    x = torch.full((400, 3, S, S), 100, dtype=torch.uint8)
    y = aug(x, seed=7)
    erased = (y != 100 / 255).any(dim=1)  # [B, S, S]
    per_image = erased.flatten(1).any(1).float()
    assert per_image.mean().item() == pytest.approx(0.25, abs=0.06)
    area = erased.flatten(1).float().mean(1)[per_image > 0]
    assert area.min().item() >= 0.015 and area.max().item() <= 0.36  # 2% .. 1/3 of the image
    mean = torch.tensor(cfg.re_mean).view(1, 3, 1)
    std = torch.tensor(cfg.re_std).view(1, 3, 1)
    z = ((y - mean.unsqueeze(-1)) / std.unsqueeze(-1)).permute(1, 0, 2, 3)[:, erased]  # [3, erased pixels]
    if mode == "pixel":
        assert z.mean().item() == pytest.approx(0, abs=0.05) and z.std().item() == pytest.approx(1, abs=0.05)
    elif mode == "const":
        torch.testing.assert_close(z, torch.zeros_like(z), atol=1e-5, rtol=0)
    else:  # one normal colour per box
        assert z.std().item() == pytest.approx(1, abs=0.25) and len(torch.unique(z[0])) <= per_image.sum().item()


def test_colour_jitter_draws_torchvisions_ranges_and_matches_its_ops():
    from torchvision.transforms.v2 import functional as TF

    s = 1.5
    aug = DeviceAugment(TransformConfig(image_size=S, color_jitter=s, device_augment=True))
    params = aug.draw(2000, seed=2).params
    applied = [p for p in params if p]
    assert len(applied) / 2000 == pytest.approx(0.8, abs=0.04)
    assert all(sorted(n for n, _ in p) == sorted(_OPS_J) for p in applied)
    for name, lo, hi in (("JitterBrightness", 0.4, 1.6), ("JitterContrast", 0.4, 1.6),
                         ("JitterSaturation", 0.4, 1.6), ("JitterHue", -0.15, 0.15)):
        v = np.array([a for p in applied for n, a in p if n == name])
        assert v.min() >= lo and v.max() <= hi and v.min() < lo + 0.05 and v.max() > hi - 0.05
    firsts = {p[0][0] for p in applied}
    assert firsts == set(_OPS_J)  # random order
    x = torch.from_numpy(photo(3)).permute(2, 0, 1).contiguous()
    for name, fn, f in (("JitterBrightness", TF.adjust_brightness, 1.3), ("JitterContrast", TF.adjust_contrast, 0.6),
                        ("JitterSaturation", TF.adjust_saturation, 1.5), ("JitterHue", TF.adjust_hue, 0.12)):
        want = fn(x, f).float()
        got = _OPS[name](aug, x[None].float(), torch.tensor([f]))[0]
        assert (got - want).abs().mean().item() <= 1.0, name  # hue: rounding here, truncation there


_OPS_J = ("JitterBrightness", "JitterContrast", "JitterSaturation", "JitterHue")


def test_policies_the_device_cannot_run_fail_when_the_recipe_is_resolved():
    with pytest.raises(ValueError, match="RandAugment policies"):
        TransformConfig(auto_augment="original", device_augment=True)
    with pytest.raises(ValueError, match="not one augment.device_augment runs"):
        TransformConfig(auto_augment="rand-m9-t3a", device_augment=True)
    TransformConfig(auto_augment="original")  # the worker path still runs it


# ------------------------------------------------------------------------------------------ worker side
def test_worker_transform_is_uint8_crop_and_flip_exactly_as_todays_path_draws_them():
    from torchvision import tv_tensors
    from torchvision.transforms import v2

    cfg = TransformConfig(image_size=24, interpolation="bicubic", auto_augment="rand-m9-mstd0.5-inc1",
                          re_prob=0.25, device_augment=True)
    lean = build_transform(cfg, train=True)
    assert isinstance(lean, CropFlipTransform)
    assert isinstance(build_transform(cfg, train=False), ImageTransform)  # eval unchanged
    today = v2.Compose([v2.RandomResizedCrop(24, scale=(0.08, 1.0), interpolation=v2.InterpolationMode.BICUBIC,
                                             antialias=True), v2.RandomHorizontalFlip(0.5)])
    src = torch.from_numpy(photo(1, 50, 70)).permute(2, 0, 1).contiguous()
    flips = 0
    for seed in range(40):
        torch.manual_seed(seed)
        got = lean(Image.fromarray(photo(1, 50, 70)))
        torch.manual_seed(seed)
        want = today(tv_tensors.Image(src)).as_subclass(torch.Tensor)
        assert got.dtype == torch.uint8 and got.shape == (3, 24, 24)
        assert torch.equal(got, want), f"seed {seed}"
        torch.manual_seed(seed)
        torch.rand(4)  # RandomResizedCrop's first attempt draws 4 numbers; small crops fit at once here
        flips += bool(torch.rand(1) < 0.5)
    assert 8 < flips < 32
    floats = lean(torch.rand(3, 30, 30))
    assert floats.dtype == torch.uint8 and floats.shape == (3, 24, 24)  # tensors and arrays go through it too
    assert lean(np.zeros((30, 40, 3), np.uint8)).shape == (3, 24, 24)


def test_image_folder_files_through_the_lean_path_collate_as_uint8(tmp_path):
    paths = []
    for i, fmt in enumerate(["JPEG", "PNG", "JPEG"]):
        p = tmp_path / f"{i}.{fmt.lower()}"
        Image.fromarray(photo(i, 37, 52)).save(p, fmt)
        paths.append((str(p), i))
    Image.fromarray(photo(5, 37, 52)[..., 0]).save(tmp_path / "grey.jpg")  # grey JPEG: three channels
    paths.append((str(tmp_path / "grey.jpg"), 3))
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8\xff" + b"junk" * 20)
    paths.append((str(tmp_path / "bad.jpg"), 4))
    cfg = TransformConfig(image_size=16, device_augment=True)
    ds = FileImageDataset(paths, build_transform(cfg, train=True))
    items = [ds[i] for i in range(len(ds))]
    assert type(items[-1]).__name__ == "Skipped" and "bad.jpg" in items[-1].path  # PIL says why, as before
    batch = collate(items)
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (4, 3, 16, 16)
    assert len(batch["skipped"]) == 1
    # decode_jpeg and PIL decode the same JPEG to within a level or two
    torch.manual_seed(0)
    fast = ds[0]["image"].float()
    torch.manual_seed(0)
    pil = build_transform(cfg, train=True)(Image.open(paths[0][0])).float()
    assert (fast - pil).abs().mean().item() < 2.0
    tiny = FileImageDataset(paths[:1], build_transform(cfg, train=True), max_image_pixels=100)
    assert "more than the limit" in tiny[0].reason  # the pixel limit holds on the fast path too


def test_the_jpeg_frame_header_reader_agrees_with_pil(tmp_path):
    """The lean path reads size and channels from the JPEG's frame header itself (no PIL open per file)."""
    import io

    from kdforge.data.transforms import _jpeg_frame

    rgb = photo(1, 37, 52)
    cases = {"baseline": (Image.fromarray(rgb), {}), "progressive": (Image.fromarray(rgb), {"progressive": True}),
             "grey": (Image.fromarray(rgb[..., 0]), {}), "cmyk": (Image.fromarray(rgb).convert("CMYK"), {}),
             "exif": (Image.fromarray(rgb), {"exif": Image.Exif().tobytes() + b"x" * 300})}
    for name, (image, kwargs) in cases.items():
        buf = io.BytesIO()
        image.save(buf, "JPEG", **kwargs)
        with Image.open(io.BytesIO(buf.getvalue())) as im:
            expected = (*im.size, len(im.getbands()))
        assert _jpeg_frame(buf.getvalue()) == expected, name
    png = io.BytesIO()
    Image.fromarray(rgb).save(png, "PNG")
    assert _jpeg_frame(png.getvalue()) is None and _jpeg_frame(b"\xff\xd8\xff" + b"junk" * 20) is None
