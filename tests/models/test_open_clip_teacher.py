"""The open_clip teacher: CLIP image towers as teachers (ViT, ResNet, timm trunk), text embeddings, checkpoints, errors.

Tiny random models registered with open_clip.add_model_config keep every test to about a second on a CPU."""

import json
import sys
import warnings

import pytest
import torch
from safetensors.torch import save_file

from kdforge.errors import KdforgeError, RecipeError, ShapeError
from kdforge.plugins import create, get_registry
from kdforge.teachers import TeacherOutput

_TEXT = {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2}
_VIT = {"image_size": 32, "patch_size": 8, "width": 64, "head_width": 32, "layers": 2}
#: Tiny open_clip architectures: name -> model config (embed_dim 32, the joint image-text width).
TINY = {
    "kdforge-tiny-vit": {"embed_dim": 32, "vision_cfg": _VIT, "text_cfg": _TEXT},
    "kdforge-tiny-vit-avg": {"embed_dim": 32, "vision_cfg": {**_VIT, "pool_type": "avg"}, "text_cfg": _TEXT},
    "kdforge-tiny-vit-attnpool": {
        "embed_dim": 32, "text_cfg": _TEXT,
        "vision_cfg": {**_VIT, "attentional_pool": True, "attn_pooler_queries": 4, "attn_pooler_heads": 2},
    },
    # layers as a list: open_clip's ModifiedResNet; width 8 -> a 256-wide last feature map, 64 px -> a 2x2 grid
    "kdforge-tiny-rn": {"embed_dim": 32, "text_cfg": _TEXT,
                        "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 64}},
    # timm's test_vit trunk (160 px, patch 16, width 64) with open_clip's linear projection head
    "kdforge-tiny-timm": {"embed_dim": 32, "text_cfg": _TEXT,
                          "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit", "timm_pool": "avg",
                                         "timm_proj": "linear"}},
    # the same trunk projecting in its own head (timm_proj null, as EVA02 CLIP does), CLS-token pooling
    "kdforge-tiny-timm-token": {"embed_dim": 32, "text_cfg": _TEXT,
                                "vision_cfg": {"image_size": 160, "timm_model_name": "test_vit", "timm_pool": "token",
                                               "timm_proj": None}},
}


@pytest.fixture(scope="session")
def oc(tmp_path_factory):
    """open_clip, with the TINY architectures registered (open_clip keeps them for the rest of the session)."""
    open_clip = pytest.importorskip("open_clip", reason="open_clip_torch is not installed: pip install 'kdforge[clip]'")
    folder = tmp_path_factory.mktemp("open_clip_configs")
    for name, model_cfg in TINY.items():
        (folder / f"{name}.json").write_text(json.dumps(model_cfg))
    open_clip.add_model_config(folder)
    return open_clip


def _teacher(model="kdforge-tiny-vit", seed=0, **overrides):
    table = {"plugin": "open_clip", "model": model, "pretrained": "", "autocast": "none", **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights on purpose
        torch.manual_seed(seed)
        return create("teachers", table, "teacher")


def _images(b=2, size=32, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _normed(t, x):
    return (x - t.mean) / t.std


def test_open_clip_teacher_is_registered():
    assert "open_clip" in get_registry().names("teachers")


def test_vit_output_contract_is_the_joint_space(oc):
    t = _teacher()
    x = _images(3)
    out = t(x)
    assert isinstance(out, TeacherOutput)
    assert t.embed_dim == 32 and t.patch_size == 8 and out.grid == (4, 4) == t.grid((32, 32))
    assert out.cls.shape == (3, 32) and out.patches.shape == (3, 16, 32) and out.hidden is None
    assert out.cls.dtype == out.patches.dtype == torch.float32
    assert not out.cls.is_inference() and not out.patches.is_inference()
    # mean/std: open_clip's preprocessing config (OpenAI's statistics for a model without a tag)
    torch.testing.assert_close(t.mean.flatten(), torch.tensor(oc.OPENAI_DATASET_MEAN))
    torch.testing.assert_close(t.std.flatten(), torch.tensor(oc.OPENAI_DATASET_STD))
    with torch.no_grad():
        # cls is open_clip's image embedding of the normalised images (after the projection, not L2-normalised)
        torch.testing.assert_close(out.cls, t.model.encode_image(_normed(t, x)))
        # patches: the tower's own patch tokens (after ln_post) through the same projection
        t.model.visual.output_tokens = True
        try:
            pooled, tokens = t.model.visual(_normed(t, x))
        finally:
            t.model.visual.output_tokens = False
    torch.testing.assert_close(out.patches, tokens @ t.model.visual.proj)
    torch.testing.assert_close(out.cls, pooled)


def test_avg_pooled_vit_embedding_is_the_mean_patch(oc):
    """With pool_type "avg" the image embedding is the mean of the projected patches: one space for both."""
    out = _teacher("kdforge-tiny-vit-avg")(_images())
    torch.testing.assert_close(out.cls, out.patches.mean(dim=1))


def test_teacher_is_frozen_deterministic_and_its_outputs_enter_autograd(oc):
    t = _teacher()
    assert all(not p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not t.model.training
    x = _images()
    a, b = t(x), t(x)
    torch.testing.assert_close(a.cls, b.cls, rtol=0, atol=0)
    torch.testing.assert_close(a.patches, b.patches, rtol=0, atol=0)
    torch.testing.assert_close(_teacher(seed=0)(x).cls, a.cls, rtol=0, atol=0)  # same seed, same random model
    w = torch.ones(32, requires_grad=True)
    (a.cls @ w).sum().backward()
    assert w.grad is not None


def test_bf16_autocast_gives_float32_close_to_float32(oc):
    x, texts = _images(), ["a dog", "a cat"]
    ref, t = _teacher(hidden_layers=1), _teacher(hidden_layers=1, autocast="bf16")
    out, want = t(x), ref(x)
    for got, exp in ((out.cls, want.cls), (out.patches, want.patches), (t.encode_text(texts), ref.encode_text(texts))):
        assert got.dtype == torch.float32
        torch.testing.assert_close(got, exp, rtol=0.05, atol=0.05)


def test_hidden_layers_are_projected_like_the_output(oc):
    t = _teacher(hidden_layers=2)
    out = t(_images())
    assert len(out.hidden) == 2 and all(h.shape == (2, 17, 32) for h in out.hidden)
    torch.testing.assert_close(out.hidden[-1], torch.cat([out.cls[:, None], out.patches], dim=1))
    assert not torch.allclose(out.hidden[0], out.hidden[1])
    with pytest.raises(KdforgeError, match="hidden_layers = 3 but kdforge-tiny-vit has 2 blocks"):
        _teacher(hidden_layers=3)


def test_encode_text_is_open_clips_text_embedding(oc):
    t = _teacher()
    texts = ["a photo of a dog.", "a photo of a cat.", "a diagram"]
    emb = t.encode_text(texts)
    assert emb.shape == (3, 32) and emb.dtype == torch.float32 and not emb.is_inference()
    tokens = oc.get_tokenizer("kdforge-tiny-vit")(texts)
    assert tokens.shape == (3, 16)  # the model's context length
    with torch.no_grad():
        torch.testing.assert_close(emb, t.model.encode_text(tokens))
    assert not torch.allclose(emb.norm(dim=-1), torch.ones(3))  # raw: the caller normalises
    torch.testing.assert_close(t.encode_text("a diagram"), emb[2:])
    assert t.encode_text([]).shape == (0, 32)


def test_class_prompts_fill_the_template(oc):
    prompts = _teacher().class_prompts(["dog", "golden_retriever"])
    assert prompts == ["a photo of a dog.", "a photo of a golden retriever."]
    t = _teacher(prompt="{} (a {{kind}} of thing)")
    assert t.class_prompts(["cat"]) == ["cat (a {kind} of thing)"]
    for bad in ("a photo", "a {} and a {}", "a {name}", "a {"):
        with pytest.raises(RecipeError, match="prompt"):
            _teacher(prompt=bad)


@pytest.mark.parametrize("fmt", ["safetensors", "pth-state_dict"])
def test_checkpoint_round_trip(oc, tmp_path, fmt):
    ref = _teacher(seed=1)
    sd = ref.model.state_dict()
    if fmt == "safetensors":
        path = tmp_path / "clip.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    else:
        path = tmp_path / "clip.pth"
        torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)  # tensors only
    t = _teacher(seed=2, checkpoint=str(path))
    x = _images()
    torch.testing.assert_close(t(x).cls, ref(x).cls, rtol=0, atol=0)
    torch.testing.assert_close(t(x).patches, ref(x).patches, rtol=0, atol=0)
    torch.testing.assert_close(t.encode_text(["a dog"]), ref.encode_text(["a dog"]), rtol=0, atol=0)
    assert not torch.allclose(_teacher(seed=2)(x).cls, ref(x).cls)


def test_checkpoint_for_another_image_size(oc, tmp_path):
    """image_size builds the model for another size; the file's positional embeddings are resized as they load."""
    torch.save(_teacher(seed=1).model.state_dict(), tmp_path / "clip.pth")
    t = _teacher(checkpoint=str(tmp_path / "clip.pth"), image_size=48)
    assert t.grid((48, 48)) == (6, 6) and t(_images(size=48)).patches.shape == (2, 36, 32)


def test_a_tag_beside_a_checkpoint_gives_its_statistics_and_activation(oc, tmp_path, monkeypatch):
    """The checkpoint's weights, the tag's mean/std and QuickGELU (a made-up tag: nothing is fetched)."""
    from open_clip.transformer import QuickGELU

    tag = {"url": "", "hf_hub": "", "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "quick_gelu": True}
    monkeypatch.setitem(oc.pretrained._PRETRAINED, "kdforge-tiny-vit", {"madeup": tag})
    ref = _teacher(seed=1)
    torch.save(ref.model.state_dict(), tmp_path / "clip.pth")
    t = _teacher(checkpoint=str(tmp_path / "clip.pth"), pretrained="madeup")
    torch.testing.assert_close(t.mean.flatten(), torch.full((3,), 0.5))
    torch.testing.assert_close(t.std.flatten(), torch.full((3,), 0.25))
    assert isinstance(t.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    assert not isinstance(ref.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    torch.testing.assert_close(t.model.visual.proj, ref.model.visual.proj, rtol=0, atol=0)


def test_checkpoint_errors_say_what_to_do(oc, tmp_path):
    import argparse

    sd = _teacher(seed=1).model.state_dict()
    torch.save({"state_dict": sd, "args": argparse.Namespace(lr=0.1)}, tmp_path / "pickled.pth")
    with pytest.raises(KdforgeError, match="never unpickles.*re-save only its weights"):
        _teacher(checkpoint=str(tmp_path / "pickled.pth"))
    torch.save(_teacher("kdforge-tiny-rn").model.state_dict(), tmp_path / "rn.pth")
    with pytest.raises(ShapeError, match=r"does not fit the model: .*Check that model names the architecture"):
        _teacher(checkpoint=str(tmp_path / "rn.pth"))
    with pytest.raises(KdforgeError, match="no such file"):
        _teacher(checkpoint=str(tmp_path / "nope.safetensors"))


def test_missing_weights_say_how_to_work_offline(oc, monkeypatch):
    import open_clip.factory

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(open_clip.factory, "download_pretrained", offline)
    with pytest.raises(KdforgeError, match=r"pretrained weights 'laion2b_s34b_b79k'.*couldn't connect.*"
                                           r"checkpoint = .*HF_HUB_OFFLINE=1"):
        _teacher("ViT-B-32", pretrained="laion2b_s34b_b79k")


def test_unknown_model_and_tag_are_clear_errors(oc):
    with pytest.raises(KdforgeError, match="'ViT-L-41' is not an open_clip model: did you mean .*ViT-L-14"):
        _teacher("ViT-L-41")
    with pytest.raises(KdforgeError, match=r"'openia' is not an open_clip tag of model 'ViT-B-32' \(its tags: openai,"):
        _teacher("ViT-B-32", pretrained="openia")
    with pytest.raises(KdforgeError, match="no pretrained weights for it.*checkpoint"):
        _teacher(pretrained="openai")
    with pytest.raises(KdforgeError, match="brings its own weights"):
        _teacher("hf-hub:org/model", pretrained="openai")


def test_wrong_image_size_is_a_clear_error(oc):
    t = _teacher()
    with pytest.raises(ShapeError, match=r"takes 32x32 px images .* set image_size = 64"):
        t(_images(size=64))
    with pytest.raises(ShapeError, match="takes 32x32 px"):
        t.grid((64, 64))


def test_resnet_patches_are_the_attention_pool_values(oc):
    t = _teacher("kdforge-tiny-rn")
    x = _images(size=64)
    out = t(x)
    assert t.patch_size == 32 and out.grid == (2, 2) and out.cls.shape == (2, 32) and out.patches.shape == (2, 4, 32)
    with torch.no_grad():
        torch.testing.assert_close(out.cls, t.model.encode_image(_normed(t, x)))
        pool = t.model.visual.attnpool  # uniform attention, no position: the embedding is the mean of the values
        for p in (pool.q_proj.weight, pool.q_proj.bias, pool.k_proj.weight, pool.k_proj.bias):
            p.zero_()
        pool.positional_embedding.zero_()
    out = t(x)
    torch.testing.assert_close(out.cls, out.patches.mean(dim=1))


def test_timm_trunk_patches_go_through_the_head(oc, tmp_path):
    t = _teacher("kdforge-tiny-timm")
    x = _images(size=160)
    out = t(x)
    assert t.patch_size == 16 and out.grid == (10, 10) and out.patches.shape == (2, 100, 32) and t.embed_dim == 32
    with torch.no_grad():
        torch.testing.assert_close(out.cls, t.model.encode_image(_normed(t, x)))
    torch.testing.assert_close(out.cls, out.patches.mean(dim=1))  # avg pool, then a linear head
    # a checkpoint of the 160 px model loads into one built for 192 px (timm's position embeddings resampled)
    torch.save(t.model.state_dict(), tmp_path / "timm.pth")
    big = _teacher("kdforge-tiny-timm", checkpoint=str(tmp_path / "timm.pth"), image_size=192)
    assert big(_images(1, size=192)).patches.shape == (1, 144, 32)


def test_timm_trunk_with_its_own_projection(oc):
    """timm_proj null: the trunk's classifier is the projection; the patches go through it too."""
    t = _teacher("kdforge-tiny-timm-token")
    x = _images(size=160)
    out = t(x)
    assert isinstance(t.model.visual.trunk.head, torch.nn.Linear) and out.patches.shape == (2, 100, 32)
    with torch.no_grad():
        trunk = t.model.visual.trunk
        tokens = trunk.forward_features(_normed(t, x))
        torch.testing.assert_close(out.cls, t.model.encode_image(_normed(t, x)))
        torch.testing.assert_close(out.cls, trunk.head(tokens[:, 0]))
        torch.testing.assert_close(out.patches, trunk.head(tokens[:, 1:]))


def test_tower_without_patch_tokens_gives_the_embedding_only(oc):
    t = _teacher("kdforge-tiny-vit-attnpool")
    x = _images()
    out = t(x)
    assert out.patches.shape == (2, 0, 32) and out.grid == (0, 0) == t.grid((32, 32)) and t.patch_size == 0
    with torch.no_grad():
        torch.testing.assert_close(out.cls, t.model.encode_image(_normed(t, x)))
    with pytest.raises(KdforgeError, match="hidden_layers = 1 needs an open_clip ViT image tower"):
        _teacher("kdforge-tiny-vit-attnpool", hidden_layers=1)


def test_missing_open_clip_names_the_package(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)  # import open_clip now raises ImportError
    with pytest.raises(KdforgeError, match=r"pip install open_clip_torch \(or pip install 'kdforge\[clip\]'\)"):
        create("teachers", {"plugin": "open_clip", "model": "ViT-B-32", "pretrained": ""}, "teacher")
