"""A tiny, randomly initialised image-variation pipeline for the image_mixer tests (diffusers' folder layout).

Imported by path (like tests/models/model_helpers.py) from the data tests and the registry-wide smoke tests.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

#: Width of the tiny CLIP embedding (the UNet's cross-attention width).
EMBED_DIM = 16


def require_diffusion():
    """(diffusers, transformers), or skip the test with the reason printed."""
    diffusers = pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'kdforge[diffusion]')")
    transformers = pytest.importorskip("transformers",
                                       reason="transformers is not installed (pip install 'kdforge[diffusion]')")
    return diffusers, transformers


def tiny_pipeline(folder: Path, scheduler: str = "DDIMScheduler") -> Path:
    """Write a tiny image-variation pipeline (CLIP vision encoder with projection and its image processor at 16 px,
    a UNet and a VAE with two levels each: latents at half the image side) to ``folder``, the same weights for the
    same arguments; returns ``folder``. Skips the test where diffusers or transformers is missing."""
    diffusers, transformers = require_diffusion()
    if (folder / "unet").is_dir():
        return folder
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        unet = diffusers.UNet2DConditionModel(
            sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(8, 16),
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            cross_attention_dim=EMBED_DIM, norm_num_groups=4, attention_head_dim=2)
        torch.manual_seed(1)
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), latent_channels=4, norm_num_groups=4,
            layers_per_block=1, sample_size=16)
        torch.manual_seed(2)
        encoder = transformers.CLIPVisionModelWithProjection(transformers.CLIPVisionConfig(
            hidden_size=16, intermediate_size=32, projection_dim=EMBED_DIM, num_hidden_layers=1, num_attention_heads=2,
            image_size=16, patch_size=4))
    processor = transformers.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
    sched = getattr(diffusers, scheduler)(num_train_timesteps=100)
    for name, part in (("unet", unet), ("vae", vae), ("image_encoder", encoder), ("feature_extractor", processor),
                       ("scheduler", sched)):
        part.save_pretrained(folder / name)
    return folder
