"""Teachers: output contract, frozen state, normalisation, hidden layers, checkpoints and torch.hub loading."""

import argparse
import warnings

import pytest
import torch
from safetensors.torch import save_file

from kdforge.errors import KdforgeError, RecipeError, ShapeError
from kdforge.plugins import create, get_registry
from kdforge.teachers import Teacher, TeacherOutput
from kdforge.teachers.hub import TorchHubTeacher
from model_helpers import TINY_MODEL, TINY_VIT


def _timm_teacher(**overrides):
    table = {"plugin": "timm", "model": TINY_MODEL, "model_kwargs": dict(TINY_VIT), "autocast": "none", **overrides}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights on purpose
        torch.manual_seed(0)
        return create("teachers", table, "teacher")


def _images(b=2, size=16, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_builtin_teachers_are_registered():
    assert {"timm", "torch_hub", "embedded"} <= set(get_registry().names("teachers"))


@pytest.mark.parametrize(
    "kwargs, prefix",
    [({}, 1), ({"reg_tokens": 3}, 4), ({"class_token": False, "global_pool": "avg"}, 0)],
    ids=["cls", "cls+registers", "no-cls"],
)
def test_timm_teacher_output_contract(kwargs, prefix):
    t = _timm_teacher(model_kwargs={**TINY_VIT, **kwargs})
    x = _images(3)
    out = t(x)
    assert isinstance(out, TeacherOutput)
    assert out.cls.shape == (3, 32) and out.patches.shape == (3, 16, 32) and out.grid == (4, 4) == t.grid((16, 16))
    assert out.cls.dtype == out.patches.dtype == torch.float32
    assert out.hidden is None
    assert t.embed_dim == 32 and t.patch_size == 4
    # the tokens are the model's own, prefix tokens (CLS, registers) split off
    with torch.no_grad():
        ref = t.model.forward_features((x - t.mean) / t.std)
    if prefix:
        torch.testing.assert_close(out.patches, ref[:, prefix:])
        torch.testing.assert_close(out.cls, ref[:, 0])
    else:  # global_pool "avg" puts timm's final norm after the pooling (fc_norm): applied to every token here
        torch.testing.assert_close(out.patches, t.model.fc_norm(ref))
        torch.testing.assert_close(out.cls, t.model.fc_norm(ref.mean(dim=1)))


@pytest.mark.parametrize("fc_norm", [False, None], ids=["norm-then-pool", "pool-then-norm"])
def test_teacher_without_cls_token_uses_the_model_pooling(fc_norm):
    """Without a CLS token the teacher's cls is the model's own global pooling: what its classifier would read."""
    t = _timm_teacher(model_kwargs={**TINY_VIT, "class_token": False, "global_pool": "max", "fc_norm": fc_norm},
                      hidden_layers=1)
    x = _images()
    out = t(x)
    with torch.no_grad():
        pre_logits = t.model.forward_head(t.model.forward_features((x - t.mean) / t.std), pre_logits=True)
    torch.testing.assert_close(out.cls, pre_logits)
    if fc_norm is False:
        torch.testing.assert_close(out.cls, out.patches.amax(dim=1))
    # either way the patch tokens are layer-normalised, and the last hidden output is the final output
    torch.testing.assert_close(out.patches.mean(-1), torch.zeros(2, 16), atol=1e-4, rtol=0)
    torch.testing.assert_close(out.hidden[-1], torch.cat([out.cls[:, None], out.patches], dim=1))


def test_teacher_normalises_its_input_with_the_model_statistics():
    t = _timm_teacher()  # vit_tiny_patch16_224's pretrained_cfg: mean = std = 0.5
    torch.testing.assert_close(t.mean.flatten(), torch.full((3,), 0.5))
    x = _images()
    with torch.no_grad():
        raw = t.model.forward_features(x)[:, 1:]
        normed = t.model.forward_features((x - 0.5) / 0.5)[:, 1:]
    out = t(x)
    torch.testing.assert_close(out.patches, normed)
    assert not torch.allclose(out.patches, raw, atol=1e-3)
    # an explicit mean/std overrides the model's
    t2 = _timm_teacher(mean=[0.1, 0.2, 0.3], std=[0.9, 0.8, 0.7])
    assert t2.mean.flatten().tolist() == pytest.approx([0.1, 0.2, 0.3])


def test_teacher_is_frozen_and_stays_in_eval_mode():
    t = _timm_teacher(model_kwargs={**TINY_VIT, "drop_path_rate": 0.5, "proj_drop_rate": 0.5})
    assert not any(p.requires_grad for p in t.parameters())
    t.train()
    assert not t.training and not any(m.training for m in t.modules())
    x = _images()
    a, b = t(x), t(x)  # drop path would make two calls differ if it were active
    torch.testing.assert_close(a.patches, b.patches, rtol=0, atol=0)
    # outputs are ordinary tensors: they can enter an autograd graph (inference tensors cannot be saved for backward)
    assert not a.patches.is_inference() and not a.patches.requires_grad
    w = torch.ones(32, requires_grad=True)
    ((a.patches * w) ** 2).sum().backward()
    assert w.grad is not None and torch.isfinite(w.grad).all()


@pytest.mark.parametrize("autocast", ["bf16", "fp16"])
def test_autocast_outputs_are_float32_and_close(autocast):
    x = _images()
    ref = _timm_teacher()(x)
    low = _timm_teacher(autocast=autocast)(x)
    assert low.patches.dtype == torch.float32 and low.cls.dtype == torch.float32
    torch.testing.assert_close(low.patches, ref.patches, atol=0.1, rtol=0.1)
    assert not torch.equal(low.patches, ref.patches)  # it did run in reduced precision


def test_auto_autocast_is_float32_on_the_cpu():
    x = _images()
    assert _timm_teacher(autocast="auto").cfg.autocast == "auto"
    assert torch.equal(_timm_teacher(autocast="auto")(x).patches, _timm_teacher(autocast="none")(x).patches)


def test_hidden_layers_are_the_last_blocks_with_cls_first():
    t = _timm_teacher(hidden_layers=2, model_kwargs={**TINY_VIT, "depth": 3, "reg_tokens": 2})
    x = _images()
    out = t(x)
    assert len(out.hidden) == 2 and all(h.shape == (2, 17, 32) and h.dtype == torch.float32 for h in out.hidden)
    # with hidden_norm (default) the last hidden output is the final output
    torch.testing.assert_close(out.hidden[-1][:, 0], out.cls)
    torch.testing.assert_close(out.hidden[-1][:, 1:], out.patches)
    # and the one before is block 2 of 3, normed, registers dropped
    with torch.no_grad():
        tokens = t.model.patch_embed((x - t.mean) / t.std)
        tokens = t.model._pos_embed(tokens)
        for blk in t.model.blocks[:2]:
            tokens = blk(tokens)
        tokens = t.model.norm(tokens)
    torch.testing.assert_close(out.hidden[0], torch.cat([tokens[:, :1], tokens[:, 3:]], dim=1))
    raw = _timm_teacher(hidden_layers=1, hidden_norm=False, model_kwargs={**TINY_VIT, "depth": 3})(x)
    assert not torch.allclose(raw.hidden[-1][:, 1:], raw.patches, atol=1e-3)
    with pytest.raises(KdforgeError, match="hidden_layers = 4 but"):
        _timm_teacher(hidden_layers=4, model_kwargs={**TINY_VIT, "depth": 3})


@pytest.mark.parametrize(
    "kwargs", [{"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}], ids=["cls+registers", "no-cls"]
)
def test_intermediate_layers_end_with_the_final_output_and_are_plain_float32(kwargs):
    """What the linear_dinov2 evaluator reads: the last n blocks, oldest first, normed and split like forward's."""
    t = _timm_teacher(model_kwargs={**TINY_VIT, "depth": 3, **kwargs})
    x = _images()
    out, layers = t(x), t.intermediate_layers(x, 2)
    assert len(layers) == 2 and all(isinstance(o, TeacherOutput) and o.grid == (4, 4) for o in layers)
    assert all(not o.cls.is_inference() and o.cls.dtype == torch.float32 for o in layers)
    torch.testing.assert_close(layers[-1].cls, out.cls)
    torch.testing.assert_close(layers[-1].patches, out.patches)
    assert not torch.allclose(layers[0].cls, out.cls, atol=1e-3)  # an earlier block
    with pytest.raises(KdforgeError, match="has 3 block.*last 4"):
        t.intermediate_layers(x, 4)
    with pytest.raises(KdforgeError, match="resnet18 gives no per-block tokens"):
        _timm_teacher(model="resnet18", model_kwargs={}).intermediate_layers(_images(1, 64), 1)


def test_cnn_teacher_gives_its_feature_map_as_patches():
    t = _timm_teacher(model="resnet18", model_kwargs={})
    out = t(_images(2, 64))
    assert out.grid == (2, 2) == t.grid((64, 64)) and t.patch_size == 32
    assert out.patches.shape == (2, 4, 512)
    torch.testing.assert_close(out.cls, out.patches.mean(dim=1))


def test_wrong_image_size_is_a_clear_error():
    t = _timm_teacher()
    with pytest.raises(ShapeError, match=r"built for 16x16 px images but got 32x32.*img_size = 32"):
        t(_images(1, 32))
    with pytest.raises(ShapeError, match="not a whole number of patches"):
        t.grid((18, 18))
    with pytest.raises(ShapeError, match=r"Tensor\[B, 3, H, W\]"):
        t(torch.rand(2, 16, 16))
    with pytest.raises(ShapeError, match="float images"):
        t(torch.zeros(1, 3, 16, 16, dtype=torch.uint8))
    # dynamic_img_size models take any multiple of the patch size
    dyn = _timm_teacher(model_kwargs={**TINY_VIT, "dynamic_img_size": True})
    out = dyn(torch.rand(1, 3, 24, 32))
    assert out.grid == (6, 8) == dyn.grid((24, 32)) and out.patches.shape == (1, 48, 32)


def test_unknown_model_and_bad_config_are_recipe_level_errors():
    with pytest.raises(KdforgeError, match="not a timm model: did you mean"):
        create("teachers", {"plugin": "timm", "model": "vit_tiny_patch16_244"}, "teacher")
    with pytest.raises(RecipeError, match="autocast"):
        create("teachers", {"plugin": "timm", "autocast": "fp8"}, "teacher")
    with pytest.raises(RecipeError, match="did you mean 'model_kwargs'"):
        create("teachers", {"plugin": "timm", "model_kwarg": {}}, "teacher")


def test_pretrained_download_failure_says_what_to_do(monkeypatch):
    import timm

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    monkeypatch.setattr(timm, "create_model", offline)
    with pytest.raises(KdforgeError, match=r"pretrained weights.*checkpoint = .*HF_HUB_OFFLINE"):
        create("teachers", {"plugin": "timm", "model": TINY_MODEL, "pretrained": True}, "teacher")


# ----------------------------------------------------------------------------------------------- checkpoints
def _state(seed=1, **kwargs):
    torch.manual_seed(seed)
    import timm

    return timm.create_model(TINY_MODEL, pretrained=False, **{**TINY_VIT, **kwargs}).state_dict()


@pytest.mark.parametrize("fmt", ["safetensors", "pth-model-module", "pt-state_dict", "pth-plain"])
def test_checkpoint_loads_every_layout(tmp_path, fmt):
    sd = _state(num_classes=10)  # with a classifier head: the teacher has none and ignores it
    if fmt == "safetensors":
        path = tmp_path / "w.safetensors"
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    elif fmt == "pth-model-module":
        path = tmp_path / "w.pth"
        torch.save({"model": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, path)
    elif fmt == "pt-state_dict":
        path = tmp_path / "w.pt"
        torch.save({"state_dict": sd}, path)
    else:
        path = tmp_path / "w.pth"
        torch.save(sd, path)
    t = _timm_teacher(checkpoint=str(path))
    for name, value in t.model.state_dict().items():
        torch.testing.assert_close(value, sd[name], rtol=0, atol=0, msg=name)
    random_t = _timm_teacher()
    assert not torch.allclose(t(_images()).cls, random_t(_images()).cls)


def test_missing_checkpoint_names_the_path_and_what_to_do(tmp_path):
    path = tmp_path / "nope" / "dinov2.pth"
    with pytest.raises(KdforgeError, match=rf"{path}.*no such file.*download it first"):
        _timm_teacher(checkpoint=str(path))


def test_mismatched_checkpoint_lists_the_keys(tmp_path):
    wide = _state(embed_dim=48, num_heads=2)
    torch.save(wide, tmp_path / "wide.pth")
    with pytest.raises(ShapeError, match=r"shape differs \(\d+\): .*file \(1, 17, 48\) vs model \(1, 17, 32\)"):
        _timm_teacher(checkpoint=str(tmp_path / "wide.pth"))
    partial = {k: v for k, v in _state().items() if not k.startswith("blocks.1.")}
    partial["extra.weight"] = torch.zeros(3)
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ShapeError, match=r"missing in file \(\d+\): blocks\.1\..*\(\+\d+ more\).*not in model \(1\): extra"):
        _timm_teacher(checkpoint=str(tmp_path / "partial.pth"))


def test_pickled_objects_need_trust_pickle(tmp_path):
    sd = _state()
    torch.save({"model": sd, "args": argparse.Namespace(lr=0.1)}, tmp_path / "ckpt.pth")
    with pytest.raises(KdforgeError, match="trust_pickle = true"):
        _timm_teacher(checkpoint=str(tmp_path / "ckpt.pth"))
    t = _timm_teacher(checkpoint=str(tmp_path / "ckpt.pth"), trust_pickle=True)
    torch.testing.assert_close(t.model.pos_embed, sd["pos_embed"])


# ----------------------------------------------------------------------------------------------- torch.hub
def _hub_teacher(hub_dir, **overrides):
    table = {"plugin": "torch_hub", "repo": str(hub_dir), "model": "dinov2_tiny", "source": "local",
             "pretrained": False, "autocast": "none", **overrides}
    torch.manual_seed(0)
    return create("teachers", table, "teacher")


def test_torch_hub_local_teacher_follows_the_contract(hub_dir):
    t = _hub_teacher(hub_dir, hub_kwargs={"num_register_tokens": 2})
    assert isinstance(t, TorchHubTeacher) and t.embed_dim == 32 and t.patch_size == 4
    x = _images(2, 24)
    out = t(x)
    assert out.grid == (6, 6) == t.grid((24, 24))
    assert out.cls.shape == (2, 32) and out.patches.shape == (2, 36, 32) and out.hidden is None
    with torch.no_grad():
        ref = t.model.forward_features((x - t.mean) / t.std)  # ImageNet mean/std, DINOv2's
    torch.testing.assert_close(out.cls, ref["x_norm_clstoken"])
    torch.testing.assert_close(out.patches, ref["x_norm_patchtokens"])
    t.train()
    assert not t.training and not any(p.requires_grad for p in t.parameters())
    torch.testing.assert_close(t.mean.flatten(), torch.tensor([0.485, 0.456, 0.406]))


@pytest.mark.parametrize("hidden_norm", [True, False])
def test_torch_hub_hidden_layers(hub_dir, hidden_norm):
    t = _hub_teacher(hub_dir, hidden_layers=2, hidden_norm=hidden_norm, hub_kwargs={"num_register_tokens": 1})
    x = _images(2, 16)
    out = t(x)
    assert len(out.hidden) == 2 and all(h.shape == (2, 17, 32) for h in out.hidden)
    with torch.no_grad():
        ref = t.model.get_intermediate_layers((x - t.mean) / t.std, n=2, return_class_token=True, norm=hidden_norm)
        final = t.model.forward_features((x - t.mean) / t.std)
    for h, (p, c) in zip(out.hidden, ref):
        torch.testing.assert_close(h, torch.cat([c[:, None], p], dim=1))
    torch.testing.assert_close(out.cls, final["x_norm_clstoken"])
    torch.testing.assert_close(out.patches, final["x_norm_patchtokens"])


def test_torch_hub_checkpoint_and_errors(hub_dir, tmp_path):
    src = _hub_teacher(hub_dir)
    torch.save({"model": {f"module.{k}": v for k, v in src.model.state_dict().items()}}, tmp_path / "w.pth")
    torch.manual_seed(123)  # a different random init, then the weights from the file
    loaded = create("teachers", {"plugin": "torch_hub", "repo": str(hub_dir), "model": "dinov2_tiny",
                                 "source": "local", "checkpoint": str(tmp_path / "w.pth")}, "teacher")
    x = _images(2, 16)
    torch.testing.assert_close(loaded(x).patches, src(x).patches)
    with pytest.raises(KdforgeError, match=r"dinov2_tiny.*failed: <urlopen error"):
        _hub_teacher(hub_dir, pretrained=True)  # the entry point cannot download: reported with the repo
    with pytest.raises(KdforgeError, match="needs a directory holding hubconf.py"):
        _hub_teacher(tmp_path / "missing")
    with pytest.raises(KdforgeError, match="lacks forward_features, embed_dim, patch_size"):
        _hub_teacher(hub_dir, model="not_dino")


def test_a_third_party_teacher_gets_the_frozen_contract_from_the_base_class():
    class Linear(Teacher):
        name = "test.linear"

        def __init__(self, cfg):
            super().__init__(cfg)
            self.proj = torch.nn.Conv2d(3, 8, 4, 4)
            self.embed_dim, self.patch_size = 8, 4
            self.freeze()

        def encode(self, x):
            p = self.proj(x).flatten(2).transpose(1, 2)
            return TeacherOutput(cls=p.mean(1), patches=p, grid=(x.shape[2] // 4, x.shape[3] // 4))

    t = Linear(Linear.Config(autocast="bf16"))
    t.train()
    out = t(_images(2, 8))
    assert not t.training and out.patches.dtype == torch.float32 and not out.patches.is_inference()
    assert out.grid == (2, 2) == t.grid((8, 8))


def test_torch_hub_keeps_its_own_trust_check_and_never_prompts(hub_dir, tmp_path, monkeypatch):
    """trust_repo off (the default): a GitHub repository torch.hub does not trust is refused with the recipe key
    that would trust it, without a question on stdin; one it trusts (here: already downloaded) loads."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr("builtins.input", lambda *a: pytest.fail("torch.hub asked a question on stdin"))
    table = {"plugin": "torch_hub", "repo": "someone/untrusted:main", "model": "dinov2_tiny", "pretrained": False,
             "autocast": "none"}
    with pytest.raises(KdforgeError, match=r"does not trust the repository 'someone/untrusted:main'.*"
                                           r"set trust_repo = true in \[teacher\]"):
        create("teachers", table, "teacher")
    trusted = tmp_path / "torch" / "hub" / "trusted_list"
    assert "someone" not in (trusted.read_text() if trusted.exists() else "")
    # trust_repo = true skips the check: torch.hub goes on to download the repository (no network here)
    with pytest.raises(KdforgeError) as exc:
        create("teachers", {**table, "trust_repo": True}, "teacher")
    assert "does not trust" not in str(exc.value) and "urlopen error" in str(exc.value)
    # a repository torch.hub already trusts (downloaded before) loads with the default
    import shutil

    shutil.copytree(hub_dir, tmp_path / "torch" / "hub" / "someone_untrusted_main")
    assert create("teachers", table, "teacher").embed_dim == 32


def test_teacher_settings_that_run_outside_code_are_listed(hub_dir, tmp_path):
    from kdforge.recipe.schema import build
    from kdforge.teachers.hub import TorchHubTeacher
    from kdforge.teachers.timm_teacher import TimmTeacher

    hub = build(TorchHubTeacher.Config, {"repo": str(hub_dir), "source": "local"}, "teacher")
    assert hub.runs_code() == [f"source = 'local' runs {hub_dir / 'hubconf.py'}"]
    hub = build(TorchHubTeacher.Config, {"repo": "a/b", "trust_repo": True, "checkpoint": "w.pth",
                                         "trust_pickle": True}, "teacher")
    assert len(hub.runs_code()) == 2
    assert build(TorchHubTeacher.Config, {"repo": "facebookresearch/dinov2"}, "teacher").runs_code() == []
    timm_cfg = build(TimmTeacher.Config, {"checkpoint": "w.pth", "trust_pickle": True}, "teacher")
    assert timm_cfg.runs_code() == ["trust_pickle = true unpickles 'w.pth' (pickles can run code)"]
