"""Constants shared by the tests in tests/models (imported as a plain module: tests/ is not a package)."""

import textwrap

#: A ViT small enough for a CPU test: 16 px images, 4 px patches (a 4x4 grid), width 32, two blocks.
TINY_VIT = {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}
TINY_MODEL = "vit_tiny_patch16_224"

# A stand-in for facebookresearch/dinov2's hubconf.py: a small ViT exposing DINOv2's interface
# (forward_features -> x_norm_* dict, get_intermediate_layers, embed_dim, patch_size, registers, pos-embed
# interpolation for other image sizes).
HUBCONF = textwrap.dedent(
    '''
    dependencies = ["torch"]

    import torch
    import torch.nn.functional as F
    from torch import nn


    class TinyDino(nn.Module):
        def __init__(self, embed_dim=32, depth=3, patch_size=4, num_register_tokens=0, base_grid=4):
            super().__init__()
            self.embed_dim, self.patch_size, self.num_register_tokens = embed_dim, patch_size, num_register_tokens
            self.base_grid = base_grid
            self.patch_embed = nn.Conv2d(3, embed_dim, patch_size, patch_size)
            self.cls_token = nn.Parameter(0.02 * torch.randn(1, 1, embed_dim))
            self.register_tokens = (
                nn.Parameter(0.02 * torch.randn(1, num_register_tokens, embed_dim)) if num_register_tokens else None
            )
            self.pos_embed = nn.Parameter(0.02 * torch.randn(1, 1 + base_grid * base_grid, embed_dim))
            self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
            self.blocks = nn.ModuleList(
                nn.TransformerEncoderLayer(embed_dim, 2, 2 * embed_dim, dropout=0.0, batch_first=True, norm_first=True)
                for _ in range(depth)
            )
            self.norm = nn.LayerNorm(embed_dim)
            self.head = nn.Identity()

        def _tokens(self, x):
            b, _, h, w = x.shape
            gh, gw = h // self.patch_size, w // self.patch_size
            x = self.patch_embed(x).flatten(2).transpose(1, 2)
            d, g = self.embed_dim, self.base_grid
            pos = self.pos_embed[:, 1:].reshape(1, g, g, d).permute(0, 3, 1, 2)
            pos = F.interpolate(pos, size=(gh, gw), mode="bicubic", align_corners=False).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls_token.expand(b, -1, -1) + self.pos_embed[:, :1], x + pos], dim=1)
            if self.register_tokens is not None:
                x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
            return x

        def forward_features(self, x, masks=None):
            x = self._tokens(x)
            for blk in self.blocks:
                x = blk(x)
            xn = self.norm(x)
            r = self.num_register_tokens
            return {
                "x_norm_clstoken": xn[:, 0],
                "x_norm_regtokens": xn[:, 1 : 1 + r],
                "x_norm_patchtokens": xn[:, 1 + r :],
                "x_prenorm": x,
                "masks": masks,
            }

        def get_intermediate_layers(self, x, n=1, reshape=False, return_class_token=False, norm=True):
            x = self._tokens(x)
            outputs = []
            for i, blk in enumerate(self.blocks):
                x = blk(x)
                if i >= len(self.blocks) - n:
                    outputs.append(x)
            if norm:
                outputs = [self.norm(o) for o in outputs]
            cls = [o[:, 0] for o in outputs]
            patches = [o[:, 1 + self.num_register_tokens :] for o in outputs]
            if return_class_token:
                return tuple(zip(patches, cls))
            return tuple(patches)

        def forward(self, x):
            return self.forward_features(x)["x_norm_clstoken"]


    def dinov2_tiny(pretrained=True, **kwargs):
        model = TinyDino(**kwargs)
        if pretrained:
            # what the real entry point does without network: fail to download the weights
            raise OSError("<urlopen error [Errno -2] Name or service not known>")
        return model


    def not_dino(pretrained=True):
        return nn.Linear(3, 3)
    '''
)


#: The tiny random timm ViT that the encoder student adapts in tests: 32 px images, 8 px patches (a 4x4 grid).
TINY_ENCODER_TEACHER = {
    "plugin": "timm", "model": TINY_MODEL,
    "model_kwargs": {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2},
}


def write_adaptation_run(run_dir, student_table: dict, num_classes: int = 4, seed: int = 0):
    """A finished adaptation run in ``run_dir`` as the engine writes one (recipe.toml, and last.pt in the format of
    Trainer.state_dict: the student's weights under ``student.``), its student's weights moved away from a fresh
    build's so that loading them shows. Returns that student, in eval mode."""
    import warnings

    import tomli_w
    import torch

    from kdforge.engine import checkpoint as ckpt
    from kdforge.plugins import create
    from kdforge.recipe import load_recipe, to_dict

    raw = {
        "run": {"name": "adapt", "device": "cpu"},
        "data": {"plugin": "procedural", "num_classes": num_classes, "num_train": 8, "num_val": 4, "image_size": 32},
        "student": student_table,
        "losses": {"ce": {"plugin": "supervised.ce"}},
    }
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.toml").write_text(tomli_w.dumps(raw))
    recipe = load_recipe(run_dir / "recipe.toml")
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random timm weights on purpose
        student = create("students", student_table, "student")
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = {
        "format": ckpt.FORMAT, "format_version": ckpt.FORMAT_VERSION,
        "model": {f"student.{k}": v for k, v in student.state_dict().items()},
        "optimizer": {"state": {}, "param_groups": []}, "scaler": {},
        "step": 1, "epoch": 0, "batch_in_epoch": 1, "world_size": 1,
        "rng": ckpt.rng_state(), "results": {}, "skips": {}, "recipe": to_dict(recipe),
    }
    ckpt.atomic_save(state, run_dir / "last.pt")
    return student.eval()


#: A tiny open_clip CLIP for 16 px images (4 px patches, a 4x4 grid, joint width 32) in open_clip's config format.
TINY_OPEN_CLIP = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 16, "patch_size": 4, "width": 32, "head_width": 16, "layers": 1},
    "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def write_open_clip_dir(path) -> str:
    """A directory open_clip builds TINY_OPEN_CLIP from (random weights, as no weight file is there); returns the
    open_clip teacher's ``model`` for it, "local-dir:<path>"."""
    import json
    from pathlib import Path

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP}))
    return f"local-dir:{path}"
