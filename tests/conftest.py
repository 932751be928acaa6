"""Hermetic tests: no third-party plugin is autoloaded unless a test installs one on purpose.

Without a GPU, Triton kernels run in Triton's CPU interpreter. TRITON_INTERPRET must be set before any
kdforge.kernels module is imported (``@triton.jit`` decides then), so it is set here, before any test module of
any package imports kdforge; on a CUDA machine it is left alone and the compiled kernels are tested.
"""

import os
import zlib

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

os.environ["KDFORGE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.setdefault("KDFORGE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "kdforge"))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_registry():
    from kdforge.plugins import reset_registry

    reset_registry()
    yield
    reset_registry()


@pytest.fixture
def gen(request):
    """A fresh, reproducible generator per test case, seeded from the test id (printed, shown on failure)."""
    seed = zlib.crc32(request.node.nodeid.encode())
    print(f"seed={seed}")
    return torch.Generator().manual_seed(seed)


def _on_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


@pytest.fixture
def require_ext():
    """The built kdforge._C: a test that needs it is skipped with the reason printed where it is not built, except
    on CI (CI=true), where building it is part of the job: there it fails, so a broken build cannot pass as
    "skipped"."""
    from kdforge import _ext

    if not _ext.available():
        reason = f"kdforge._C is not available: {_ext.unavailable_reason()}"
        if _on_ci():
            pytest.fail(f"{reason} (CI=true: the extension must be built before the tests run)", pytrace=False)
        pytest.skip(reason)
    return _ext


def _smoke_run(factory, recipe: str):
    """One smoke-profile training run of a shipped recipe, shared by every test of the session that reads it."""
    from pathlib import Path

    from cli_helpers import kdforge

    repo = Path(__file__).resolve().parents[1]
    out = factory.mktemp(f"smoke-{recipe.removesuffix('.toml')}") / "run"
    res = kdforge("train", repo / "plugins" / recipe, "--profile", "smoke", "--output-dir", out, "--no-progress",
                  timeout=1500)
    assert res.returncode == 0, res.stderr[-3000:]
    (out.parent / "stderr.txt").write_text(res.stderr)  # beside the run: what the command printed
    return out


@pytest.fixture(scope="session")
def task_transfer_smoke_run(tmp_path_factory):
    """Run directory of ``kdforge train plugins/task_transfer.toml --profile smoke`` (three stages, once per
    session); the command's stderr is in ../stderr.txt."""
    return _smoke_run(tmp_path_factory, "task_transfer.toml")


@pytest.fixture(scope="session")
def retrieval_smoke_run(tmp_path_factory):
    """Run directory of ``kdforge retrieve plugins/retrieval.toml --profile smoke`` followed by ``kdforge train
    ... --resume`` in the same directory (the retrieval stage found finished, the other three trained on its
    manifest), once per session; the two commands' stderr is in ../retrieve_stderr.txt and ../stderr.txt."""
    from pathlib import Path

    from cli_helpers import kdforge

    repo = Path(__file__).resolve().parents[1]
    out = tmp_path_factory.mktemp("smoke-retrieval") / "run"
    recipe = str(repo / "plugins" / "retrieval.toml")
    for command, log in (("retrieve", "retrieve_stderr.txt"), ("train", "stderr.txt")):
        extra = ["--resume"] if command == "train" else []
        res = kdforge(command, recipe, "--profile", "smoke", "--output-dir", out, "--no-progress", *extra,
                      timeout=1500)
        assert res.returncode == 0, res.stderr[-3000:]
        (out.parent / log).write_text(res.stderr)
    return out


@pytest.fixture(scope="session")
def good_practices_smoke_run(tmp_path_factory):
    """Run directory of ``kdforge train plugins/good_practices.toml --profile smoke`` (two stages, once per
    session); the command's stderr is in ../stderr.txt."""
    return _smoke_run(tmp_path_factory, "good_practices.toml")


@pytest.fixture(scope="session")
def tiny_two_step_run(tmp_path_factory):
    """Run directory of a two-step run of tests/recipes/tiny.toml (teacher, masker, the three Proteus losses): what
    the tests that read a finished run (fine-tuning's init_from, the landscape diagnostic) start from. Read-only."""
    from cli_helpers import TINY, kdforge

    out = tmp_path_factory.mktemp("tiny-two-step") / "run"
    res = kdforge("train", TINY, "--output-dir", out, "--no-progress", "--set", "train.max_steps=2")
    assert res.returncode == 0, res.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def proteus_smoke_run(tmp_path_factory):
    """Run directory of ``kdforge train plugins/proteus.toml --profile smoke`` (trained once per session)."""
    return _smoke_run(tmp_path_factory, "proteus.toml")


@pytest.fixture(scope="session")
def fd_smoke_run(tmp_path_factory):
    """Run directory of ``kdforge train plugins/fd.toml --profile smoke`` (trained once per session): the smoke
    test, fine-tuning and the landscape diagnostic all read it."""
    return _smoke_run(tmp_path_factory, "fd.toml")
