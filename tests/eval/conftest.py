"""Fixtures for the evaluator tests."""

import os

os.environ.setdefault("KDFORGE_DISABLE_PLUGIN_AUTOLOAD", "1")

import pytest  # noqa: E402


@pytest.fixture
def single_thread():
    """One intra-op thread (restored afterwards): these tests run small, latency-bound kernels, where a thread
    pool only adds overhead, and most of all when other processes share the cores."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def registry():
    """A registry holding only the built-in evaluators (registered through their hook, as the engine does)."""
    import pluggy

    from kdforge import hookspecs
    from kdforge.eval import builtin
    from kdforge.plugins import Registry

    pm = pluggy.PluginManager("kdforge")
    pm.add_hookspecs(hookspecs)
    pm.register(builtin, name="kdforge.eval.builtin")
    return Registry(pm, {}, [])
