"""``kdforge export``: a run's student as files other tools load without kdforge.

Only the student's inference weights leave the run: no projection heads of the losses, no optimizer state, and no
mask token unless asked for (``keep_mask_token``: then ``mask_token.safetensors``, which continued masked-image
training reads back through ``[student] init_from``). Formats (several at once):

- ``timm``: ``model.safetensors`` + ``config.json``, written by timm's own ``save_config_for_hf`` (what
  ``push_to_hf_hub`` writes: architecture, num_classes, num_features, global_pool, pretrained_cfg with input_size,
  mean, std, interpolation, crop_pct, and model_args with the constructor's non-default keywords), so that
  ``timm.create_model("local-dir:OUT", pretrained=True)``, or ``timm.create_model(architecture, pretrained=True,
  pretrained_cfg_overlay=dict(file="OUT/model.safetensors"), **model_args)``, or the Hugging Face hub after
  ``huggingface_hub.upload_folder``, build it with timm alone.
- ``onnx``: ``model.onnx`` (opset :data:`ONNX_OPSET`, dynamic batch), run by onnxruntime.
- ``torchscript``: ``model.torchscript.pt`` (``torch.jit.trace``; torch deprecates TorchScript, prefer pt2).
- ``pt2``: ``model.pt2``, a ``torch.export`` program (``torch.export.load(path).module()``).

Every exported model takes images normalised with the student's mean and std (config.json's pretrained_cfg, the
model card), Tensor[B, 3, H, W], and gives ``output`` (timm's ``model(x)``: the classifier's logits, or the pooled
embedding, the CLS token after the final norm, when the student has no classifier) and ``features`` (timm's
``model.forward_features(x)``: every token after the final norm, Tensor[B, prefix + N, D], or a CNN's feature
map). The ONNX, TorchScript and pt2 files return the two as a pair (ONNX output names "output" and "features").

kdforge-only parts of the timm student. attention = "kdforge" computes timm's attention with kdforge's kernels
from the same weights: the export is timm's own module. A relative position bias (FD's shared one, papers/004, or
one per block) has no place in timm's VisionTransformer, but timm's BEiT holds both (``use_shared_rel_pos_bias``,
``use_rel_pos_bias``) with the same table layout (BEiT's (2 gh - 1)(2 gw - 1) offsets + 3 class-token entries,
indexed alike), so such a student is written as a timm ``beit`` model: the per-head tables move over as they are,
LayerScale gammas become BEiT's gamma_1 / gamma_2, and the q/k/v bias loses its key part, which adds the same
score to every key of a query and so cannot change the softmax. BEiT cannot hold register tokens, a missing class
token, q/k normalisation, pre-norm, other activations or norms: such a student (and stem = "conv", kdforge's own
patch embedding) is refused for ``timm`` with the reason, and exported in the other formats from kdforge's module
(their files need no kdforge either).

Every file is checked right after it is written: the written model (timm from the folder, onnxruntime, the loaded
TorchScript / pt2 program) runs on seeded sample images and is compared with the kdforge student; the export fails
(:class:`~kdforge.errors.ExportError`, exit 2) when, for either output, max |exported - student| exceeds
:data:`TOLERANCES` x max |student|. Everything is written into a temporary folder beside ``out`` that is renamed to
``out`` at the end, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from torch import Tensor, nn

from kdforge.errors import CheckpointError, ExportError

__all__ = [
    "FORMATS", "TOLERANCES", "ONNX_OPSET", "ExportReport", "ExportedModel", "TimmForm", "check_checkpoint_recipe",
    "count_flops", "cpu_latency_ms", "export_folder_of", "export_run", "export_student", "is_export_folder",
    "load_export_into_student", "read_export_config", "timm_form",
]

#: What ``--format`` accepts.
FORMATS = ("timm", "onnx", "torchscript", "pt2")
#: Largest accepted max |exported - student| / max |student| (per output, over the sample images) per format, fp32.
TOLERANCES = {"timm": 1e-5, "onnx": 1e-4, "torchscript": 1e-5, "pt2": 1e-5}
#: torch's default opset for its (dynamo) ONNX exporter; onnxruntime runs it from version 1.17.
ONNX_OPSET = 20
#: Files each format writes.
FILES = {"timm": ("model.safetensors", "config.json"), "onnx": ("model.onnx",),
         "torchscript": ("model.torchscript.pt",), "pt2": ("model.pt2",)}
#: The timm architecture that holds a student with a relative position bias (its model_args set the sizes).
BEIT_ARCHITECTURE = "beit_base_patch16_224"
MASK_TOKEN_FILE = "mask_token.safetensors"
_SAMPLE_BATCHES = (3, 1)  # verification batch sizes; the traced example has 2 images, so 1 and 3 test a dynamic batch


# ------------------------------------------------------------------------------------------------- timm form
@dataclasses.dataclass
class TimmForm:
    """The student as a plain timm model: ``timm.create_model(architecture, **model_args)`` filled with
    ``state_dict`` computes the student's forward."""

    architecture: str
    """timm model name (registered in timm; config.json's ``architecture``)."""
    model_args: dict[str, Any]
    """Keyword arguments for timm.create_model (config.json's ``model_args`` also records the ones timm adds)."""
    state_dict: dict[str, Tensor]
    """The weights, in the architecture's own layout."""
    layout: str
    """"timm": the student's own timm model; "beit": a ViT with a relative position bias held by timm's BEiT."""

    def build(self) -> nn.Module:
        """The timm model with the weights, in eval mode (fails with the unmatched keys if they do not fit)."""
        import timm

        model = timm.create_model(self.architecture, pretrained=False, **self.model_args)
        missing, unexpected = model.load_state_dict(self.state_dict, strict=False)
        if missing or unexpected:
            raise ExportError(
                f"timm's {self.architecture} built with {self.model_args} does not take the converted weights "
                f"(missing {missing[:4]}, unexpected {unexpected[:4]}); this is a bug in kdforge's conversion: "
                "export --format onnx / pt2 instead, and report it"
            )
        return model.eval()


def _student_config(student: nn.Module):
    from kdforge.students.timm_student import TimmStudent

    if not isinstance(student, TimmStudent):
        name = getattr(student, "name", type(student).__name__)
        raise ExportError(
            f"kdforge export writes the \"timm\" student (the students distillation trains); this run's student is "
            f"'{name}'. An \"encoder\" student (a teacher adapted to a task) is read back from its run directory by "
            "the \"adapted\" teacher; export the distilled student instead"
        )
    return student.cfg


def timm_form(student: nn.Module) -> TimmForm:
    """The timm model that computes ``student``'s forward (a "timm" kdforge student), or :class:`ExportError`
    saying why timm cannot hold it and what to do."""
    cfg = _student_config(student)
    if getattr(cfg, "stem", "patch") == "conv":
        raise ExportError(
            "stem = \"conv\" is kdforge's own patch embedding (a small CNN in place of timm's patchify convolution), "
            "which timm cannot build from a config.json: export --format onnx, pt2 or torchscript (they need no "
            "kdforge), or train with stem = \"patch\" for a timm export"
        )
    prefix = "model."
    weights = {k[len(prefix):]: v.detach().clone() for k, v in student.state_dict().items() if k.startswith(prefix)}
    model_args = {"num_classes": int(cfg.num_classes), **cfg.model_kwargs}
    if cfg.rel_pos_bias == "none":
        return TimmForm(cfg.model, model_args, weights, "timm")
    return _beit_form(student, weights)


def _beit_form(student: nn.Module, weights: dict[str, Tensor]) -> TimmForm:
    """A ViT student with a relative position bias as timm's BEiT (see the module docstring)."""
    from timm.layers import LayerScale, Mlp, PatchEmbed
    from timm.models.vision_transformer import Block, VisionTransformer

    from kdforge.students.timm_student import KdforgeAttention

    m, cfg = student.model, student.cfg
    why: list[str] = []
    if type(m) is not VisionTransformer:
        why.append(f"the model is timm's {type(m).__name__}, not VisionTransformer")
    else:
        if m.cls_token is None or m.num_prefix_tokens != 1:
            why.append(f"it has {m.num_prefix_tokens} prefix tokens (class token: {m.cls_token is not None}); "
                       "BEiT has exactly one class token and no registers (reg_tokens = 0, class_token = true)")
        if m.pos_embed is not None and getattr(m, "no_embed_class", False):
            why.append("no_embed_class = true (BEiT's position embedding covers the class token)")
        if getattr(m, "dynamic_img_size", False):
            why.append("dynamic_img_size = true (BEiT's bias is built for one grid)")
        if m.global_pool not in ("token", "avg") or getattr(m, "attn_pool", None) is not None:
            why.append(f"global_pool = '{m.global_pool}' (BEiT pools 'token' or 'avg')")
        if not isinstance(m.norm_pre, nn.Identity):
            why.append("pre_norm = true (BEiT has no norm before the blocks)")
        if type(m.patch_embed) is not PatchEmbed or not isinstance(m.patch_embed.norm, nn.Identity) \
                or m.patch_embed.proj.bias is None:
            why.append("its patch embedding is not timm's plain PatchEmbed with a biased projection")
    norms = [mod for mod in m.modules() if isinstance(mod, nn.LayerNorm)]
    if any(n.eps != 1e-6 or not n.elementwise_affine or n.bias is None for n in norms) or not all(
            type(mod).__name__ in ("LayerNorm",) for mod in norms):
        why.append("its norms are not LayerNorm(eps=1e-6) with weight and bias, as BEiT's")
    blocks = list(getattr(m, "blocks", ()))
    for b, blk in enumerate(blocks):
        a = blk.attn
        if type(blk) is not Block:
            why.append(f"block {b} is timm's {type(blk).__name__}, not Block")
            break
        if not isinstance(a, KdforgeAttention) or not all(
                isinstance(x, nn.Identity) for x in (a.q_norm, a.k_norm, a.norm)) or a.gate is not None:
            why.append(f"block {b}'s attention has q/k normalisation, a scale norm or a gate (BEiT has none)")
            break
        if type(blk.mlp) is not Mlp or not isinstance(blk.mlp.norm, nn.Identity) or type(blk.mlp.act) is not nn.GELU \
                or blk.mlp.act.approximate != "none" or blk.mlp.fc1.bias is None or blk.mlp.fc2.bias is None:
            why.append(f"block {b}'s MLP is not timm's Mlp with exact GELU and biases (BEiT's)")
            break
        if type(blk.ls1) is not type(blocks[0].ls1) or not isinstance(blk.ls1, (LayerScale, nn.Identity)) \
                or type(blk.ls2) is not type(blk.ls1):
            why.append("its LayerScale is not the same plain LayerScale (or none) in every block")
            break
    if why:
        raise ExportError(
            f"student {cfg.model} has a relative position bias (rel_pos_bias = \"{cfg.rel_pos_bias}\"), which timm "
            "holds only in its BEiT, and BEiT cannot hold this model: " + "; ".join(why) + ". Export --format onnx, "
            "pt2 or torchscript instead (they need no kdforge), or train a student BEiT can hold (a plain ViT with "
            "a class token, no registers, LayerNorm, GELU)"
        )
    dim = int(m.embed_dim)
    first = blocks[0]
    hidden = int(first.mlp.fc1.out_features)
    mlp_ratio = hidden / dim
    if int(dim * mlp_ratio) != hidden:
        raise ExportError(f"student {cfg.model}: BEiT sizes its MLP as int(dim x mlp_ratio), which cannot give "
                          f"{hidden} for dim {dim}: export --format onnx or pt2 instead")
    layer_scale = isinstance(first.ls1, LayerScale)
    shared = cfg.rel_pos_bias == "shared"
    gh, gw = (int(g) for g in m.patch_embed.grid_size)
    ph, pw = (int(p) for p in m.patch_embed.patch_size)
    args = {
        "img_size": [int(s) for s in m.patch_embed.img_size], "patch_size": ph if ph == pw else [ph, pw],
        "embed_dim": dim, "depth": len(blocks), "num_heads": int(first.attn.num_heads), "mlp_ratio": mlp_ratio,
        "qkv_bias": first.attn.qkv.bias is not None,
        "use_abs_pos_emb": m.pos_embed is not None, "use_rel_pos_bias": not shared, "use_shared_rel_pos_bias": shared,
        "global_pool": m.global_pool, "use_fc_norm": not isinstance(m.fc_norm, nn.Identity),
        "num_classes": int(cfg.num_classes),
    }
    # BEiT has its gammas when init_values is truthy (the value only initialises them); 0.0, not None: timm drops
    # None keywords, and the architecture's default is 0.1
    args["init_values"] = float(cfg.model_kwargs.get("init_values") or 1.0) if layer_scale else 0.0
    out: dict[str, Tensor] = {}
    for k, v in weights.items():
        parts = k.split(".")
        if k.endswith("attn.qkv.bias"):
            base = k[: -len("qkv.bias")]
            out[base + "q_bias"], out[base + "v_bias"] = v[:dim].clone(), v[2 * dim:].clone()  # the key bias goes
        elif len(parts) == 4 and parts[0] == "blocks" and parts[2] in ("ls1", "ls2") and parts[3] == "gamma":
            out[f"blocks.{parts[1]}.gamma_{parts[2][-1]}"] = v
        else:
            out[k] = v
    tables = {n: p for n, p in student.state_dict().items() if n.startswith("rel_pos_bias")}
    if shared:
        out["rel_pos_bias.relative_position_bias_table"] = tables["rel_pos_bias.table"].detach().clone()
    else:
        for b in range(len(blocks)):
            out[f"blocks.{b}.attn.relative_position_bias_table"] = tables[f"rel_pos_biases.{b}.table"].detach().clone()
    expected = (2 * gh - 1) * (2 * gw - 1) + 3
    if next(t for n, t in out.items() if n.endswith("relative_position_bias_table")).shape[0] != expected:
        raise ExportError(f"student {cfg.model}: its relative position bias does not have BEiT's {expected} entries "
                          f"for a {gh}x{gw} grid: export --format onnx or pt2 instead")
    return TimmForm(BEIT_ARCHITECTURE, args, out, "beit")


def _beit_to_student(weights: dict[str, Tensor], student: nn.Module) -> dict[str, Tensor]:
    """The inverse of :func:`_beit_form`: BEiT weights -> the kdforge student's keys (under ``model.``, the tables
    at the student's level); the dropped key bias comes back as zeros (it changes no output)."""
    out: dict[str, Tensor] = {}
    shared = "rel_pos_bias.relative_position_bias_table" in weights
    for k, v in weights.items():
        parts = k.split(".")
        if k.endswith("attn.q_bias"):
            base = k[: -len("q_bias")]
            out[f"model.{base}qkv.bias"] = torch.cat([v, torch.zeros_like(v), weights[base + "v_bias"]])
        elif k.endswith("attn.v_bias"):
            continue
        elif len(parts) == 3 and parts[0] == "blocks" and parts[2] in ("gamma_1", "gamma_2"):
            out[f"model.blocks.{parts[1]}.ls{parts[2][-1]}.gamma"] = v
        elif k == "rel_pos_bias.relative_position_bias_table":
            out["rel_pos_bias.table"] = v
        elif k.endswith("attn.relative_position_bias_table"):
            out[f"rel_pos_biases.{parts[1]}.table"] = v
        else:
            out[f"model.{k}"] = v
    if not shared and not any(k.startswith("rel_pos_biases.") for k in out):
        raise CheckpointError("the exported BEiT has no relative position bias table; it was not written by "
                              "kdforge export from a student with rel_pos_bias")
    return out


# ------------------------------------------------------------------------------------------------- reading exports
def is_export_folder(path: str | Path) -> bool:
    """True for a folder in timm's layout (config.json + model.safetensors), e.g. one kdforge export wrote."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and (p / "model.safetensors").is_file()


def export_folder_of(path: str | Path) -> Path | None:
    """The timm-layout folder that ``path`` is or whose model.safetensors it is, else None."""
    p = Path(path)
    if p.is_file() and p.name.endswith(".safetensors") and is_export_folder(p.parent):
        return p.parent
    return p if is_export_folder(p) else None


def read_export_config(folder: str | Path) -> dict[str, Any]:
    """config.json of a timm-layout folder (:class:`CheckpointError` if unreadable)."""
    path = Path(folder) / "config.json"
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"'{path}' is not a readable timm config.json ({exc})") from None
    if not isinstance(cfg, dict) or "architecture" not in cfg:
        raise CheckpointError(f"'{path}' has no \"architecture\": it is not a timm config.json")
    return cfg


def load_export_into_student(student: nn.Module, source: str | Path) -> Path:
    """Fill ``student`` (a "timm" kdforge student) with the weights of a timm-layout export folder (or its
    model.safetensors): all of them, converted back from BEiT where the export holds a relative position bias,
    and the mask token from mask_token.safetensors when the folder has one (else the student keeps its own).
    Returns the weight file read; :class:`CheckpointError` listing the keys that do not fit otherwise."""
    from safetensors.torch import load_file

    from kdforge.engine.runs import fit_problems

    folder = export_folder_of(source)
    if folder is None:
        raise CheckpointError(f"'{source}' is not in a folder kdforge export wrote (config.json beside "
                              "model.safetensors): give such a folder, a run directory or a run checkpoint")
    config = read_export_config(folder)
    weights = load_file(str(folder / "model.safetensors"), device="cpu")
    layout = (config.get("kdforge") or {}).get("layout", "timm")
    if layout == "beit" or config["architecture"].startswith("beit"):
        state = _beit_to_student(weights, student)
    else:
        state = {f"model.{k}": v for k, v in weights.items()}
    mask_file = folder / MASK_TOKEN_FILE
    own = student.state_dict()
    if "mask_token" in own:
        state["mask_token"] = load_file(str(mask_file))["mask_token"] if mask_file.is_file() else own["mask_token"]
    problems = fit_problems(student, state, "the export")
    if problems:
        info = config.get("kdforge") or {}
        raise CheckpointError(
            f"the export '{folder}' does not fit the recipe's [student]:\n  " + "\n  ".join(problems) +
            f"\nIts config.json says architecture = \"{config['architecture']}\", model_args = "
            f"{config.get('model_args', {})}" + (f", exported from student {info}" if info else "") +
            "; make the [student] that model (model, model_kwargs, num_classes, attention, rel_pos_bias: the run's "
            "recipe is in the folder's README.md)"
        )
    student.load_state_dict(state)
    return folder / "model.safetensors"


# ------------------------------------------------------------------------------------------------- the program
class ExportedModel(nn.Module):
    """What the ONNX, TorchScript and pt2 files hold: normalised images Tensor[B, 3, H, W] -> (output, features),
    timm's ``model(x)`` and ``model.forward_features(x)`` from one pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        features = self.model.forward_features(x)
        return self.model.forward_head(features), features


def _reference(student: nn.Module) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    """kdforge's own forward of the student on normalised images (what TimmStudent.forward runs: the model with
    kdforge's attention and bias, before the split into CLS and patches) -> (output, features)."""
    m = student.model

    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            features = m.forward_features(x)
            return m.forward_head(features), features

    return run


def _portable_student_model(student: nn.Module) -> nn.Module:
    """The student's own timm module for tracing when timm cannot hold it: kdforge's attention set to torch's SDPA
    (plain torch ops that every exporter knows; same weights, same math)."""
    from kdforge.students.timm_student import KdforgeAttention

    for mod in student.model.modules():
        if isinstance(mod, KdforgeAttention):
            mod.backend = "sdpa"
    return student.model


# ------------------------------------------------------------------------------------------------- checks
@dataclasses.dataclass
class Check:
    """How far a written file's outputs are from the student's, over the sample images."""

    max_abs_error: float
    """max |exported - student| over both outputs."""
    relative_error: float
    """The largest, over the two outputs, of max |exported - student| / max |student|: what the tolerance bounds."""
    tolerance: float


def _compare(fmt: str, run: Callable[[Tensor], Iterable[Tensor]], reference: Callable, samples: list[Tensor]) -> Check:
    """Run the written model (``run``) and the student (``reference``) on ``samples``; :class:`ExportError` when
    an output's max abs difference exceeds ``TOLERANCES[fmt]`` x that output's max magnitude (on any batch)."""
    errors: dict[int, float] = {}
    magnitudes: dict[int, float] = {}
    for x in samples:
        try:
            got = list(run(x))
        except Exception as exc:  # noqa: BLE001 - a runtime's own error types; the user needs its first line
            raise ExportError(f"{fmt}: the written model fails on a batch of {x.shape[0]} sample images "
                              f"({type(exc).__name__}: {_first_line(exc)}); nothing was written. Try another format "
                              "(pt2 is torch's own), and report it") from None
        want = list(reference(x))
        if len(got) != len(want):
            raise ExportError(f"{fmt}: the written model gives {len(got)} outputs, the student {len(want)}")
        for i, (g, w) in enumerate(zip(got, want)):
            g = torch.as_tensor(g).float()
            if tuple(g.shape) != tuple(w.shape):
                raise ExportError(f"{fmt}: the written model gives shape {tuple(g.shape)} for a batch of "
                                  f"{x.shape[0]}, the student {tuple(w.shape)}")
            errors[i] = max(errors.get(i, 0.0), float((g - w.float()).abs().max()))
            magnitudes[i] = max(magnitudes.get(i, 0.0), float(w.float().abs().max()))
    relative = max(errors[i] / magnitudes[i] if magnitudes[i] > 0 else (0.0 if errors[i] == 0 else math.inf)
                   for i in errors)
    check = Check(max(errors.values()), relative, TOLERANCES[fmt])
    if not relative <= check.tolerance:  # also catches NaN
        raise ExportError(
            f"{fmt}: the written model differs from the kdforge student by {check.max_abs_error:.3g} (max abs, on "
            f"seeded sample images), {relative:.3g} of the outputs' magnitude, over the tolerance "
            f"{check.tolerance:g}; nothing was written. " + {
                "timm": "timm's module does not compute what kdforge's does for this student: export --format "
                        "onnx or pt2 instead (traced from kdforge's own module) and report it",
            }.get(fmt, "Try another format (pt2 is torch's own), and report it")
        )
    return check


# ------------------------------------------------------------------------------------------------- writers
def _write_timm(form: TimmForm, model: nn.Module, folder: Path, data_config: dict, extra: dict) -> None:
    from safetensors.torch import save_file
    from timm.models._hub import save_config_for_hf

    # What timm's default config says of its own weights (their tag, license, paper) is not true of these.
    model.pretrained_cfg = {k: v for k, v in model.pretrained_cfg.items() if k not in _SOURCE_KEYS}
    # One contiguous tensor per key: safetensors refuses shared or strided storage.
    save_file({k: v.detach().contiguous().clone() for k, v in model.state_dict().items()},
              str(folder / "model.safetensors"), metadata={"format": "pt"})
    model_config = {"kdforge": extra}
    try:
        save_config_for_hf(model, str(folder / "config.json"), model_config=model_config, data_config=data_config)
    except TypeError:  # timm before model_args / data_config: the data config goes into pretrained_cfg directly
        model.pretrained_cfg = {**model.pretrained_cfg, **data_config}
        save_config_for_hf(model, str(folder / "config.json"),
                           model_config=dict(model_config, model_args=form.model_args))


#: pretrained_cfg entries describing the weights timm ships for an architecture, dropped from an export's config.
_SOURCE_KEYS = ("tag", "license", "notes", "paper_ids", "paper_name", "origin_url", "description", "hf_hub_id",
                "hf_hub_filename", "url", "file", "source", "state_dict")


def _load_timm_folder(folder: Path, form: TimmForm) -> nn.Module:
    """Build the written folder with timm alone (local-dir: where this timm has it, else its file)."""
    import timm

    try:
        from timm.models._factory import _MODEL_SOURCES
        local_dir = "local-dir" in _MODEL_SOURCES
    except ImportError:
        local_dir = False
    if local_dir:
        return timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    return timm.create_model(form.architecture, pretrained=True, pretrained_cfg_overlay={
        "file": str(folder / "model.safetensors")}, **form.model_args).eval()


@contextlib.contextmanager
def _quiet() -> Any:
    """Silence the exporters' progress prints and their warnings (deprecations, tracer notes)."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        yield


def _write_onnx(program: nn.Module, example: Tensor, path: Path) -> None:
    try:
        import onnxscript  # noqa: F401 - torch's exporter needs it; say so before it fails deep inside
    except ImportError:
        raise ExportError("--format onnx needs onnx and onnxscript (pip install 'kdforge[export]', or pip install "
                          "onnx onnxscript onnxruntime)") from None
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet():
            torch.onnx.export(program, (example,), str(path), dynamo=True, opset_version=ONNX_OPSET,
                              input_names=["input"], output_names=["output", "features"],
                              dynamic_shapes=({0: batch},), external_data=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many kinds; the user needs its first line
        raise ExportError(f"onnx: torch.onnx.export failed ({type(exc).__name__}: {_first_line(exc)}); try "
                          "--format pt2") from None


def _run_onnx(path: Path) -> Callable[[Tensor], list]:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ExportError("--format onnx checks the file with onnxruntime, which is not installed (pip install "
                          "'kdforge[export]', or pip install onnxruntime)") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = options.inter_op_num_threads = LATENCY_THREADS  # as torch's latency is measured
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: [torch.from_numpy(o) for o in session.run(None, {"input": x.numpy()})]


def _write_torchscript(program: nn.Module, example: Tensor, path: Path) -> None:
    try:
        with _quiet():
            traced = torch.jit.trace(program, (example,), check_trace=False)
            torch.jit.save(traced, str(path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"torchscript: torch.jit.trace failed ({type(exc).__name__}: {_first_line(exc)}); try "
                          "--format pt2") from None


def _run_torchscript(path: Path) -> Callable[[Tensor], tuple]:
    with _quiet():
        loaded = torch.jit.load(str(path), map_location="cpu")

    def run(x: Tensor):
        with torch.no_grad():
            return loaded(x)

    return run


def _write_pt2(program: nn.Module, example: Tensor, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        with _quiet():
            ep = torch.export.export(program, (example,), dynamic_shapes=({0: batch},))
            torch.export.save(ep, str(path))
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"pt2: torch.export failed ({type(exc).__name__}: {_first_line(exc)}); try --format "
                          "onnx") from None


def _run_pt2(path: Path) -> Callable[[Tensor], tuple]:
    with _quiet():
        module = torch.export.load(str(path)).module()

    def run(x: Tensor):
        with torch.no_grad():
            return module(x)

    return run


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ------------------------------------------------------------------------------------------------- measurements
def count_flops(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """FLOPs of one forward at batch 1 (torch.utils.flop_counter: matrix products and convolutions, 2 per
    multiply-add)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, *input_size))
    return int(counter.get_total_flops())


#: Threads of the latency measurement: one, so that the number does not depend on how busy the other cores are
#: (several threads on a loaded machine wait for each other far longer than a small model computes).
LATENCY_THREADS = 1


def cpu_latency_ms(run: Callable[[Tensor], Any], input_size: tuple[int, int, int], *, repeats: int = 10,
                   warmup: int = 3) -> float:
    """Median wall time in milliseconds of ``run`` on one image (batch 1) on the CPU with torch limited to
    :data:`LATENCY_THREADS` threads, after ``warmup`` calls."""
    x = torch.rand(1, *input_size, generator=torch.Generator().manual_seed(0))
    times = []
    threads = torch.get_num_threads()
    torch.set_num_threads(LATENCY_THREADS)
    try:
        with torch.inference_mode():
            for i in range(warmup + repeats):
                start = time.perf_counter()
                run(x)
                if i >= warmup:
                    times.append((time.perf_counter() - start) * 1e3)
    finally:
        torch.set_num_threads(threads)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------- the export
@dataclasses.dataclass
class ExportReport:
    """What an export wrote and measured (printed by the CLI, summed up in the model card)."""

    out: str
    formats: list[str]
    files: list[str]
    layout: str
    architecture: str
    model_args: dict[str, Any]
    input_size: list[int]
    mean: list[float]
    std: list[float]
    parameters: int
    flops: int
    latency_ms: dict[str, float]
    threads: int
    checks: dict[str, dict[str, float]]
    timm_note: str = ""


def _data_config(student: nn.Module, recipe) -> dict[str, Any]:
    """The preprocessing the export records: the student's mean and std, the recipe's image size, crop_pct and
    interpolation (a fixed-size ViT's own image size wins)."""
    size = int(recipe.augment.image_size) if recipe is not None else 224
    hw = [size, size]
    pe = getattr(student.model, "patch_embed", None)
    if pe is not None and getattr(pe, "strict_img_size", False) and getattr(pe, "img_size", None) is not None:
        hw = [int(s) for s in pe.img_size]
    config = {"input_size": (3, *hw), "mean": tuple(float(v) for v in student.mean.flatten()),
              "std": tuple(float(v) for v in student.std.flatten())}
    if recipe is not None:
        config.update(crop_pct=float(recipe.augment.crop_pct), interpolation=str(recipe.augment.interpolation))
    return config


def _samples(input_size: tuple[int, ...], mean: Tensor, std: Tensor) -> list[Tensor]:
    g = torch.Generator().manual_seed(0)
    return [(torch.rand(b, *input_size, generator=g) - mean) / std for b in _SAMPLE_BATCHES]


def check_formats(formats: Iterable[str]) -> list[str]:
    """The formats asked for, in order, each once (:class:`ExportError` naming an unknown one)."""
    chosen: list[str] = []
    for f in formats:
        for name in str(f).split(","):
            name = name.strip().lower()
            if name not in FORMATS:
                raise ExportError(f"--format {name!r} is not a format kdforge exports: choose from "
                                  f"{', '.join(FORMATS)}")
            if name not in chosen:
                chosen.append(name)
    if not chosen:
        raise ExportError(f"name at least one --format ({', '.join(FORMATS)})")
    return chosen


def _check_out(out: Path) -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        kind = "a file" if not out.is_dir() else "a folder that is not empty"
        raise ExportError(f"--out '{out}' is {kind}: an export writes a new folder; pick another --out or remove it")


@contextlib.contextmanager
def _staging(out: Path):
    """A temporary folder beside ``out`` that becomes ``out`` when the block ends; removed, with any parent
    folders it had to create, when the block raises."""
    created = []
    parent = out.parent
    while not parent.exists():
        created.append(parent)
        parent = parent.parent
    for p in reversed(created):
        p.mkdir()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export-tmp", dir=out.parent))
    try:
        yield tmp
        _check_out(out)  # nobody wrote there meanwhile
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()


def export_student(student: nn.Module, out: str | Path, formats: Iterable[str], *, keep_mask_token: bool = False,
                   recipe=None, card: Callable[[ExportReport], str] | None = None) -> ExportReport:
    """Export ``student`` (a "timm" kdforge student) into the new folder ``out`` in ``formats`` (see the module
    docstring), checking every file; ``card`` writes README.md from the report. Writes nothing when anything fails
    (:class:`ExportError`). The student is put in eval mode, fp32, on the CPU (and, where timm cannot hold it, its
    kdforge attention on torch's SDPA)."""
    formats = check_formats(formats)
    out = Path(out)
    _check_out(out)
    _student_config(student)
    student = student.float().eval().cpu()
    if keep_mask_token and "mask_token" not in student.state_dict():
        raise ExportError(f"--keep-mask-token: student {student.model_name} has no mask token (it is not a vision "
                          "transformer); leave the flag out")
    data_config = _data_config(student, recipe)
    input_size = tuple(data_config["input_size"])
    samples = _samples(input_size, student.mean.cpu(), student.std.cpu())
    reference = _reference(student)

    try:
        form, timm_error = timm_form(student), None
        model = form.build()
        # the plain timm model must compute the student's forward before anything is written (or traced from it)
        _compare("timm", _reference_of(model), reference, samples)
    except ExportError as exc:
        if "timm" in formats:
            raise
        form, timm_error = None, exc
        model = _portable_student_model(student)
    program = ExportedModel(model).eval()
    example = samples[0][:2]

    checks: dict[str, Check] = {}
    latency: dict[str, float] = {"pytorch": cpu_latency_ms(program, input_size)}
    with _staging(out) as tmp:
        table = dict(recipe.student) if recipe is not None else {
            "plugin": "timm", "model": student.cfg.model, "attention": student.cfg.attention,
            "rel_pos_bias": student.cfg.rel_pos_bias}
        extra = {"layout": form.layout if form else "kdforge", "student": table}
        for fmt in formats:
            if fmt == "timm":
                _write_timm(form, model, tmp, data_config, extra)
                loaded = _load_timm_folder(tmp, form)
                checks[fmt] = _compare(fmt, _reference_of(loaded), reference, samples)
            elif fmt == "onnx":
                _write_onnx(program, example, tmp / "model.onnx")
                run = _run_onnx(tmp / "model.onnx")
                checks[fmt] = _compare(fmt, run, reference, samples)
                latency["onnxruntime"] = cpu_latency_ms(run, input_size)
            elif fmt == "torchscript":
                _write_torchscript(program, example, tmp / "model.torchscript.pt")
                checks[fmt] = _compare(fmt, _run_torchscript(tmp / "model.torchscript.pt"), reference, samples)
            elif fmt == "pt2":
                _write_pt2(program, example, tmp / "model.pt2")
                checks[fmt] = _compare(fmt, _run_pt2(tmp / "model.pt2"), reference, samples)
        if keep_mask_token:
            from safetensors.torch import save_file

            save_file({"mask_token": student.mask_token.detach().contiguous().clone()}, str(tmp / MASK_TOKEN_FILE))
        report = ExportReport(
            out=str(out), formats=formats, files=[],
            layout=form.layout if form else "kdforge", architecture=form.architecture if form else student.cfg.model,
            model_args=form.model_args if form else {}, input_size=list(input_size),
            mean=list(data_config["mean"]), std=list(data_config["std"]),
            parameters=sum(p.numel() for p in model.parameters()), flops=count_flops(model, input_size),
            latency_ms={k: round(v, 3) for k, v in latency.items()}, threads=LATENCY_THREADS,
            checks={f: dataclasses.asdict(c) for f, c in checks.items()},
            timm_note="" if form is not None else str(timm_error),
        )
        if card is not None:
            (tmp / "README.md").write_text(card(report))
        report.files = sorted(p.name for p in tmp.iterdir())
    return report


def _reference_of(model: nn.Module) -> Callable[[Tensor], tuple[Tensor, Tensor]]:
    def run(x: Tensor) -> tuple[Tensor, Tensor]:
        with torch.no_grad():
            features = model.forward_features(x)
            return model.forward_head(features), features

    return run


# ------------------------------------------------------------------------------------------------- from a run
def check_checkpoint_recipe(state: dict, recipe, path: Path, run_dir: Path) -> list[str]:
    """:class:`CheckpointError` if the checkpoint was trained with another recipe than the run's recipe.toml
    (another student, teacher, data or losses); returns the schedule differences a resume with --allow-changes
    may have made (noted in the model card)."""
    from kdforge.engine.runs import _flatten, _kind_of_change
    from kdforge.recipe import to_dict

    old, new = _flatten(state.get("recipe", {})), _flatten(to_dict(recipe))
    diffs = []
    for key in sorted(set(old) | set(new)):
        if key == "profiles" or key.startswith("profiles."):
            continue
        a, b = old.get(key, "(unset)"), new.get(key, "(unset)")
        if a != b and _kind_of_change(key) != "free":
            diffs.append((key, a, b, _kind_of_change(key)))
    other = [d for d in diffs if d[3] == "model"]
    if other:
        lines = "; ".join(f"{k}: {a!r} in the checkpoint, {b!r} in recipe.toml" for k, a, b, _ in other[:5])
        more = f" (+{len(other) - 5} more)" if len(other) > 5 else ""
        raise CheckpointError(
            f"'{path}' was trained with another recipe than the run '{run_dir}' ({lines}{more}): export the run "
            "directory that checkpoint belongs to, or pass one of this run's checkpoints (last.pt, step_*.pt)"
        )
    return [f"{k}: {a!r} -> {b!r}" for k, a, b, _ in diffs]


def export_run(run_dir: str | Path, out: str | Path, formats: Iterable[str], *, checkpoint: str | Path | None = None,
               keep_mask_token: bool = False, trust: bool = False) -> ExportReport:
    """Export the student of a run directory (recipe.toml and last.pt, or ``checkpoint``) into the new folder
    ``out`` with a model card (README.md); see :func:`export_student`. Writes nothing when anything fails."""
    from kdforge.engine import checkpoint as ckpt
    from kdforge.engine.runs import load_student_state, read_run
    from kdforge.plugins import get_registry
    from kdforge.recipe import STUDENT_TABLE_KEYS, load_recipe, plugin_table

    formats = check_formats(formats)
    run_dir, out = Path(run_dir), Path(out)
    _check_out(out)
    if not (run_dir / "recipe.toml").is_file():
        raise ExportError(f"'{run_dir}' holds no recipe.toml: pass the run directory that kdforge train wrote")
    path = Path(checkpoint) if checkpoint else run_dir / "last.pt"
    if checkpoint is None and not path.is_file():
        recipe = load_recipe(run_dir / "recipe.toml")
        if recipe.stages:
            names = [s.get("name", "?") for s in recipe.stages]
            raise ExportError(f"'{run_dir}' is a multi-stage run, whose checkpoints are in its stages' directories: "
                              f"export one of them, e.g. {run_dir / names[-1]} (stages: {', '.join(names)})")
        found = ckpt.others(path)
        hint = (f"pass one of its checkpoints with --checkpoint ({', '.join(str(p) for p in found[:3])})" if found
                else "the run has written none yet: export it once training has written last.pt, or pass a "
                "checkpoint with --checkpoint PATH")
        raise ExportError(f"'{run_dir}' holds no checkpoint to export (no last.pt): {hint}")
    state, recipe = read_run(run_dir, path, builds=("student",), trust=trust)
    changes = check_checkpoint_recipe(state, recipe, path, run_dir)
    student = get_registry().create("students", plugin_table(recipe.student, STUDENT_TABLE_KEYS), "student")
    load_student_state(student, state, f"the student of '{path}' does not fit the run's [student]",
                       "export the run directory that checkpoint belongs to")
    summary = _read_summary(run_dir)
    from kdforge.export.card import model_card

    return export_student(
        student.eval(), out, formats, keep_mask_token=keep_mask_token, recipe=recipe,
        card=lambda report: model_card(report, recipe=recipe, state=state, summary=summary, run_dir=run_dir,
                                       checkpoint=path, changes=changes),
    )


def _read_summary(run_dir: Path) -> dict[str, Any]:
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return {}
    return summary if isinstance(summary, dict) else {}




