"""Backend choice: available_backends() for `kdforge info`, what "auto" picks, and the refusals' messages."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from kdforge.errors import BackendUnavailable
from kdforge.ops import _dispatch, available_backends

OPS = ("whitened_loss", "masked_gather", "masked_scatter", "attention", "knn")


def _fake_ext(monkeypatch, available: bool, reason: str = "not built in this checkout"):
    fake = types.SimpleNamespace(
        available=lambda: available,
        unavailable_reason=lambda: None if available else reason,
        cuda_available=lambda: False,
        cuda_unavailable_reason=lambda: "compiled without nvcc",
    )
    monkeypatch.setitem(sys.modules, "kdforge._ext", fake)


def test_available_backends_table(monkeypatch):
    _fake_ext(monkeypatch, available=False)
    table = available_backends()
    assert set(table) == set(OPS)
    for op, row in table.items():
        assert row["reference"] is None
        assert {"reference", "triton", "ext"} <= set(row)
        for backend, reason in row.items():
            assert reason is None or (isinstance(reason, str) and reason), (op, backend)
    assert set(table["attention"]) == {"reference", "triton", "ext", "sdpa", "xformers"}
    assert "no compiled attention" in table["attention"]["ext"]
    assert table["knn"]["ext"].startswith("kdforge._C is not built: not built in this checkout.")
    if not torch.cuda.is_available():
        # The op tests run the interpreter, so Triton counts as runnable on this CPU.
        assert table["knn"]["triton"] is None


def test_available_backends_reports_a_working_extension(monkeypatch):
    _fake_ext(monkeypatch, available=True)
    table = available_backends()
    expected = None if not torch.cuda.is_available() else "kdforge._C is not built: kdforge._C has no CUDA kernels"
    for op in ("whitened_loss", "masked_gather", "masked_scatter", "knn"):
        got = table[op]["ext"]
        assert got is None if expected is None else got.startswith(expected)


def test_auto_on_cpu(monkeypatch):
    cpu = torch.device("cpu")
    _fake_ext(monkeypatch, available=True)
    assert [_dispatch.resolve(op, "auto", cpu) for op in OPS] == ["ext", "ext", "ext", "sdpa", "ext"]
    _fake_ext(monkeypatch, available=False)
    assert [_dispatch.resolve(op, "auto", cpu) for op in OPS] == ["reference"] * 3 + ["sdpa", "reference"]


def test_auto_on_cuda_prefers_triton_then_a_cuda_extension(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setitem(_dispatch._TRITON_IMPORT, "error", None)
    assert all(_dispatch.resolve(op, "auto", cuda) == "triton" for op in OPS)
    # Without Triton: the extension only if it has CUDA kernels (this fake has none), else the reference / SDPA.
    monkeypatch.setitem(_dispatch._TRITON_IMPORT, "error", "triton cannot be imported (test)")
    _fake_ext(monkeypatch, available=True)
    assert _dispatch.resolve("knn", "auto", cuda) == "reference"
    assert _dispatch.resolve("attention", "auto", cuda) == "sdpa"


def test_explicit_refusals_name_the_cause(monkeypatch):
    _fake_ext(monkeypatch, available=False, reason="the build failed")
    with pytest.raises(BackendUnavailable, match=r"kdforge\._C is not built: the build failed\. Build it with `pip"):
        _dispatch.resolve("knn", "ext", torch.device("cpu"))
    _fake_ext(monkeypatch, available=True)
    with pytest.raises(BackendUnavailable, match="no CUDA kernels"):
        _dispatch.resolve("knn", "ext", torch.device("cuda"))
    monkeypatch.setitem(_dispatch._TRITON_IMPORT, "error", "triton cannot be imported (ImportError: boom)")
    with pytest.raises(BackendUnavailable, match=r"backend='triton' cannot run here: triton cannot be imported"):
        _dispatch.resolve("whitened_loss", "triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="backend must be one of"):
        _dispatch.resolve("knn", "sdpa", torch.device("cpu"))


def test_ext_module_that_cannot_import(monkeypatch):
    monkeypatch.setitem(sys.modules, "kdforge._ext", None)  # makes `import kdforge._ext` raise ImportError
    reason = _dispatch.ext_reason()
    assert reason is not None and "kdforge._ext could not be imported" in reason
