"""The image_mixer source: synthetic images mixed by a (tiny, random) diffusion model from pairs of training images.

Generation is checked for what a user relies on: the files are written once and deterministically, image i does
not depend on how the set was split across runs (a larger count, SIGTERM, a crash), the UNet's context really is
the CLIP embeddings of the mixed images, and a folder is never filled by two configurations.
"""

import json
import os
import signal
import sys

import pytest
import torch
from image_mixer_helpers import EMBED_DIM, require_diffusion, tiny_pipeline

from kdforge.data.image_mixer import MANIFEST, ImageMixerSource, draw_mix, image_name
from kdforge.data.transforms import TransformConfig, build_transform
from kdforge.engine import signals
from kdforge.errors import DataError, KdforgeError

SOURCE = {"plugin": "procedural", "num_train": 16, "num_val": 4, "image_size": 24}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One intra-op thread: the tiny models' convolutions are microseconds of work, and OpenMP threads spinning
    against other processes on a shared machine turn them into seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    return str(tiny_pipeline(tmp_path_factory.mktemp("mixer") / "pipeline"))


@pytest.fixture(scope="module")
def reference(pipeline, tmp_path_factory):
    """{file name: bytes} of one uninterrupted run of 6 images (seed 0, batch_size 3)."""
    out = tmp_path_factory.mktemp("reference")
    _source(pipeline, out).build("train", None)
    return _files(out)


def _source(pipeline, out, **kw) -> ImageMixerSource:
    cfg = {"source": SOURCE, "out": str(out), "count": 6, "pipeline": pipeline, "steps": 2, "image_size": 32,
           "device": "cpu", "batch_size": 3, **kw}
    return ImageMixerSource(ImageMixerSource.Config(**cfg))


def _files(out) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name.startswith("mix_")}


@pytest.fixture
def unet_calls(monkeypatch):
    """Every UNet call's (sample shape, encoder_hidden_states); set ``calls.action = fn(n)`` to act on call n."""
    diffusers, _ = require_diffusion()
    forward = diffusers.UNet2DConditionModel.forward

    class Calls(list):
        action = None

    calls = Calls()

    def spy(self, sample, timestep, encoder_hidden_states, *args, **kwargs):
        calls.append((tuple(sample.shape), encoder_hidden_states.detach().clone()))
        if calls.action is not None:
            calls.action(len(calls))
        return forward(self, sample, timestep, encoder_hidden_states, *args, **kwargs)

    monkeypatch.setattr(diffusers.UNet2DConditionModel, "forward", spy)
    return calls


def test_generates_the_images_once_deterministically_and_serves_them_unlabelled(pipeline, reference, tmp_path,
                                                                              unet_calls):
    assert sorted(reference) == [image_name(i) for i in range(6)]
    out = tmp_path / "again"
    source = _source(pipeline, out)
    ds = source.build("train", build_transform(TransformConfig(image_size=16), train=True))
    assert _files(out) == reference  # same seed: the same bytes
    assert len(ds) == 6 and source.num_classes is None
    item = ds[5]
    assert item["label"] == -1 and item["image"].shape == (3, 16, 16)
    assert len(set(reference.values())) == 6  # six different images, not one repeated
    calls = len(unet_calls)
    assert calls == 2 * 2  # two batches (3 + 3 images) of two steps
    source.build("train", None)  # a complete folder: nothing generated again
    assert len(unet_calls) == calls
    manifest = json.loads((out / MANIFEST).read_text())
    assert manifest["config"]["seed"] == 0 and manifest["config"]["source_size"] == 16
    mixes = manifest["images"]
    assert sorted(mixes) == sorted(reference)
    assert all(len(set(m)) == 2 and all(0 <= j < 16 for j in m) for m in mixes.values())
    assert mixes[image_name(4)] == draw_mix(0, 4, 16, 2)  # image i's mix depends on (seed, i) only
    other = tmp_path / "seed1"
    _source(pipeline, other, seed=1, count=2).build("train", None)
    assert all(_files(other)[n] != reference[n] for n in _files(other))


def test_the_seed_draws_the_noise_not_only_the_mix(pipeline, tmp_path):
    import numpy as np
    from PIL import Image

    two = {**SOURCE, "num_train": 2}  # both seeds mix the same two images (cross-attention ignores their order)
    pixels = []
    for seed in (0, 1):
        _source(pipeline, tmp_path / f"s{seed}", count=1, seed=seed, source=two).build("train", None)
        pixels.append(np.asarray(Image.open(tmp_path / f"s{seed}" / image_name(0)), dtype=np.float64))
    # other noise: as different as two unrelated images (the same noise differs by float rounding, < 0.01)
    assert np.abs(pixels[0] - pixels[1]).mean() > 0.2 * pixels[0].std()


def test_a_larger_count_later_adds_the_same_images_as_one_run(pipeline, reference, tmp_path, unet_calls):
    out = tmp_path / "grown"
    _source(pipeline, out, count=3).build("train", None)
    assert sorted(_files(out)) == [image_name(i) for i in range(3)]
    before = len(unet_calls)
    _source(pipeline, out, count=6).build("train", None)
    assert len(unet_calls) - before == 2  # images 3..5 only: one batch of two steps
    assert _files(out) == reference


def test_a_stochastic_scheduler_draws_each_images_noise_from_its_own_generator(pipeline, tmp_path):
    diffusers, _ = require_diffusion()
    import shutil

    import numpy as np
    from PIL import Image

    ancestral = tmp_path / "ancestral"
    shutil.copytree(pipeline, ancestral)
    diffusers.EulerAncestralDiscreteScheduler(num_train_timesteps=100).save_pretrained(ancestral / "scheduler")
    runs = {"one": [(4, 2)], "resumed": [(2, 2), (4, 2)], "batch_of_4": [(4, 4)]}
    files = {}
    for seed, (name, plan) in enumerate(runs.items()):
        torch.manual_seed(seed)  # the global generator plays no part
        for count, batch_size in plan:
            _source(str(ancestral), tmp_path / name, count=count, batch_size=batch_size).build("train", None)
        files[name] = _files(tmp_path / name)
    assert files["one"] == files["resumed"]
    # another batch size: the same images up to the rounding of batched kernels (other noise differs by ~40 levels)
    for n in files["one"]:
        one, four = (np.asarray(Image.open(tmp_path / run / n), dtype=np.int16) for run in ("one", "batch_of_4"))
        assert np.abs(one - four).max() <= 2 and np.abs(one - four).mean() < 0.05


@pytest.fixture
def sigterm_cleared():
    """SIGTERM's stop request cleared after the test, whatever it asserted (it is process-wide)."""
    yield
    with signals.stop_on_sigterm():  # the outermost block clears the request on entry
        pass


def test_sigterm_stops_between_steps_and_the_rerun_completes_the_same_set(pipeline, reference, tmp_path, unet_calls,
                                                                          sigterm_cleared):
    out = tmp_path / "stopped"
    unet_calls.action = lambda n: n == 3 and os.kill(os.getpid(), signal.SIGTERM)  # in the second batch
    with signals.stop_on_sigterm(), pytest.raises(signals.Preempted, match="image_mixer"):
        _source(pipeline, out).build("train", None)
    first = [image_name(i) for i in range(3)]
    assert sorted(_files(out)) == first  # the first batch, whole; nothing of the second, nothing half-written
    assert sorted(p.name for p in out.iterdir()) == sorted([".image_mixer.lock", MANIFEST, *first])
    assert sorted(json.loads((out / MANIFEST).read_text())["images"]) == first
    unet_calls.action = None
    with signals.stop_on_sigterm():  # the next run (a new process in real life: the request is cleared)
        _source(pipeline, out).build("train", None)
    assert _files(out) == reference


def test_a_crash_loses_only_the_batch_in_flight(pipeline, reference, tmp_path, unet_calls):
    out = tmp_path / "crashed"

    def crash(n):
        if n == 4:
            raise RuntimeError("CUDA out of memory (simulated)")

    unet_calls.action = crash
    with pytest.raises(RuntimeError, match="simulated"):
        _source(pipeline, out).build("train", None)
    assert sorted(_files(out)) == [image_name(i) for i in range(3)]
    # a kill before the manifest was rewritten: images on disk without their entries
    manifest = json.loads((out / MANIFEST).read_text())
    manifest["images"] = {}
    (out / MANIFEST).write_text(json.dumps(manifest))
    unet_calls.action = None
    _source(pipeline, out).build("train", None)
    assert _files(out) == reference
    assert sorted(json.loads((out / MANIFEST).read_text())["images"]) == sorted(reference)


@pytest.mark.parametrize("images_per_mix, guidance_scale", [(2, 3.0), (3, 1.0)])
def test_the_unet_context_is_the_clip_embeddings_of_the_mixed_images(pipeline, tmp_path, unet_calls, images_per_mix,
                                                                     guidance_scale):
    _, transformers = require_diffusion()
    out = tmp_path / "ctx"
    source = _source(pipeline, out, count=3, images_per_mix=images_per_mix, guidance_scale=guidance_scale)
    source.build("train", None)
    shape, context = unet_calls[0]
    rows = 2 * 3 if guidance_scale > 1 else 3  # guidance: the unconditional rows first
    assert shape[0] == rows and context.shape == (rows, images_per_mix, EMBED_DIM)
    cond = context[rows - 3:]
    if guidance_scale > 1:
        assert (context[:3] == 0).all()
    # the embeddings of each image's sources, in draw order, computed here from the saved encoder
    from PIL import Image

    encoder = transformers.CLIPVisionModelWithProjection.from_pretrained(pipeline, subfolder="image_encoder")
    processor = transformers.CLIPImageProcessor.from_pretrained(pipeline, subfolder="feature_extractor")
    train = source.inner.build("train", None)
    mixes = json.loads((out / MANIFEST).read_text())["images"]
    for i in range(3):
        mix = mixes[image_name(i)]
        assert len(set(mix)) == images_per_mix
        pil = [Image.fromarray((train[j]["image"] * 255).round().byte().permute(1, 2, 0).numpy()) for j in mix]
        with torch.no_grad():
            expected = encoder(processor(images=pil, return_tensors="pt").pixel_values).image_embeds
        torch.testing.assert_close(cond[i], expected, rtol=1e-4, atol=1e-5 * expected.abs().max().item())
        assert (cond[i][0] - cond[i][1]).abs().max() > 1e-3 * expected.abs().max()  # two different images


def test_a_folder_of_another_configuration_is_refused(pipeline, tmp_path):
    out = tmp_path / "mixed"
    _source(pipeline, out, count=1).build("train", None)
    with pytest.raises(KdforgeError, match=r"other settings \(seed = 0 there, 1 now.*another folder"):
        _source(pipeline, out, count=1, seed=1).build("train", None)
    with pytest.raises(KdforgeError, match=r"source_size = 16 there, 24 now"):
        _source(pipeline, out, count=1, source={**SOURCE, "num_train": 24}).build("train", None)
    _source(pipeline, out, count=1, batch_size=3, precision="fp32").build("train", None)  # how, not what: fine
    (out / MANIFEST).unlink()
    with pytest.raises(KdforgeError, match="no manifest.json"):
        _source(pipeline, out, count=1).build("train", None)


def test_without_diffusers_one_clear_error_names_the_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` raises ImportError
    with pytest.raises(KdforgeError, match=r"pip install 'kdforge\[diffusion\]'"):
        _source(str(tmp_path / "pipeline_dir"), tmp_path / "out", count=1).build("train", None)
    assert not list((tmp_path / "out").glob("mix_*"))


def test_a_complete_folder_is_served_without_diffusers(pipeline, reference, tmp_path, monkeypatch):
    out = tmp_path / "done"
    _source(pipeline, out, count=2).build("train", None)
    monkeypatch.setitem(sys.modules, "diffusers", None)
    written = (out / MANIFEST).stat().st_mtime_ns
    ds = _source(pipeline, out, count=2).build("train", None)
    assert len(ds) == 2 and ds[1]["label"] == -1
    assert (out / MANIFEST).stat().st_mtime_ns == written  # nothing written: the folder may be read-only


def test_a_hub_id_that_is_not_cached_offline_says_how_to_get_it(tmp_path, monkeypatch):
    require_diffusion()
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KdforgeError, match=r"'kdforge-tests/no-such-pipeline'.*huggingface-cli download"):
        _source("kdforge-tests/no-such-pipeline", tmp_path / "out", count=1).build("train", None)
    with pytest.raises(KdforgeError, match="is not a folder"):
        _source("./no/such/folder", tmp_path / "out2", count=1).build("train", None)


def test_settings_that_cannot_work_are_explained(pipeline, tmp_path):
    with pytest.raises(DataError, match="train split only"):
        _source(pipeline, tmp_path / "out").build("val", None)
    with pytest.raises(DataError, match="data.out"):
        _source(pipeline, "").build("train", None)
    with pytest.raises(KdforgeError, match="not a multiple of 2"):
        _source(pipeline, tmp_path / "odd", count=1, image_size=33).build("train", None)
    with pytest.raises(DataError, match="images_per_mix = 3 distinct images, but the source's train split has 2"):
        _source(pipeline, tmp_path / "small", count=1, images_per_mix=3,
                source={**SOURCE, "num_train": 2}).build("train", None)
