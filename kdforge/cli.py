"""``kdforge`` command line: train, retrieve, eval, export, diagnose (curves, attention, landscape), plugins, info.

Every user error (bad recipe, missing data, mismatched shapes) prints one message and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from kdforge.errors import KdforgeError


def _add_recipe_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("recipe", help="recipe TOML file, e.g. plugins/proteus.toml")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe value, e.g. --set train.epochs=3 (repeatable; value read as TOML)")
    p.add_argument("--profile", help="apply the recipe's [profiles.NAME] overlay, e.g. smoke")
    p.add_argument("--dry-run", action="store_true", help="print the resolved recipe and exit")
    p.add_argument("--output-dir", help="run directory (default: run.output_dir or runs/<run.name>)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdforge", description="Distil vision foundation models into small students.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="run a distillation recipe")
    _add_recipe_args(train)
    train.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CHECKPOINT",
                       help="continue from CHECKPOINT (default: <output-dir>/last.pt)")
    train.add_argument("--allow-changes", action="store_true",
                       help="with --resume: accept a recipe whose schedule differs from the checkpoint's (optim.*, "
                       "train.epochs, loss weights, data paths); the models and the data never may")
    train.add_argument("--stage", metavar="NAME", help="multi-stage recipes: run this stage only (the stages it reads "
                       "must have finished)")
    train.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    ret = sub.add_parser("retrieve", help="retrieve a transfer set for a task from a gallery (the recipe's "
                         "[retrieve]): embed the gallery (resumable), search, select, clean -> manifest.jsonl")
    _add_recipe_args(ret)
    ret.add_argument("--stage", metavar="NAME", help="multi-stage recipes: the retrieval stage to run (default: the "
                     "one stage that sets [stages.retrieve]); it writes into <output-dir>/NAME")
    ret.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    ev = sub.add_parser("eval", help="evaluate a run's student (and teacher) with the recipe's [eval] evaluators")
    ev.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding recipe.toml and last.pt")
    ev.add_argument("--checkpoint", metavar="PATH", help="weights to evaluate (default: RUN_DIR/last.pt)")
    ev.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override the run's recipe, e.g. --set eval.features='mean_patch' (repeatable)")
    ev.add_argument("--no-teacher", action="store_true", help="evaluate the student only")
    ev.add_argument("--trust-recipe", action="store_true",
                    help="build the run's recipe even if it runs code from outside kdforge (a torch.hub repository, "
                    "a pickled checkpoint, pipe: shell commands): only for run directories whose origin you trust")
    ev.add_argument("--out", metavar="PATH", help="JSON to write (default: RUN_DIR/eval_<checkpoint name>.json)")
    exp = sub.add_parser("export", help="write a run's student for use without kdforge: a timm / Hugging Face folder, "
                         "ONNX, TorchScript, torch.export (pt2), each checked against the student, with a model card")
    exp.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding recipe.toml and last.pt")
    exp.add_argument("--checkpoint", metavar="PATH", help="weights to export (default: RUN_DIR/last.pt)")
    exp.add_argument("--format", dest="formats", action="append", required=True, metavar="FORMAT",
                     help="timm (model.safetensors + config.json), onnx, torchscript or pt2; repeatable or "
                     "comma-separated, e.g. --format timm,onnx")
    exp.add_argument("--out", required=True, metavar="DIR", help="folder to create (must not exist, or be empty)")
    exp.add_argument("--keep-mask-token", action="store_true",
                     help="also write the student's mask token (mask_token.safetensors), for continued masked-image "
                     "training from the export")
    exp.add_argument("--trust-recipe", action="store_true",
                     help="build the run's recipe even if it runs code from outside kdforge (see kdforge eval -h)")
    diagnose = sub.add_parser("diagnose", help="look into a run: training curves, attention, loss landscape")
    diagnostics = diagnose.add_subparsers(dest="diagnostic", required=True)
    curves = diagnostics.add_parser("curves", help="plot loss terms, lr, throughput and evaluations against the step")
    curves.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding metrics.jsonl (or the file itself)")
    curves.add_argument("--out", metavar="PATH", help="image to write (default: RUN_DIR/curves.png; .pdf and .svg "
                        "work too)")
    attn = diagnostics.add_parser("attention", help="attention distance per head, similarity between heads and "
                                  "average attention maps of a run's student (papers/004) -> attention.png/.json")
    attn.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding recipe.toml and last.pt")
    attn.add_argument("--checkpoint", metavar="PATH", help="weights to load (default: RUN_DIR/last.pt)")
    attn.add_argument("--images", type=int, default=64, metavar="N", help="evaluation images to average over (64)")
    attn.add_argument("--out", metavar="PATH", help="image to write (default: RUN_DIR/attention.png; the JSON goes "
                      "beside it)")
    attn.add_argument("--trust-recipe", action="store_true",
                      help="build the run's recipe even if it runs code from outside kdforge (see kdforge eval -h)")
    land = diagnostics.add_parser("landscape", help="the run's distillation loss around its final weights along two "
                                  "filter-normalised random directions (papers/004, Li et al. 2018) -> "
                                  "landscape.png/.json")
    land.add_argument("run_dir", metavar="RUN_DIR", help="run directory holding recipe.toml and last.pt")
    land.add_argument("--checkpoint", metavar="PATH", help="weights to start from (default: RUN_DIR/last.pt)")
    land.add_argument("--grid", type=int, default=21, metavar="N", help="N x N points, N odd (21)")
    land.add_argument("--range", dest="radius", type=float, default=1.0, metavar="R",
                      help="alpha and beta span [-R, R], in filter-normalised units (1.0)")
    land.add_argument("--batches", type=int, default=4, metavar="B",
                      help="fixed training batches (of train.batch_size, evaluation transform) the loss averages (4)")
    land.add_argument("--seed", type=int, default=0, help="seed of the directions, the batches and the masks (0)")
    land.add_argument("--max-seconds", type=float, default=600.0, metavar="S",
                      help="time budget (600): the grid shrinks to fit after the first point, and the evaluation "
                      "stops with what is done when it runs out")
    land.add_argument("--out", metavar="PATH", help="image to write (default: RUN_DIR/landscape.png; the JSON goes "
                      "beside it)")
    land.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    land.add_argument("--trust-recipe", action="store_true",
                      help="build the run's recipe even if it runs code from outside kdforge (see kdforge eval -h)")
    plugins = sub.add_parser("plugins", help="list every registered component with its kind and origin")
    plugins.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("info", help="versions, devices and which op backends are available here (and why not)")
    return parser


def cmd_train(args) -> int:
    from kdforge.recipe import dump_toml, load_recipe

    recipe = load_recipe(args.recipe, overrides=args.overrides, profile=args.profile)
    if args.dry_run:
        sys.stdout.write(dump_toml(recipe))
        return 0
    if args.allow_changes and args.resume is None:
        raise KdforgeError("--allow-changes only applies to --resume")
    run_dir = Path(args.output_dir or recipe.run.output_dir or Path("runs") / recipe.run.name)

    from kdforge.engine import signals
    from kdforge.engine.trainer import Trainer

    if recipe.stages:
        return _train_stages(args, recipe, run_dir)
    if args.stage:
        raise KdforgeError(f"--stage {args.stage}: {args.recipe} has no [[stages]]; it is one stage, run it without "
                           "--stage")
    # SIGTERM is a stop request from here on: building the Trainer can take long (a first-use teacher's training).
    with signals.stop_on_sigterm():
        try:
            trainer = Trainer(recipe, run_dir, resume=args.resume, show_progress=not args.no_progress,
                              allow_changes=args.allow_changes)
        except signals.Preempted as exc:
            print(f"kdforge: {exc} (before the run started: nothing was written)", file=sys.stderr)
            return 0
        try:
            summary = trainer.fit()
        except signals.Preempted as exc:
            again = "--resume " if trainer.step > 0 else ""
            print(f"kdforge: {exc}; continue with: kdforge train {args.recipe} {again}--output-dir {run_dir}",
                  file=sys.stderr)
            return 0
        finally:
            trainer.close()
    if trainer.dist.is_main:
        shown = _shown(summary)
        print(json.dumps(shown, indent=2))
        print(f"run directory: {run_dir}  (summary.json, metrics.jsonl, curves.png, tb/, last.pt)")
    return 0


def _shown(summary: dict) -> dict:
    """What of a run's summary the terminal shows: its numbers, not the lists (per-class accuracies, confusion
    matrices, skipped files: those are in summary.json)."""
    return {k: v for k, v in summary.items() if k != "final_metrics" and not isinstance(v, (list, dict))}


def _train_stages(args, recipe, run_dir: Path) -> int:
    """``kdforge train`` of a multi-stage recipe (kdforge.engine.stages)."""
    from kdforge.engine import signals
    from kdforge.engine.stages import run_stages

    if args.resume not in (None, "auto"):
        raise KdforgeError("a multi-stage run resumes from its run directory: use --resume without a checkpoint path "
                           "(each stage continues from its own last.pt)")
    with signals.stop_on_sigterm():
        try:
            summary = run_stages(recipe, run_dir, resume=args.resume is not None, only=args.stage,
                                 show_progress=not args.no_progress, allow_changes=args.allow_changes)
        except signals.Preempted as exc:
            stage = f" --stage {args.stage}" if args.stage else ""
            print(f"kdforge: {exc}; continue with: kdforge train {args.recipe} --resume{stage} --output-dir {run_dir}",
                  file=sys.stderr)
            return 0
    if summary:
        for name, stage in summary["stages"].items():
            shown = _shown(stage)
            print(json.dumps({name: shown}, indent=2))
        print(f"run directory: {run_dir}  (summary.json; one sub-directory per stage: "
              f"{', '.join(summary['stages']) or 'none finished'})")
    return 0


def cmd_retrieve(args) -> int:
    from kdforge.engine import signals
    from kdforge.recipe import dump_toml, load_recipe
    from kdforge.retrieval.pipeline import run_retrieval

    recipe = load_recipe(args.recipe, overrides=args.overrides, profile=args.profile)
    run_dir = Path(args.output_dir or recipe.run.output_dir or Path("runs") / recipe.run.name)
    target, out = recipe, run_dir
    if recipe.stages:
        from kdforge.recipe.stages import stage_recipes

        found = [s for s in stage_recipes(recipe, run_dir) if s.kind == "retrieve"]
        names = [s.name for s in found]
        if args.stage:
            found = [s for s in found if s.name == args.stage]
            if not found:
                raise KdforgeError(f"--stage {args.stage}: no retrieval stage of that name (retrieval stages: "
                                   f"{', '.join(names) or 'none'})")
        if len(found) != 1:
            raise KdforgeError(f"{args.recipe} has {len(found)} retrieval stages ({', '.join(names) or 'none'}): "
                               + ("name one with --stage" if found else "add [stages.retrieve] to one stage"))
        target, out = found[0].recipe, found[0].run_dir
    elif args.stage:
        raise KdforgeError(f"--stage {args.stage}: {args.recipe} has no [[stages]]")
    if not target.retrieve:
        raise KdforgeError(f"{args.recipe} has no [retrieve] table: add one (gallery, encoders, n, strategy; see "
                           "plugins/retrieval.toml)")
    if args.dry_run:
        sys.stdout.write(dump_toml(target))
        return 0
    with signals.stop_on_sigterm():
        try:
            summary = run_retrieval(target, out, show_progress=not args.no_progress)
        except signals.Preempted as exc:
            print(f"kdforge: {exc}; the finished gallery shards are kept: run the same command again to continue",
                  file=sys.stderr)
            return 0
    if summary:
        print(json.dumps(summary, indent=2))
        print(f"retrieved into {out}  (manifest.jsonl, retrieval.json, report.json, summary.json); train on it with "
              f"data = {{plugin = \"retrieved\", manifest = \"{out}\"}}")
    return 0


def cmd_eval(args) -> int:
    import torch

    from kdforge.engine.distributed import pick_device
    from kdforge.engine.runs import load_run_student
    from kdforge.eval import Encoder, evaluate_encoders
    from kdforge.plugins import get_registry

    builds = ["student", "eval.data"] + ([] if args.no_teacher else ["teacher"])
    student, recipe = load_run_student(args.run_dir, args.checkpoint, args.overrides, builds=builds,
                                       trust=args.trust_recipe)
    r = recipe.eval
    if not r.evaluators or not r.data:
        raise KdforgeError(
            "the run's recipe has no [eval.data] or [eval.evaluators]: add them, e.g. --set "
            "\"eval.data={plugin='image_folder', root='/data/imagenet'}\" "
            "--set \"eval.evaluators={knn={plugin='knn'}}\""
        )
    device = pick_device(recipe.run.device)
    student.to(device)
    encoders = {"student": Encoder(student, r.features)}
    if r.teacher and recipe.teacher and not args.no_teacher:
        torch.manual_seed(recipe.run.seed)  # as the trainer builds it (a random teacher stays reproducible)
        teacher = get_registry().create("teachers", recipe.teacher, "teacher").to(device)
        encoders["teacher"] = Encoder(teacher, r.features, role="teacher")
    from kdforge.engine.trainer import student_classes

    registry = get_registry()
    logits = {}
    if student_classes(student):  # the student's own classifier (a task-specific student): scored as is
        logits["student"] = lambda images: student(images).logits.float()
    else:
        for label, table in r.evaluators.items():
            if registry.get("evaluators", table.get("plugin"), f"eval.evaluators.{label}").reads == "logits":
                print(f"kdforge: note: eval.evaluators.{label} scores the classifier head the run trained with its "
                      "supervised loss, which kdforge eval does not rebuild: its result is in the run's "
                      "summary.json", file=sys.stderr)
    results = evaluate_encoders(encoders, r, recipe.augment, device=device, logits=logits)
    checkpoint = Path(args.checkpoint) if args.checkpoint else Path(args.run_dir) / "last.pt"
    report = {"checkpoint": str(checkpoint), "features": r.features}
    report.update({f"{who}_{k}": v for who, metrics in results.items() for k, v in metrics.items()})
    out = Path(args.out) if args.out else Path(args.run_dir) / f"eval_{checkpoint.stem}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"written to {out}")
    return 0


def cmd_export(args) -> int:
    import dataclasses

    from kdforge.export import export_run

    report = export_run(args.run_dir, args.out, args.formats, checkpoint=args.checkpoint,
                        keep_mask_token=args.keep_mask_token, trust=args.trust_recipe)
    print(json.dumps(dataclasses.asdict(report), indent=2))
    errors = ", ".join(f"{f} {c['max_abs_error']:.2g}" for f, c in report.checks.items())
    print(f"exported to {report.out}  ({', '.join(report.files)}; max abs error vs the student: {errors})")
    return 0


def diagnose_attention(args) -> str:
    from kdforge.diagnostics.attention import analyse_run

    if args.images < 1:
        raise KdforgeError(f"--images must be >= 1, got {args.images}")
    json_path, image = analyse_run(args.run_dir, checkpoint=args.checkpoint, num_images=args.images, out=args.out,
                                   trust=args.trust_recipe)
    return f"attention: {image} and {json_path}"


def diagnose_landscape(args) -> str:
    from kdforge.diagnostics.landscape import landscape_run

    json_path, image, land = landscape_run(
        args.run_dir, checkpoint=args.checkpoint, grid=args.grid, radius=args.radius, batches=args.batches,
        seed=args.seed, max_seconds=args.max_seconds, out=args.out, show_progress=not args.no_progress,
        trust=args.trust_recipe)
    done = "" if land.complete else f", {int(land.evaluated.sum())} evaluated"
    return (f"landscape: {image} and {json_path} ({len(land.alphas)} x {len(land.alphas)} points{done}, centre loss "
            f"{land.centre_loss:.6g}, {land.seconds:.1f} s)")


def diagnose_curves(args) -> str:
    from kdforge.diagnostics.curves import plot_curves

    return f"curves: {plot_curves(args.run_dir, args.out)}"


def cmd_diagnose(args) -> int:
    handler = {"curves": diagnose_curves, "attention": diagnose_attention,
               "landscape": diagnose_landscape}[args.diagnostic]
    # A diagnostic that works around damage (a half-written line) warns: say so as the rest of the CLI speaks.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = handler(args)
    for w in caught:
        print(f"kdforge: warning: {w.message}", file=sys.stderr)
    print(report)
    return 0


def cmd_plugins(args) -> int:
    from kdforge.plugins import get_registry

    registry = get_registry()
    rows = [(c.kind, c.name, c.origin) for c in registry.components()]
    if args.json:
        print(json.dumps([{"kind": k, "name": n, "origin": o} for k, n, o in rows], indent=2))
    else:
        w0 = max(len(r[0]) for r in rows)
        w1 = max(len(r[1]) for r in rows)
        for kind, name, origin in rows:
            print(f"{kind:<{w0}}  {name:<{w1}}  {origin}")
    for f in registry.failed:
        print(f"FAILED plugin '{f.name}' from {f.distribution}: {f.error}", file=sys.stderr)
    return 0


def cmd_info(args) -> int:
    import torch

    import kdforge

    print(f"kdforge {kdforge.__version__}, torch {torch.__version__} (CUDA build {torch.version.cuda}), "
          f"python {sys.version.split()[0]}")
    print(f"CUDA device: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none visible'}")
    from kdforge import _ext
    from kdforge.ops import available_backends

    info = _ext.build_info() if _ext.available() else {"status": _ext.unavailable_reason()}
    print("compiled extension kdforge._C: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if _ext.available() and _ext.cuda_unavailable_reason():
        print(f"  CUDA kernels: {_ext.cuda_unavailable_reason()}")

    print("op backends (ok, or why not):")
    for op, backends in available_backends().items():
        for backend, why in backends.items():
            print(f"  {op:<16} {backend:<10} {'ok' if why is None else why}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = dict(train=cmd_train, retrieve=cmd_retrieve, eval=cmd_eval, export=cmd_export, diagnose=cmd_diagnose,
                    plugins=cmd_plugins, info=cmd_info)
    handler = commands[args.command]
    try:
        return handler(args)
    except KdforgeError as exc:
        print(f"kdforge: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("kdforge: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
