"""kdforge.diagnostics.attention: captured attention probabilities, attention distance, head similarity, and
``kdforge diagnose attention`` on a trained run."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from kdforge.diagnostics.attention import (
    analyse,
    attention_distance,
    attention_probs,
    head_similarity,
)
from kdforge.plugins import create

from cli_helpers import TINY, kdforge
VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 3, "num_heads": 2, "reg_tokens": 1}


def _student(**overrides):
    torch.manual_seed(0)
    table = {"plugin": "timm", "model": "vit_tiny_patch16_224", "model_kwargs": dict(VIT), **overrides}
    return create("students", table, "student").eval()


@pytest.mark.parametrize(
    "overrides",
    [{}, {"attention": "kdforge", "rel_pos_bias": "shared"}],
    ids=["timm-attention", "kdforge-attention+shared-rpb"],
)
def test_captured_probabilities_reproduce_each_blocks_output(overrides):
    """softmax rows sum to 1, and probs @ v through the block's projection gives exactly what the block computed."""
    s = _student(**overrides)
    if "rel_pos_bias" in overrides:
        with torch.no_grad():
            s.rel_pos_bias.table.normal_(generator=torch.Generator().manual_seed(1))
    images = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    inputs, outputs = [], []

    def record(module, args, out):
        inputs.append(args[0])
        outputs.append(out)

    hooks = [b.attn.register_forward_hook(record) for b in s.model.blocks]
    probs = attention_probs(s, images)
    for h in hooks:
        h.remove()
    assert len(probs) == 3 and all(p.shape == (3, 2, 18, 18) for p in probs)  # 1 cls + 1 register + 16 patches
    for p, x, out, blk in zip(probs, inputs, outputs, s.model.blocks):
        torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]))
        b, n, c = x.shape
        v = blk.attn.qkv(x).reshape(b, n, 3, 2, c // 2).permute(2, 0, 3, 1, 4)[2]
        mixed = (p @ v).transpose(1, 2).reshape(b, n, c)
        torch.testing.assert_close(blk.attn.proj(blk.attn.norm(mixed)), out, atol=1e-5, rtol=1e-4)


def test_attention_distance_of_known_patterns():
    grid, patch, prefix, n = (3, 4), 8, 1, 13
    centres = torch.tensor([(r * patch, c * patch) for r in range(3) for c in range(4)], dtype=torch.float64)
    dist = torch.cdist(centres, centres)
    probs = torch.zeros(2, 3, n, n)
    probs[:, 0, prefix:, prefix:] = torch.eye(12)  # head 0: each patch attends to itself
    probs[:, 0, :prefix] = 1.0 / n  # (the prefix queries' rows do not count)
    probs[:, 1, :, prefix:] = 0.5 / 12  # head 1: half to the CLS token, half spread evenly over the patches
    probs[:, 1, :, 0] = 0.5
    probs[:, 2, :, 1 + 5] = 1.0  # head 2: every query attends to patch 5 only
    got = attention_distance(probs, grid, patch, prefix)
    expected = torch.tensor([0.0, float(dist.mean()), float(dist[:, 5].mean())], dtype=torch.float64)
    torch.testing.assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)


def test_head_similarity_of_known_patterns():
    logits = torch.randn(2, 1, 5, 5, generator=torch.Generator().manual_seed(0))
    same = torch.softmax(logits, dim=-1).expand(2, 3, 5, 5)
    assert head_similarity(same) == pytest.approx(1.0)
    disjoint = torch.zeros(1, 2, 4, 4)
    disjoint[0, 0, :, 0] = 1.0
    disjoint[0, 1, :, 1] = 1.0
    assert head_similarity(disjoint) == pytest.approx(0.0)
    assert np.isnan(head_similarity(same[:, :1]))


def test_analyse_reports_every_layer_and_head():
    s = _student(attention="kdforge", rel_pos_bias="shared")
    report = analyse(s, torch.rand(4, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    assert len(report.distance) == 3 and all(len(d) == 2 for d in report.distance)
    # Distances lie between 0 and the grid's diagonal; a fresh (zero) bias and random weights give near-uniform
    # attention, hence close to the mean pairwise distance.
    assert all(0 < d < 4 * 4 * 2**0.5 for layer in report.distance for d in layer)
    assert report.mean_maps.shape == (3, 18, 18) and report.grid == (4, 4) and report.num_prefix == 2
    assert json.loads(json.dumps(report.to_json()))["patch_size"] == 4


def test_cli_on_a_trained_run(tmp_path):
    run = tmp_path / "run"
    res = kdforge("train", TINY, "--output-dir", run, "--no-progress", "--set", "train.max_steps=2",
                   "--set", "student.attention='kdforge'", "--set", "student.rel_pos_bias='shared'",
                   "--set", "student.model_kwargs.depth=2")  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    res = kdforge("diagnose", "attention", run, "--images", 6)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "attention.png" in res.stdout
    report = json.loads((run / "attention.json").read_text())
    assert report["num_images"] == 6 and len(report["distance"]) == 2 and len(report["head_similarity"]) == 2
    with Image.open(run / "attention.png") as im:
        assert im.format == "PNG" and im.size[0] > 800
    out = tmp_path / "elsewhere" / "attn.svg"
    res = kdforge("diagnose", "attention", run, "--images", 2, "--checkpoint", run / "last.pt", "--out", out)
    assert res.returncode == 0 and out.is_file() and out.with_suffix(".json").is_file(), res.stderr[-3000:]


def test_cli_errors_name_what_is_missing(tmp_path):
    res = kdforge("diagnose", "attention", tmp_path)
    assert res.returncode == 2 and "holds no recipe.toml" in res.stderr
    (tmp_path / "recipe.toml").write_text(TINY.read_text())
    res = kdforge("diagnose", "attention", tmp_path)
    assert res.returncode == 2 and "no checkpoint at" in res.stderr and "--checkpoint" in res.stderr
    res = kdforge("diagnose", "attention", tmp_path, "--images", 0)
    assert res.returncode == 2 and "--images must be >= 1" in res.stderr
