"""Hermetic tests: no third-party plugin is autoloaded unless a test installs one on purpose."""

import os

os.environ["KDFORGE_DISABLE_PLUGIN_AUTOLOAD"] = "1"
os.environ.setdefault("KDFORGE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".cache", "kdforge"))

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_registry():
    from kdforge.plugins import reset_registry

    reset_registry()
    yield
    reset_registry()
