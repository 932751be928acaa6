"""Train/eval transforms: one path for PIL, numpy and tensors, float [0, 1] output, reproducible under a seed."""

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.data.transforms import TransformConfig, as_float_image, build_transform, to_image_tensor
from kdforge.errors import RecipeError
from kdforge.recipe.schema import build


def _pil(seed=0, size=(40, 56)):
    arr = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(arr), arr


@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("kind", ["pil", "pil_grey", "pil_rgba", "numpy", "uint8", "float"])
def test_every_input_kind_gives_a_float_image_in_unit_range(kind, train):
    img, arr = _pil()
    inputs = {
        "pil": img,
        "pil_grey": img.convert("L"),
        "pil_rgba": img.convert("RGBA"),
        "numpy": arr,
        "uint8": torch.from_numpy(arr).permute(2, 0, 1),
        "float": torch.from_numpy(arr).permute(2, 0, 1).float() / 255,
    }
    tf = build_transform(TransformConfig(image_size=24, color_jitter=0.8, interpolation="bicubic"), train=train)
    out = tf(inputs[kind])
    assert out.shape == (3, 24, 24) and out.dtype == torch.float32
    assert 0.0 <= out.min() and out.max() <= 1.0
    if kind == "pil_grey":  # grey stays grey: three equal channels, even after colour jitter
        assert torch.allclose(out[0], out[1], atol=1 / 255) and torch.allclose(out[1], out[2], atol=1 / 255)


def test_train_transform_is_reproducible_under_torch_seed():
    img, _ = _pil()
    tf = build_transform(TransformConfig(image_size=16, color_jitter=1.0), train=True)
    torch.manual_seed(5)
    a = tf(img)
    torch.manual_seed(5)
    b = tf(img)
    torch.manual_seed(6)
    c = tf(img)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_pil_and_uint8_tensor_take_the_same_path():
    img, arr = _pil(1)
    tf = build_transform(TransformConfig(image_size=20, color_jitter=0.5), train=True)
    torch.manual_seed(0)
    a = tf(img)
    torch.manual_seed(0)
    b = tf(torch.from_numpy(arr).permute(2, 0, 1).contiguous())
    assert torch.equal(a, b)


def test_float_input_matches_uint8_input_within_rounding():
    img, arr = _pil(2)
    tf = build_transform(TransformConfig(image_size=32), train=False)
    a = tf(torch.from_numpy(arr).permute(2, 0, 1))
    b = tf(torch.from_numpy(arr).permute(2, 0, 1).float() / 255)
    assert (a - b).abs().max() <= 2 / 255


def test_eval_transform_resizes_then_takes_the_centre():
    # 64x64 image: a 16-pixel white frame around a black centre. crop_pct 0.5 resizes to 32 / 0.5 = 64 (no-op)
    # and the centre 32x32 crop is entirely black; crop_pct 1.0 resizes to 32 and keeps some of the frame.
    x = torch.full((3, 64, 64), 255, dtype=torch.uint8)
    x[:, 16:48, 16:48] = 0
    centre = build_transform(TransformConfig(image_size=32, crop_pct=0.5), train=False)(x)
    whole = build_transform(TransformConfig(image_size=32, crop_pct=1.0), train=False)(x)
    assert centre.max() == 0.0
    assert whole[:, 0, 0].min() == 1.0 and whole[:, 16, 16].max() == 0.0


def test_eval_transform_keeps_aspect_ratio_before_the_crop():
    # a wide image: the shorter side goes to image_size / crop_pct, the centre crop is square
    x = torch.zeros(3, 50, 200, dtype=torch.uint8)
    x[:, :, 90:110] = 255  # a vertical white band in the middle
    out = build_transform(TransformConfig(image_size=20, crop_pct=1.0), train=False)(x)
    assert out.shape == (3, 20, 20)
    # the band is 20/200 of the width; after scaling by 20/50 it is 8 pixels wide in the centre of the crop
    assert out[:, :, 10].min() == 1.0 and out[:, :, 0].max() == 0.0


def test_flip_probability_one_mirrors_the_image():
    x = torch.arange(3 * 8 * 8, dtype=torch.float32).reshape(3, 8, 8) / (3 * 64)
    tf = build_transform(TransformConfig(image_size=8, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=1.0), train=True)
    assert torch.allclose(tf(x), x.flip(-1))


def test_transform_does_not_modify_its_input():
    x = torch.rand(3, 8, 8) * 1.2 - 0.1  # values outside [0, 1] would be clamped in place by a careless transform
    before = x.clone()
    build_transform(TransformConfig(image_size=8, crop_pct=1.0), train=False)(x)
    assert torch.equal(x, before)


def test_bad_inputs_are_explained():
    with pytest.raises(ValueError, match="channel-first"):
        to_image_tensor(torch.zeros(8, 8, 3, 2))
    with pytest.raises(TypeError, match="uint8.*floating"):
        to_image_tensor(torch.zeros(3, 4, 4, dtype=torch.int32))
    with pytest.raises(TypeError, match="PIL image"):
        to_image_tensor("image.jpg")
    assert as_float_image(torch.full((1, 2, 2), 255, dtype=torch.uint8)).shape == (3, 2, 2)


def test_config_from_a_recipe_table_is_validated():
    cfg = build(TransformConfig, {"image_size": 16, "scale": [0.5, 1.0], "color_jitter": 0.4}, "augment")
    assert cfg.scale == (0.5, 1.0)
    with pytest.raises(RecipeError, match="scale must be"):
        build(TransformConfig, {"scale": [0.9, 0.2]}, "augment")
    with pytest.raises(RecipeError, match="did you mean 'hflip'"):
        build(TransformConfig, {"hflipp": 0.5}, "augment")


DEIT = dict(image_size=32, auto_augment="rand-m9-mstd0.5-inc1", re_prob=0.25, interpolation="bicubic")


def _seeded(tf, image, seed):
    """The transform under one seed of torch, Python and numpy (as kdforge.engine.trainer.SeededItems runs it)."""
    import random

    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    return tf(image)


def test_deit_augmentation_applies_randaugment_and_erasing_on_a_fixed_seed(monkeypatch):
    from timm.data import auto_augment
    from timm.data.random_erasing import RandomErasing

    calls = {"ra": 0, "erase": 0, "erased": 0}
    ra_call, erase_call = auto_augment.RandAugment.__call__, RandomErasing.__call__

    def ra_spy(self, img):
        calls["ra"] += 1
        return ra_call(self, img)

    def erase_spy(self, x):
        calls["erase"] += 1
        out = erase_call(self, x.clone())
        calls["erased"] += int(not torch.equal(out, x))
        return out

    monkeypatch.setattr(auto_augment.RandAugment, "__call__", ra_spy)
    monkeypatch.setattr(RandomErasing, "__call__", erase_spy)
    img, _ = _pil(size=(48, 48))
    tf = build_transform(TransformConfig(**DEIT), train=True)
    plain = build_transform(TransformConfig(image_size=32, interpolation="bicubic"), train=True)
    outs = [_seeded(tf, img, seed) for seed in range(40)]
    assert calls["ra"] == 40 and calls["erase"] == 40
    assert 4 <= calls["erased"] <= 18  # probability 0.25 of 40 images (binomial: 99.9% within these bounds)
    # same seeds, same crop and flip draws, yet other pixels: RandAugment changed them
    differ = sum(not torch.equal(o, _seeded(plain, img, seed)) for seed, o in enumerate(outs))
    assert differ >= 35
    # reproducible under the seeds
    assert all(torch.equal(outs[s], _seeded(tf, img, s)) for s in (0, 7, 13))


def test_random_erasing_is_timms_pixel_noise_in_the_normalised_space():
    img, _ = _pil(size=(64, 64))
    cfg = TransformConfig(image_size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0, re_prob=1.0)
    erased = _seeded(build_transform(cfg, train=True), img, 3)
    clean = _seeded(build_transform(TransformConfig(image_size=64, scale=(1.0, 1.0), ratio=(1.0, 1.0), hflip=0.0),
                                    train=True), img, 3)
    changed = ((erased - clean).abs() > 1e-5).any(0)  # elsewhere only float rounding of the normalisation
    rows, cols = changed.any(1).nonzero().flatten(), changed.any(0).nonzero().flatten()
    box = changed[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1]
    assert box.float().mean() > 0.99  # one rectangle
    assert 0.02 * 64 * 64 * 0.9 <= int(changed.sum()) <= 64 * 64 / 3 * 1.1  # timm's area range
    mean = torch.tensor(cfg.re_mean).view(3, 1, 1)
    std = torch.tensor(cfg.re_std).view(3, 1, 1)
    noise = ((erased - mean) / std)[:, changed]
    assert abs(float(noise.mean())) < 0.15 and abs(float(noise.std()) - 1) < 0.1  # N(0, 1) once normalised
    assert erased.min() < 0 or erased.max() > 1  # not clipped to [0, 1]


@pytest.mark.parametrize(
    "table, message",
    [({"auto_augment": "rand-m9-mstd0.5-inc1", "color_jitter": 0.3}, "no colour jitter when RandAugment is on"),
     ({"auto_augment": "bogus"}, "not a timm policy string"),
     ({"re_prob": 1.5}, "re_prob")],
)
def test_bad_augmentation_settings_are_recipe_errors(table, message):
    with pytest.raises(RecipeError, match=message):
        build(TransformConfig, table, "augment")
