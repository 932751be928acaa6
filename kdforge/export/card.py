"""The model card (README.md) of an export folder: what was distilled from what, how, how well, how big and fast.

The card is a Hugging Face model card (YAML front matter, then Markdown), so the folder can be published as it is.
Numbers are printed as summary.json holds them (JSON notation), so that a reader, or a test, can match them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

__all__ = ["model_card", "evaluation_results"]


def evaluation_results(summary: dict[str, Any]) -> dict[str, float]:
    """The evaluation numbers of a run's summary.json: its ``student_*`` and ``teacher_*`` scalars (kNN / linear
    probe accuracies before and after training, the teacher's), in the file's order."""
    return {k: v for k, v in summary.items()
            if k.startswith(("student_", "teacher_")) and isinstance(v, (int, float)) and not isinstance(v, bool)}


def _teacher_text(table: dict[str, Any]) -> str:
    if not table:
        return "no teacher (supervised training only)"
    plugin, model = table.get("plugin", "?"), table.get("model")
    text = f"the `{plugin}` teacher" + (f" `{model}`" if model else "")
    if table.get("checkpoint"):
        text += f", weights from `{table['checkpoint']}`"
    elif table.get("run"):
        text += f", the adapted model of the run `{table['run']}`"
    elif "pretrained" in table:
        text += ", pretrained weights" if table["pretrained"] else " with random weights (pretrained = false)"
    if table.get("model_kwargs"):
        text += f", model_kwargs {json.dumps(table['model_kwargs'])}"
    return text


def _data_text(table: dict[str, Any]) -> str:
    plugin = table.get("plugin", "?")
    details = [f"{k} = {json.dumps(v)}" for k, v in table.items() if k != "plugin" and isinstance(v, (str, int, float))]
    return f"`{plugin}`" + (f" ({', '.join(details)})" if details else "")


def _g(value: float) -> str:
    return f"{value / 1e9:.4g} G" if value >= 1e8 else f"{value / 1e6:.4g} M"


def model_card(report, *, recipe, state: dict[str, Any], summary: dict[str, Any], run_dir: Path, checkpoint: Path,
               changes: list[str]) -> str:
    """README.md for the export ``report`` of the run ``run_dir`` (its ``recipe``, checkpoint ``state`` read from
    ``checkpoint``, ``summary`` from summary.json; ``changes``: schedule keys the checkpoint's recipe differs in)."""
    from kdforge.export import _SAMPLE_BATCHES, FILES
    from kdforge.recipe import dump_toml

    name = recipe.run.name
    student = recipe.student
    step, epoch = int(state.get("step", 0)), int(state.get("epoch", 0))
    results = evaluation_results(summary)
    same_step = summary.get("steps") == step
    losses = ", ".join(f"`{label}` ({t.get('plugin')}, weight {t.get('weight', 1.0)})"
                       for label, t in recipe.losses.items())
    h, w = report.input_size[1:]
    lines = [
        "---",
        "library_name: timm" if "timm" in report.formats else "library_name: onnx",
        "tags:",
        "- image-feature-extraction",
        "- knowledge-distillation",
        "- kdforge",
        "- timm",
        "---",
        "",
        f"# {name}: a `{student.get('model', '?')}` student distilled with kdforge",
        "",
        f"`{student.get('model', '?')}` ({report.parameters} parameters) distilled from {_teacher_text(recipe.teacher)}"
        f" with the losses {losses or 'none'}, with kdforge (written by `kdforge export`). Only the "
        "student's inference weights are here: no projection heads of the losses, no optimizer state"
        + (", and the mask token (`mask_token.safetensors`, for continued masked-image training)."
           if "mask_token.safetensors" in report.files else ", no mask token."),
        "",
        "## Files",
        "",
        "| file | format | loads with | max abs error vs the kdforge student | relative error | tolerance |",
        "|---|---|---|---|---|---|",
    ]
    loads = {"timm": "timm alone (`timm.create_model`)", "onnx": "onnxruntime",
             "torchscript": "`torch.jit.load`", "pt2": "`torch.export.load(path).module()`"}

    for fmt in report.formats:
        c = report.checks[fmt]
        lines.append(f"| {', '.join(f'`{f}`' for f in FILES[fmt])} | {fmt} | {loads[fmt]} | "
                     f"{c['max_abs_error']:.3g} | {c['relative_error']:.3g} | {c['tolerance']:g} |")
    if "mask_token.safetensors" in report.files:
        lines.append("| `mask_token.safetensors` | safetensors | kdforge `[student] init_from` | - | - |")
    lines += [
        "",
        "Each file was checked right after it was written: loaded as listed, run on seeded random images (batches "
        f"of {' and '.join(str(b) for b in _SAMPLE_BATCHES)}), compared with the kdforge student's own forward: the "
        "relative error is max |difference| / max |student output|, the larger of the two outputs'.",
        "",
        "## Inputs and outputs",
        "",
        f"Images `Tensor[B, 3, {h}, {w}]`, RGB in [0, 1], then normalised with mean {json.dumps(report.mean)} and "
        f"std {json.dumps(report.std)} (the student's own). `output` is timm's `model(x)` (the classifier's logits, "
        "or the pooled embedding, the class token after the final norm, when there is no classifier); `features` "
        "is `model.forward_features(x)` (every token after the final norm). The ONNX, TorchScript and pt2 files "
        "return the pair (`output`, `features`); their batch size is free.",
        "",
    ]
    if "timm" in report.formats:
        args = json.dumps(report.model_args)
        lines += [
            "## Use with timm (no kdforge needed)",
            "",
            "```python",
            "import timm",
            "model = timm.create_model(\"local-dir:/path/to/this/folder\", pretrained=True).eval()",
            "# or, with any timm that reads a weight file:",
            f"model = timm.create_model(\"{report.architecture}\", pretrained=True,",
            "                          pretrained_cfg_overlay=dict(file=\"/path/to/this/folder/model.safetensors\"),",
            f"                          **{args})",
            "```",
            "",
        ]
        if report.layout == "beit":
            lines += [
                f"The student has a relative position bias ({student.get('rel_pos_bias')}), which timm holds in its "
                f"BEiT: this folder is a timm `{report.architecture}` sized by its model_args, with the student's "
                "tables as they are and the q/k/v bias without its key part (it adds the same score to every key of "
                "a query: softmax ignores it).",
                "",
            ]
        lines += [
            "In kdforge, the folder (or its model.safetensors) is a teacher's `checkpoint` (with `model` and "
            "`model_kwargs` set to the architecture and model_args above) and a student's `init_from`.",
            "",
        ]
    elif report.timm_note:
        lines += [f"No timm folder: {report.timm_note}", ""]
    lines += [
        "## Training",
        "",
        f"- teacher: {_teacher_text(recipe.teacher)}",
        f"- data: {_data_text(recipe.data)}, images of {recipe.augment.image_size} px",
        f"- epochs: {recipe.train.epochs} planned (train.epochs); this checkpoint is at step {step} of "
        f"{summary.get('total_steps', '?')}, epoch {epoch}"
        + (f" (train.max_steps = {recipe.train.max_steps})" if getattr(recipe.train, "max_steps", None) else ""),
        f"- run directory: `{run_dir}`, checkpoint `{checkpoint.name}`",
    ]
    if changes:
        lines.append(f"- the checkpoint's schedule differs from recipe.toml (a resume with --allow-changes): "
                     f"{'; '.join(changes)}")
    lines += ["", "## Evaluation", ""]
    if results and same_step:
        lines += ["From the run's summary.json:", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {json.dumps(v)} |" for k, v in results.items()]
    elif results:
        lines.append(f"summary.json evaluates step {summary.get('steps')}, not this checkpoint's step {step}: run "
                     f"`kdforge eval {run_dir} --checkpoint {checkpoint}` for its numbers.")
    else:
        lines.append("The run's summary.json holds no evaluation (the recipe has no [eval] evaluators, or the run "
                     f"has not finished): `kdforge eval {run_dir}` evaluates it.")
    final = summary.get("final_metrics") or {}
    if isinstance(final.get("loss"), (int, float)) and same_step:
        lines += ["", f"Final training loss: {json.dumps(final['loss'])}."]
    latency = ", ".join(f"{k} {v:.3g} ms" for k, v in report.latency_ms.items())
    lines += [
        "",
        "## Size and speed",
        "",
        "| measure | value |",
        "|---|---|",
        f"| parameters | {report.parameters} |",
        f"| FLOPs at 1x3x{h}x{w} | {report.flops} ({_g(report.flops)}) |",
        f"| CPU latency, batch 1 (median of 10 runs, {report.threads} thread{'s' * (report.threads != 1)}) | "
        f"{latency} |",
        "",
        "FLOPs are torch.utils.flop_counter's (matrix products and convolutions, 2 per multiply-add).",
        "",
        "## Publishing",
        "",
        "The folder is a Hugging Face model repository as it is (this card, config.json, model.safetensors):",
        "",
        "```python",
        "from huggingface_hub import upload_folder",
        "upload_folder(repo_id=\"you/" + name + "\", folder_path=\"/path/to/this/folder\")",
        "```",
        "",
        "after which `timm.create_model(\"hf-hub:you/" + name + "\", pretrained=True)` loads it.",
        "",
        "## Recipe",
        "",
        "The resolved recipe the run trained with:",
        "",
        "```toml",
        dump_toml(recipe).rstrip(),
        "```",
        "",
    ]
    return "\n".join(lines)
