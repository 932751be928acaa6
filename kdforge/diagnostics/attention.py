"""Attention diagnostics of a ViT student (papers/004, section 4: what feature distillation changes).

- **Attention distance** per layer and head: the mean distance, in pixels, between a patch and the patches it
  attends to, weighted by attention (the attention over patch keys, renormalised to sum to 1; prefix tokens
  excluded). Small values are local heads, large ones global. FD finds that distilled students have more diverse
  distances across heads, especially in deeper layers.
- **Head similarity** per layer: the cosine similarity between two heads' attention distributions of the same
  query, averaged over queries, images and pairs of heads. High values mean redundant heads.
- **Average attention map** per layer: the attention matrix averaged over images and heads (FD's *diagonal*
  pattern: relative-position cues; *column* pattern: a few absolute positions seen by all).

:func:`attention_probs` captures each block's attention probabilities with forward hooks on the timm blocks'
``attn`` modules (timm's ``Attention`` and :class:`kdforge.students.timm_student.KdforgeAttention` alike),
recomputing softmax(q k^T * scale + bias) from the block's own layers, so the model runs unchanged.
:func:`analyse_run` loads a run's student and writes ``attention.json`` and ``attention.png``
(``kdforge diagnose attention RUN_DIR``).
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from kdforge.engine.checkpoint import atomic_path
from kdforge.errors import KdforgeError

ATTENTION_JSON = "attention.json"
ATTENTION_PNG = "attention.png"


def _block_probs(attn: nn.Module, x: Tensor) -> Tensor:
    """softmax(q k^T * scale + bias) of a timm-style attention module for its input x [B, N, C] -> [B, H, N, N]."""
    b, n, _ = x.shape
    heads = attn.num_heads
    qkv = attn.qkv(x).reshape(b, n, 3, heads, -1).permute(2, 0, 3, 1, 4)
    q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])
    scores = (q.float() @ k.float().transpose(-2, -1)) * attn.scale
    bias_fn = getattr(attn, "bias_fn", None)
    if bias_fn is not None:
        scores = scores + bias_fn().float()
    return scores.softmax(dim=-1)


@torch.no_grad()
def attention_probs(student: nn.Module, images: Tensor) -> list[Tensor]:
    """Attention probabilities of every block of a timm-ViT student for ``images`` (Tensor[B, 3, H, W] in [0, 1]):
    one Tensor[B, H, N, N] (float32, on the images' device) per block, N counting the prefix tokens."""
    blocks = getattr(getattr(student, "model", None), "blocks", None)
    if blocks is None or not all(hasattr(b, "attn") and hasattr(b.attn, "qkv") for b in blocks):
        kind = type(student).__name__
        raise KdforgeError(f"attention diagnostics need a timm ViT student (model.blocks[i].attn with qkv), got {kind}")
    probs: list[Tensor] = []
    hooks = [
        blk.attn.register_forward_hook(lambda mod, args, out: probs.append(_block_probs(mod, args[0])))
        for blk in blocks
    ]
    try:
        student(images)
    finally:
        for h in hooks:
            h.remove()
    return probs


def _patch_distances(grid: tuple[int, int], patch_size: int, device: torch.device) -> Tensor:
    """Pixel distance between the centres of every two patches of a gh x gw grid: Tensor[P, P]."""
    rows, cols = torch.meshgrid(torch.arange(grid[0]), torch.arange(grid[1]), indexing="ij")
    centres = torch.stack([rows.reshape(-1), cols.reshape(-1)], dim=1).double() * patch_size
    return torch.cdist(centres, centres).to(device)


def attention_distance(probs: Tensor, grid: tuple[int, int], patch_size: int, num_prefix: int) -> Tensor:
    """Mean attention distance in pixels per head, Tensor[H], for probs [B, H, N, N] (N = num_prefix + gh * gw):
    over patch queries, the distance to each patch key weighted by the attention renormalised over patch keys."""
    p = probs[:, :, num_prefix:, num_prefix:].double()
    p = p / p.sum(dim=-1, keepdim=True).clamp_min(1e-30)
    dist = _patch_distances(grid, patch_size, p.device)
    return (p * dist).sum(dim=-1).mean(dim=(0, 2)).float()


def head_similarity(probs: Tensor) -> float:
    """Mean cosine similarity between the attention rows of two different heads for the same query (averaged over
    queries, images and head pairs) for probs [B, H, N, N]; nan for a single head."""
    heads = probs.shape[1]
    if heads < 2:
        return float("nan")
    unit = torch.nn.functional.normalize(probs.double(), dim=-1)  # [B, H, N, N]
    sim = torch.einsum("bhnk,bgnk->bnhg", unit, unit)  # [B, N, H, H]
    off_diagonal = ~torch.eye(heads, dtype=torch.bool, device=probs.device)
    return float(sim[..., off_diagonal].mean())


@dataclasses.dataclass
class AttentionReport:
    """Per-layer attention statistics of a student on a batch of images."""

    distance: list[list[float]]
    """[layer][head]: mean attention distance in pixels."""
    head_similarity: list[float]
    """[layer]: mean cosine similarity between heads."""
    mean_maps: Tensor
    """Tensor[L, N, N]: the attention matrix averaged over images and heads (prefix tokens first)."""
    grid: tuple[int, int]
    patch_size: int
    num_prefix: int
    image_size: tuple[int, int]
    num_images: int

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "mean_maps"}


def analyse(student: nn.Module, images: Tensor) -> AttentionReport:
    """Attention statistics of a timm-ViT student (a :class:`kdforge.students.timm_student.TimmStudent`)."""
    probs = attention_probs(student, images)
    grid = tuple(int(g) for g in student.grid(tuple(images.shape[-2:])))
    num_prefix = int(student.model.num_prefix_tokens)
    patch = int(student.patch_size)
    return AttentionReport(
        distance=[attention_distance(p, grid, patch, num_prefix).tolist() for p in probs],
        head_similarity=[head_similarity(p) for p in probs],
        mean_maps=torch.stack([p.mean(dim=(0, 1)) for p in probs]).cpu(),
        grid=grid,
        patch_size=patch,
        num_prefix=num_prefix,
        image_size=(int(images.shape[-2]), int(images.shape[-1])),
        num_images=int(images.shape[0]),
    )


def plot_report(report: AttentionReport, out: str | Path, title: str = "") -> Path:
    """attention distance per head against depth, head similarity against depth, and the patch-to-patch part of
    the average attention maps of the first, middle and last layers; written atomically to ``out``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers = len(report.distance)
    shown = sorted({0, layers // 2, layers - 1})
    fig = Figure(figsize=(4.2 * (2 + len(shown)), 4.0), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2 + len(shown))
    for layer, dists in enumerate(report.distance):
        axes[0].scatter([layer] * len(dists), dists, s=14, color="tab:blue")
    axes[0].set(xlabel="layer", ylabel="attention distance (px)", title="attention distance per head")
    for ax in axes[:2]:
        ax.set_xticks(range(layers))
    axes[1].plot(range(layers), report.head_similarity, marker="o")
    axes[1].set(xlabel="layer", ylabel="cosine similarity", title="similarity between heads", ylim=(0, 1.02))
    p = report.num_prefix
    for ax, layer in zip(axes[2:], shown):
        ax.imshow(report.mean_maps[layer, p:, p:].numpy(), cmap="viridis")
        ax.set(title=f"mean attention, layer {layer}", xlabel="key patch", ylabel="query patch")
    if title:
        fig.suptitle(title)
    out = Path(out)
    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format=out.suffix.lstrip(".").lower() or "png")
    return out


def analyse_run(
    run_dir: str | Path, *, checkpoint: str | Path | None = None, num_images: int = 64, out: str | Path | None = None,
    trust: bool = False,
) -> tuple[Path, Path]:
    """Attention diagnostics of a run's student on ``num_images`` evaluation images (the recipe's eval.data, else
    its data, with the evaluation transform): writes attention.json and the plot (default RUN_DIR/attention.png).
    Returns (json path, image path). ``trust``: build the run's recipe even if it runs code from outside kdforge
    (see :func:`kdforge.engine.runs.read_run`)."""
    from kdforge.data import collate
    from kdforge.data.transforms import build_transform
    from kdforge.plugins import get_registry

    from kdforge.engine.runs import load_run_student

    student, recipe = load_run_student(run_dir, checkpoint, builds=("student", "eval.data", "data"), trust=trust)
    table, where = (recipe.eval.data, "eval.data") if recipe.eval.data else (recipe.data, "data")
    source = get_registry().create("data_sources", table, where)
    dataset = source.build("val" if recipe.eval.data else "train", build_transform(recipe.augment, train=False))
    count = min(num_images, len(dataset))
    if count == 0:
        raise KdforgeError(f"the run's {where} holds no images to look at")
    batch = collate([dataset[i] for i in range(count)])
    report = analyse(student, batch["image"])
    out = Path(out) if out else Path(run_dir) / ATTENTION_PNG
    json_path = out.with_name(ATTENTION_JSON) if out.name == ATTENTION_PNG else out.with_suffix(".json")
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report.to_json(), indent=1, allow_nan=True))
    title = f"{recipe.run.name}: {report.num_images} images, {report.image_size[0]}x{report.image_size[1]} px"
    return json_path, plot_report(report, out, title)
