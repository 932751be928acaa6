"""Shared fixtures for the teacher, student and masker tests: tiny model configs and a DINOv2-like local hub."""

import pytest

from model_helpers import HUBCONF


@pytest.fixture
def hub_dir(tmp_path):
    """A directory holding the DINOv2-like hubconf.py (torch.hub.load(..., source="local") works offline)."""
    path = tmp_path / "tiny_dinov2"
    path.mkdir()
    (path / "hubconf.py").write_text(HUBCONF)
    return path
