"""The plugin core: built-ins, entry-point autoload, broken plugins, name clashes, `kdforge plugins`."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cli_helpers import kdforge as kdforge_cli

import kdforge
from kdforge import hookspecs
from kdforge.errors import PluginError
from kdforge.plugins import DEFAULT_PLUGINS, build_plugin_manager

REPO = Path(__file__).resolve().parents[1]


def _fake_distribution(site: Path, dist: str, module: str, source: str) -> None:
    """A minimal installed distribution (dist-info with an entry point), as pip would leave it."""
    (site / f"{module}.py").write_text(textwrap.dedent(source))
    info = site / f"{dist.replace('-', '_')}-9.9.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 9.9\n")
    (info / "entry_points.txt").write_text(f"[kdforge]\n{module} = {module}\n")


def _fake_loss_plugin(site: Path, dist: str, module: str, loss_name: str) -> None:
    """A distribution whose plugin registers one loss, named ``loss_name``, that is always zero."""
    _fake_distribution(site, dist, module, f"""
        import dataclasses, kdforge
        from kdforge.losses import DistillLoss

        class Zero(DistillLoss):
            name = {loss_name!r}

            @dataclasses.dataclass
            class Config:
                pass

            def forward(self, s, t, batch):
                return s.cls.sum() * 0, {{}}

        @kdforge.hookimpl
        def kdforge_register_losses():
            return [Zero]
    """)


@pytest.fixture
def site(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_builtins_registered_like_third_party():
    reg = build_plugin_manager(autoload=False)
    for mod in DEFAULT_PLUGINS:
        assert reg.pm.get_plugin(mod) is not None
    losses = reg.names("losses")
    assert {"proteus.token", "proteus.feature", "proteus.patch", "fd.feature"} <= set(losses)
    for kind in hookspecs.KINDS:
        assert reg.names(kind), f"no built-in {kind}"
    origin = next(c.origin for c in reg.components("losses") if c.name == "proteus.token")
    assert origin == "builtin (kdforge.losses.builtin)"


def test_every_hookspec_has_docstring_and_kind():
    specs = [n for n in dir(hookspecs) if n.startswith("kdforge_")]
    assert sorted(specs) == sorted(f"kdforge_register_{k}" for k in hookspecs.KINDS)
    for name in specs:
        doc = getattr(hookspecs, name).__doc__ or ""
        assert "Called" in doc and "Return" in doc, name


def test_entry_point_plugin_is_autoloaded(site):
    _fake_loss_plugin(site, "kd-extra", "kd_extra_plugin", "extra.zero")
    reg = build_plugin_manager(autoload=True)
    comp = next(c for c in reg.components("losses") if c.name == "extra.zero")
    assert comp.origin == "kd-extra 9.9 (kd_extra_plugin)"
    assert "extra.zero" not in build_plugin_manager(autoload=False).names("losses")


def test_autoload_disabled_by_env(site, monkeypatch):
    _fake_distribution(site, "kd-extra2", "kd_extra2_plugin", "raise RuntimeError('must not be imported')\n")
    monkeypatch.setenv("KDFORGE_DISABLE_PLUGIN_AUTOLOAD", "1")
    reg = build_plugin_manager()
    assert reg.failed == []
    monkeypatch.setenv("KDFORGE_DISABLE_PLUGIN_AUTOLOAD", "0")
    assert [f.name for f in build_plugin_manager().failed] == ["kd_extra2_plugin"]


def test_broken_plugin_is_reported_and_rest_works(site):
    _fake_distribution(site, "kd-broken", "kd_broken_plugin", "import not_a_module_anywhere\n")
    reg = build_plugin_manager(autoload=True)
    assert len(reg.failed) == 1
    failed = reg.failed[0]
    assert failed.name == "kd_broken_plugin" and failed.distribution == "kd-broken 9.9"
    assert "not_a_module_anywhere" in failed.error
    assert "proteus.token" in reg.names("losses")
    # A lookup that misses mentions the failed plugin, since the component may have lived there.
    with pytest.raises(PluginError, match="kd_broken_plugin"):
        reg.get("losses", "broken.loss")


def test_duplicate_names_name_both_origins(site):
    _fake_loss_plugin(site, "kd-dup", "kd_dup_plugin", "proteus.token")
    with pytest.raises(PluginError) as exc:
        build_plugin_manager(autoload=True)
    msg = str(exc.value)
    assert "'proteus.token'" in msg and "builtin (kdforge.losses.builtin)" in msg and "kd-dup 9.9" in msg


def test_misspelled_hook_fails_loudly(site):
    class Bad:
        @kdforge.hookimpl
        def kdforge_register_lossess(self):
            return []

    with pytest.raises(Exception, match="kdforge_register_lossess"):
        build_plugin_manager(autoload=False, extra_plugins=(Bad(),))


def test_unknown_component_suggests_closest():
    reg = build_plugin_manager(autoload=False)
    with pytest.raises(PluginError, match="did you mean 'proteus.token'"):
        reg.get("losses", "proteus.tokn", "losses.token")


def test_cli_lists_builtins():
    out = kdforge_cli("plugins")
    assert out.returncode == 0, out.stderr[-2000:]
    for name in ("proteus.token", "proteus.feature", "proteus.patch"):
        assert name in out.stdout
    line = next(l for l in out.stdout.splitlines() if "proteus.patch" in l)
    assert line.split()[0] == "losses" and "builtin" in line


@pytest.mark.slow
def test_installed_example_package_is_used_from_a_recipe(tmp_path):
    """pip-installs tests/example_plugin, then finds it through the entry point and trains with its loss."""
    target = tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target),
         str(REPO / "tests" / "example_plugin")], check=True,
    )
    env = {**__import__("os").environ, "PYTHONPATH": str(target), "KDFORGE_DISABLE_PLUGIN_AUTOLOAD": "0"}
    out = subprocess.run([sys.executable, "-m", "kdforge.cli", "plugins"], capture_output=True, text=True,
                         env=env, check=True)
    line = next(l for l in out.stdout.splitlines() if "example.cosine" in l)
    assert "kdforge-example-plugin 0.1.0 (kdforge_example_plugin)" in line
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "kdforge.cli", "train", str(REPO / "tests" / "recipes" / "tiny.toml"),
           "--output-dir", str(run_dir), "--no-progress",
           "--set", "losses.cos={plugin = \"example.cosine\", margin = 0.0}", "--set", "train.max_steps=2"]
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert res.returncode == 0, res.stderr
    import json

    summary = json.loads((run_dir / "summary.json").read_text())
    assert "loss/cos" in summary["final_metrics"]


def test_cli_info_reports_every_op_backend():
    out = kdforge_cli("info")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "compiled extension kdforge._C:" in out.stdout
    for op in ("whitened_loss", "masked_gather", "masked_scatter", "attention", "knn"):
        assert any(line.split()[:1] == [op] for line in out.stdout.splitlines()), op
    assert "reference  ok" in out.stdout
