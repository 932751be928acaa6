"""Recipes: typed mapping, unknown keys with the closest name, --set, profiles, env expansion, CLI exit codes."""

import pytest

from kdforge.errors import KdforgeError, RecipeError
from kdforge.recipe import load_recipe, parse_override
from kdforge.recipe.schema import field_docs
from kdforge.recipe.config import Recipe, TrainConfig

from cli_helpers import REPO, TINY, kdforge



def test_tiny_recipe_maps_onto_types():
    r = load_recipe(TINY)
    assert isinstance(r, Recipe)
    assert r.train.batch_size == 8 and r.optim.lr == 1e-3 and r.augment.scale == (0.5, 1.0)
    assert r.losses["patch"]["plugin"] == "proteus.patch"


@pytest.mark.parametrize("override, message", [
    ("train.epoch=3", "unknown key 'epoch' in [recipe.train]: did you mean 'epochs'?"),
    ("optimm.lr=1", "unknown table 'optimm' in [recipe]: did you mean 'optim'?"),
    ("losses.token.wieght=2", "unknown key 'wieght' in [losses.token]: did you mean 'weight'?"),
    ("student.drop_path=0.1", "did you mean 'drop_path_rate'?"),
    ("train.batch_size='big'", "recipe.train.batch_size must be an integer, got str 'big'"),
    ("train.precision='fp8'", "choose one of 'fp32', 'bf16', 'fp16'"),
    ("losses.token.plugin='proteus.tokn'", "did you mean 'proteus.token'?"),
])
def test_bad_values_name_the_key_and_closest(override, message):
    with pytest.raises(KdforgeError) as exc:
        load_recipe(TINY, overrides=[override])
    assert message in str(exc.value)


def test_unknown_key_in_component_table_names_closest():
    # `weight` is read by the engine, not by the loss plugin's Config: the suggestion must cover it all the same
    with pytest.raises(RecipeError) as exc:
        load_recipe(TINY, overrides=["losses.token.wieght=2"])
    assert str(exc.value) == "unknown key 'wieght' in [losses.token]: did you mean 'weight'?"
    with pytest.raises(RecipeError) as exc:
        load_recipe(TINY, overrides=["losses.token.backnd='auto'"])
    assert str(exc.value) == "unknown key 'backnd' in [losses.token]: did you mean 'backend'?"


def test_set_and_profile_and_env(tmp_path, monkeypatch):
    text = TINY.read_text() + '\n[profiles.fast.train]\nepochs = 1\n[profiles.fast.data]\nnum_train = 32\n'
    text = text.replace('name = "tiny"', 'name = "tiny"\noutput_dir = "${KD_TEST_OUT:-fallback}/x"')
    p = tmp_path / "r.toml"
    p.write_text(text)
    r = load_recipe(p, profile="fast", overrides=["train.batch_size=4"])
    assert r.train.epochs == 1 and r.data["num_train"] == 32 and r.train.batch_size == 4
    assert r.run.output_dir == "fallback/x"
    monkeypatch.setenv("KD_TEST_OUT", "/somewhere")
    assert load_recipe(p).run.output_dir == "/somewhere/x"
    with pytest.raises(RecipeError, match="unknown profile 'fats'.*did you mean 'fast'"):
        load_recipe(p, profile="fats")
    p.write_text(text.replace("${KD_TEST_OUT:-fallback}", "${KD_SURELY_UNSET}"))
    with pytest.raises(RecipeError, match="KD_SURELY_UNSET is not set"):
        load_recipe(p)


def test_parse_override_types():
    assert parse_override("a.b=3") == (["a", "b"], 3)
    assert parse_override("a=0.5") == (["a"], 0.5)
    assert parse_override("a=true") == (["a"], True)
    assert parse_override("a=/data/x") == (["a"], "/data/x")
    assert parse_override("a=[1, 2]") == (["a"], [1, 2])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_override("novalue")


def test_every_config_field_is_documented():
    for cls in (TrainConfig,):
        import dataclasses

        docs = field_docs(cls)
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in docs]
        assert not missing, f"{cls.__name__} fields without a docstring line: {missing}"


def test_cli_unknown_table_exits_2_with_one_message(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text(TINY.read_text() + "\n[trian]\nepochs = 1\n")
    res = kdforge("train", p, "--output-dir", tmp_path / "out")
    assert res.returncode == 2
    assert "unknown table 'trian' in [recipe]: did you mean 'train'?" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_cli_dry_run_prints_resolved_recipe(tmp_path):
    res = kdforge("train", TINY, "--dry-run", "--set", "train.epochs=7")
    assert res.returncode == 0, res.stderr
    import tomllib

    resolved = tomllib.loads(res.stdout)
    assert resolved["train"]["epochs"] == 7 and resolved["student"]["plugin"] == "timm"


@pytest.mark.parametrize("name", ["proteus.toml", "fd.toml"])
def test_shipped_recipe_dry_run_and_missing_imagenet(tmp_path, name):
    recipe = REPO / "plugins" / name
    env = {k: v for k, v in __import__("os").environ.items() if k != "IMAGENET_DIR"}
    res = kdforge("train", recipe, "--dry-run", env=env)
    assert res.returncode == 0, res.stderr
    out = tmp_path / "out"
    res = kdforge("train", recipe, "--output-dir", out, "--set", f"data.root={tmp_path / 'imagenet'}", env=env)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert str(tmp_path / "imagenet") in lines[0] and "data.root" in lines[0]
    assert not out.exists()


# What the released code of each method does (issue 10, items 5 and 6): `--dry-run` shows every value and these
# tests pin them, so a recipe edit that drifts from the released method fails here.
RELEASED = {
    "proteus.toml": {
        ("augment", "auto_augment"): "rand-m9-mstd0.5-inc1",
        ("augment", "re_prob"): 0.25,
        ("augment", "re_mode"): "pixel",
        ("augment", "re_count"): 1,
        ("augment", "interpolation"): "bicubic",
        ("augment", "color_jitter"): 0.0,
        ("train", "repeated_aug"): 3,
        ("student", "model_kwargs", "init_values"): 1.0,
        ("student", "drop_path_rate"): 0.0,
        ("masker", "plugin"): "random",
        ("masker", "exact_count"): True,
        ("masker", "mask_probability"): 0.5,
        ("masker", "mask_ratio"): 0.5,
        ("losses", "feature", "cls"): "token_head",
        ("optim", "decay_also"): ["*"],
        ("optim", "lr"): 5e-4,
        ("optim", "min_lr"): 1e-5,
        ("optim", "warmup_epochs"): 5,
        ("optim", "weight_decay"): 0.05,
    },
    "fd.toml": {
        ("teacher", "model"): "vit_base_patch16_clip_quickgelu_224.openai",
        ("student", "model_kwargs", "init_values"): 0.1,
        ("student", "model_kwargs", "fix_init"): True,
        ("student", "model_kwargs", "qkv_bias"): True,
        ("student", "model_kwargs", "pos_embed"): "none",
        ("student", "rel_pos_bias"): "shared",
        ("student", "drop_path_rate"): 0.2,
        ("student", "mean"): [0.485, 0.456, 0.406],
        ("student", "std"): [0.229, 0.224, 0.225],
        ("losses", "feature", "include_cls"): True,
        ("losses", "feature", "beta"): 2.0,
        ("optim", "min_lr"): 2e-5,
        ("optim", "lr"): 3e-4,
        ("optim", "clip_grad"): 3.0,
        ("optim", "warmup_epochs"): 10,
        ("optim", "decay_also"): ["student.rel_pos_bias.*"],
        ("train", "epochs"): 300,
    },
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_shipped_recipes_pin_the_released_settings(name):
    import tomllib

    res = kdforge("train", REPO / "plugins" / name, "--dry-run")
    assert res.returncode == 0, res.stderr
    resolved = tomllib.loads(res.stdout)
    for path, want in RELEASED[name].items():
        value = resolved
        for key in path:
            value = value[key]
        assert value == want, (".".join(path), value, want)
