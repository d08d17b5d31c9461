"""structprune: structured channel pruning. Commands: prune, eval, train, finetune, bench,
sweep, analyze."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from structprune.accuracy import distributed
from structprune.accuracy.data import DataSplits, load_data
from structprune.accuracy.evaluate import evaluate, plot_confusion, predict
from structprune.core.analyse import analyse
from structprune.core.capture import capture
from structprune.core.plan import Plan, PlanSettings, check_ratio
from structprune.core.score import IMPORTANCE, NEEDS_DATA, NORMALIZE
from structprune.deploy import bench
from structprune.deploy.runtimes import RUNTIMES, make_target
from structprune.deploy.speed import IF_SLOWER
from structprune.errors import StructPruneError
from structprune.front.io import load
from structprune.front.models import build_model, default_input_shape, load_weights, parse_shape
from structprune.front.workflow import (
    SPARSITY,
    demo,
    finetune_dir,
    prune_to_dir,
    train_to_dir,
    writable_parent,
)
from structprune.tree import random_inputs

EXIT_USER_ERROR = 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", metavar="SPEC",
                       help="torchvision:NAME, timm:NAME, ultralytics:yolov8n.yaml (or a .pt "
                            "checkpoint), structprune:NAME or path/to/file.py:FACTORY")
        p.add_argument("--input-shape", action="append", default=None, metavar="N,C,H,W",
                       help="shape of one forward() input; repeat for several (default "
                            "1,3,224,224; 1,3,640,640 for ultralytics detectors)")
        p.add_argument("--verbose", action="store_true",
                       help="on an error, also print its full detail (the traceback)")
        p.add_argument("--weights", help="state_dict file to load (read with weights_only=True)")
        p.add_argument("--seed", type=int, default=0, help="seed for zoo models' random weights")
        p.add_argument("--capture", choices=["auto", "fx", "export"], default="auto",
                       help="fx tracing, torch.export, or fx with torch.export as fallback")

    def data_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--data", metavar="SOURCE",
                       help="digits, an ImageFolder directory, or file.py:FACTORY returning "
                            "(train_loader, val_loader)")
        p.add_argument("--batch-size", type=int, default=None, help="batch size of --data")
        p.add_argument("--calibration-batches", type=int, default=8,
                       help="training batches the data-driven criteria read")

    def timing_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--batch", type=int, action="append", default=None,
                       help="batch size; repeatable (default 1 and 32)")
        p.add_argument("--threads", type=int, action="append", default=None,
                       help="ONNX Runtime intra-op threads; repeatable (default 1 and all cores)")
        p.add_argument("--repeats", type=int, default=10, help="timed pairs per cell")
        p.add_argument("--warmup", type=int, default=2)
        p.add_argument("--max-seconds", type=float, default=30.0,
                       help="stop repeating a cell after this long (at least 3 pairs)")
        p.add_argument("--no-torch", action="store_true", help="skip torch on CUDA")
        p.add_argument("--no-openvino", action="store_true",
                       help="skip OpenVINO CPU (timed when openvino is installed)")

    p = sub.add_parser("prune", help="prune a model and write plan, weights and ONNX files")
    model_args(p)
    p.add_argument("--ratio", type=float, default=None, help="fraction of channels to remove")
    p.add_argument("--plan", metavar="FILE", help="apply this plan.json instead of making one")
    p.add_argument("--simplify", action="store_true",
                   help="fold constants (BN into conv, ...) in the ONNX files")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--exact-only", action="store_true",
                   help="prune only groups whose removal is exact (no approximate groups)")
    p.add_argument("--round-to", type=_round_to, default=1, metavar="N|auto",
                   help="keep channel counts that are multiples of N; 'auto' measures "
                        "1, 8, 16, 32, 64 on this machine's runtime and keeps the fastest")
    p.add_argument("--tune-batch", type=int, default=1,
                   help="batch size used to time candidates with --round-to auto")
    p.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="module (or glob) whose parameters stay untouched; repeatable")
    p.add_argument("--global", dest="global_ranking", action="store_true",
                   help="rank channels across all groups instead of per group")
    p.add_argument("--criterion", "--importance", dest="criterion", default="l2",
                   help="importance of a channel: " + ", ".join(IMPORTANCE))
    p.add_argument("--normalize", default="mean",
                   help="scale of each group's scores for --global, --threshold and budgets: "
                        + ", ".join(NORMALIZE))
    p.add_argument("--threshold", type=float, help="remove units whose normalised importance "
                   "is below this (instead of --ratio)")
    p.add_argument("--macs-budget", type=float, metavar="F",
                   help="keep at most this fraction of the dense MACs (instead of --ratio)")
    p.add_argument("--params-budget", type=float, metavar="F",
                   help="keep at most this fraction of the dense parameters")
    p.add_argument("--auto", action="store_true",
                   help="with --data and --macs-budget: per-group ratios from the measured "
                        "sensitivity of each group (writes sensitivity.json and .png)")
    data_args(p)
    p.add_argument("--steps", type=int, default=1,
                   help="reach --ratio in this many steps, fine-tuning between them")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="epochs of fine-tuning on --data after each step")
    p.add_argument("--distill", action="store_true",
                   help="fine-tune between steps distilled from the dense model")
    p.add_argument("--recover", metavar="none|bn|bias|lsq[,...]",
                   help="after surgery, without training: re-estimate BN statistics (bn), fold "
                        "removed channels' mean into biases (bias) or refit consumers by least "
                        "squares (lsq); default bn with --data, none without")
    p.add_argument("--min-width", type=int, default=1, help="fewest channels a group keeps")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX files")
    t = p.add_argument_group("speed on a target runtime")
    t.add_argument("--target", metavar="RUNTIME",
                   help="measure every latency decision on this runtime: " + ", ".join(RUNTIMES)
                        + "; widths come from its measured latency table, and the pruned model "
                        "is timed against dense there before anything is written")
    t.add_argument("--target-speedup", type=float, metavar="X",
                   help="with --target: prune until the model runs X times faster than dense")
    t.add_argument("--target-latency", type=float, metavar="MS",
                   help="with --target: prune until the model runs in MS milliseconds")
    t.add_argument("--threads", type=int, default=None,
                   help="with a CPU --target: intra-op threads (default all cores)")
    t.add_argument("--batch", type=int, default=1, help="with --target: batch size timed")
    t.add_argument("--if-slower", choices=IF_SLOWER, default="fix",
                   help="with --target, when the pruned model is not faster than dense: fix "
                        "it by narrower fast widths (default) or fail (exit 2, nothing written)")

    b = sub.add_parser("bench", help="latency of dense.onnx against pruned.onnx in DIR")
    b.add_argument("dir", metavar="DIR", help="output directory of `structprune prune`")
    timing_args(b)

    s = sub.add_parser("sweep", help="prune at several ratios, export, benchmark and plot")
    model_args(s)
    s.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    s.add_argument("--out", required=True, metavar="DIR")
    s.add_argument("--round-to", type=int, default=1, metavar="N")
    s.add_argument("--exact-only", action="store_true")
    s.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto")
    timing_args(s)

    e = sub.add_parser("eval", help="accuracy, recall and F1 of dense and pruned models in DIR")
    e.add_argument("dir", metavar="DIR", help="output directory of `structprune prune`")
    data_args(e)

    d = sub.add_parser("demo", help="train the digits CNN, prune, recover, fine-tune and "
                                    "compare dense and pruned (nothing downloaded)")
    d.add_argument("--out", metavar="DIR", help="write report.json, plan, weights, ONNX files")
    d.add_argument("--ratio", type=float, default=0.5)
    d.add_argument("--epochs", type=int, default=3)
    d.add_argument("--finetune-epochs", type=int, default=3)
    d.add_argument("--recover", default="lsq,bn")
    d.add_argument("--no-distill", action="store_true")
    d.add_argument("--seed", type=int, default=0)

    t = sub.add_parser("train", help="train a model on data, optionally with sparsity "
                                     "regularisation over its coupled groups")
    model_args(t)
    data_args(t)
    t.add_argument("--epochs", type=int, required=True)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--sparsity", default="none",
                   help="none, bn (L1 on BatchNorm scales) or group (group lasso per group)")
    t.add_argument("--strength", type=float, default=1e-4, help="weight of the regulariser")
    t.add_argument("--out", required=True, metavar="DIR")

    f = sub.add_parser("finetune", help="fine-tune the pruned model in DIR, optionally "
                                        "distilled from the dense one")
    f.add_argument("dir", metavar="DIR", help="output directory of `structprune prune`")
    data_args(f)
    f.add_argument("--epochs", type=int, required=True)
    f.add_argument("--lr", type=float, default=1e-3)
    f.add_argument("--distill", action="store_true",
                   help="distil from the dense model (KL on softened logits)")
    f.add_argument("--temperature", type=float, default=4.0)
    f.add_argument("--distill-weight", type=float, default=0.5)
    f.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoint.safetensors (written after every epoch)")
    f.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto")

    a = sub.add_parser("analyze", help="list pruning groups and what is left unpruned, and why")
    model_args(a)
    a.add_argument("--json", action="store_true", help="print the analysis as JSON")
    return parser



def _round_to(text: str) -> int | str:
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("must be an integer or 'auto'") from exc


def _model_and_inputs(args: argparse.Namespace):

    shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape \
        else [default_input_shape(args.spec)]
    model = build_model(args.spec, args.seed)
    if args.weights:
        load_weights(model, args.weights)
    model.eval()
    return model, random_inputs(shapes, seed=args.seed)


def _check_settings(args: argparse.Namespace) -> None:
    """Refuse bad settings before any work, one line each."""
    modes = [m for m in ("ratio", "threshold", "macs_budget", "params_budget", "target_speedup",
                         "target_latency") if getattr(args, m) is not None]
    if not modes and not args.plan:
        raise StructPruneError("say what goes: --ratio 0.5, --threshold T, --macs-budget F, "
                               "--params-budget F, --target-speedup X, --target-latency MS "
                               "or --plan plan.json")
    if args.plan and not Path(args.plan).is_file():
        raise StructPruneError(f"--plan {args.plan} does not exist")
    if len(modes) > 1:
        raise StructPruneError("give one of --ratio, --threshold, --macs-budget, "
                               "--params-budget, --target-speedup and --target-latency, not "
                               f"{len(modes)}")
    _check_target(args)
    if args.criterion not in IMPORTANCE:
        raise StructPruneError(f"unknown criterion {args.criterion!r}: use one of "
                               + ", ".join(IMPORTANCE))
    if args.normalize not in NORMALIZE:
        raise StructPruneError(f"unknown --normalize {args.normalize!r}: use one of "
                               + ", ".join(NORMALIZE))
    if args.criterion in NEEDS_DATA and not args.data:
        raise StructPruneError(f"criterion {args.criterion} needs calibration data: pass "
                               "--data digits, an ImageFolder directory or file.py:FACTORY")
    if args.auto and not (args.data and args.macs_budget is not None):
        raise StructPruneError("--auto measures sensitivity on data to meet a MACs budget: "
                               "give --data and --macs-budget")
    if args.steps < 1 or args.finetune_epochs < 0:
        raise StructPruneError("--steps must be 1 or more and --finetune-epochs 0 or more")
    if args.steps > 1 and (args.ratio is None or args.auto):
        raise StructPruneError("--steps reaches a --ratio step by step: give --ratio")
    if args.finetune_epochs and not args.data:
        raise StructPruneError("--finetune-epochs needs --data")
    if args.recover and args.recover != "none" and not args.data:
        raise StructPruneError("--recover needs calibration data: pass --data")
    if args.ratio is not None:
        check_ratio(args.ratio, "--ratio")
    if args.round_to != "auto" and args.round_to < 1:
        raise StructPruneError(f"--round-to {args.round_to} must be 1 or more")
    PlanSettings(min_width=args.min_width, threshold=args.threshold,
                 macs_budget=args.macs_budget, params_budget=args.params_budget).validate()


def _check_target(args: argparse.Namespace) -> None:
    """--target and its settings, refused before any work (an unavailable runtime too)."""
    if args.target is None:
        if args.target_speedup is not None or args.target_latency is not None:
            raise StructPruneError("a speed target is measured on a runtime: add --target "
                                   "ort-cpu (or another of " + ", ".join(RUNTIMES) + ")")
        if args.threads is not None or args.batch != 1:
            raise StructPruneError("--threads and --batch set the --target runtime: add "
                                   "--target")
        return
    if args.target_speedup is not None and not args.target_speedup > 1:
        raise StructPruneError(f"--target-speedup {args.target_speedup} must be above 1 "
                               "(2 means twice as fast as dense)")
    if args.target_latency is not None and not args.target_latency > 0:
        raise StructPruneError(f"--target-latency {args.target_latency} must be a positive "
                               "number of milliseconds")
    if args.round_to == "auto" and args.ratio is None:
        raise StructPruneError("--round-to auto times whole candidates at a --ratio: give "
                               "--ratio, or drop --round-to auto to search widths per group")
    if args.plan or args.steps > 1 or args.auto:
        raise StructPruneError("--target chooses the widths itself: it does not combine with "
                               "--plan, --steps or --auto")
    args.target = make_target(args.target, args.threads, args.batch)


def _require_data(args: argparse.Namespace, command: str) -> None:
    """A command that cannot go without --data says so before any work."""
    if not args.data:
        raise StructPruneError(f"{command} needs --data: digits, an ImageFolder directory or "
                               "file.py:FACTORY")


def _data(args: argparse.Namespace, model: Any, inputs: tuple) -> DataSplits | None:
    """The --data splits, shaped like the model's input, checked against its outputs."""
    if not args.data:
        return None
    splits = load_data(args.data, tuple(inputs[0].shape), seed=args.seed if "seed" in args
                       else 0, batch_size=args.batch_size)
    first = next(iter(splits.val), None)
    if first is None:
        raise StructPruneError(f"--data {args.data} has no validation samples")
    predict(model, [first], num_classes=splits.num_classes)  # one batch: class count agrees
    return splits


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, row in enumerate(rows):
        lines.append("  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(row)))
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _human(n: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return f"{n:.0f}"


def cmd_prune(args: argparse.Namespace) -> int:
    _check_settings(args)
    out = Path(args.out)
    writable_parent(out)
    model, inputs = _model_and_inputs(args)
    data = _data(args, model, inputs)
    steps = (1 if args.no_onnx else 3) + (data is not None)
    with tqdm(total=steps, desc="structprune", unit="step", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        def progress(step: str) -> None:  # called as each step starts
            if not step.startswith("prune + verify"):
                bar.update()  # the step before it is done
            bar.set_postfix_str(step)

        result, figures = prune_to_dir(
            model, inputs, out, ratio=args.ratio, plan=Plan.load(args.plan) if args.plan else None,
            round_to=args.round_to, tune_batch=args.tune_batch, exporter=args.exporter,
            simplify=args.simplify, onnx=not args.no_onnx, data=data, auto=args.auto,
            steps=args.steps, finetune_epochs=args.finetune_epochs, distill=args.distill,
            recover_with=args.recover and (args.recover.split(",") if "," in args.recover
                                           else args.recover),
            record=_record(args), progress=progress, importance=args.criterion,
            normalize=args.normalize, calibration_batches=args.calibration_batches,
            threshold=args.threshold, macs_budget=args.macs_budget,
            params_budget=args.params_budget, global_ranking=args.global_ranking,
            min_width=args.min_width, ignore=args.ignore, exact_only=args.exact_only,
            capture_method=args.capture, seed=args.seed, target=args.target,
            target_speedup=args.target_speedup, target_latency=args.target_latency,
            if_slower=args.if_slower)
        bar.update()
    _print_report(args.spec, figures, result, out)
    return 0


def _record(args: argparse.Namespace) -> dict[str, Any]:
    """What ``bench`` needs to rebuild the dense model."""
    return {"spec": args.spec, "seed": args.seed,
            "weights": str(Path(args.weights).resolve()) if args.weights else None}


def _print_report(spec: str, f: dict[str, Any], result, out: Path) -> None:
    rows = [("", "dense", "pruned"),
            ("parameters", _human(f["params_dense"]), _human(f["params_pruned"])),
            ("MACs", _human(f["macs_dense"]), _human(f["macs_pruned"])),
            ("MACs kept", "100.0%", f"{100 * f['macs_ratio']:.1f}%"),
            ("groups pruned", "", f"{f['groups_pruned']} of {f['prunable_groups']} prunable"),
            ("approximate groups pruned", "", str(f["approximate_groups_pruned"]))]
    if "metrics" in f:
        rows += _metric_rows(f["metrics"])[1:]
    print(f"structprune: {spec} (captured with {f['capture']})")
    print(_table(rows))
    if "rounding" in f:
        r = f["rounding"]
        cands = ", ".join(f"{c['round_to']}: {c['speedup']:.2f}x" for c in r["candidates"])
        print(f"round_to {r['chosen']} chosen by timing on {r['runtime']} batch {r['batch']} "
              f"(speed-up over dense per candidate: {cands})")
    if "target" in f:
        print(_target_lines(f["target"]))
    if f.get("recovery"):
        r = f["recovery"]
        print(f"recovery: {', '.join(r['method'])} (output MSE against the dense model "
              f"{r['output_mse_before']:.3g} -> {r['output_mse_after']:.3g})")
    v = result.verification
    scope = "whole plan" if v and v.exact_units_only else "exact part of the plan"
    if v:
        print(f"verification: {'OK' if v.ok else 'FAILED'} against the masked dense model "
              f"({scope}), max relative error {v.max_rel_error:.1e}")
    if "onnx_rel_error" in f:
        print(f"ONNX: pruned.onnx matches torch in ONNX Runtime, relative error "
              f"{f['onnx_rel_error']:.1e} ({f['exporter_pruned']} exporter)")
    seconds = sum(f["seconds"].values())
    print(f"pass time {seconds:.2f}s; wrote {out}/: " + ", ".join(sorted(p.name for p in out.iterdir())))


def _target_lines(t: dict[str, Any]) -> str:
    """What the target run measured and predicted, in three lines."""
    m, lm = t["measured"], t["latency_model"]
    target = t["target"]
    where = (f"{target['runtime']}" + (f", {target['threads']} threads" if target["threads"]
                                       else "") + f", batch {target['batch']}")
    goal = (f"goal {t['goal_speedup']:g}x {'met' if t['met'] else 'NOT met'}"
            if t["goal_speedup"] else
            f"goal {t['goal_latency_ms']:g} ms {'met' if t['met'] else 'NOT met'}"
            if t["goal_latency_ms"] else "faster than dense" if t["faster"] else "NOT faster")
    table = lm["table"]
    return (f"target {where}: dense {m['dense_ms']:.2f} ms, pruned {m['pruned_ms']:.2f} ms, "
            f"speed-up {m['speedup']:.2f}x (p10-p90 {m['speedup_p10']:.2f}-"
            f"{m['speedup_p90']:.2f}, {m['pairs']} interleaved pairs); {goal}\n"
            f"latency model (sum of {lm['layers']} layers): dense {lm['dense_predicted_ms']:.2f} "
            f"ms predicted / {lm['dense_measured_ms']:.2f} measured, pruned "
            f"{lm['pruned_predicted_ms']:.2f} / {lm['pruned_measured_ms']:.2f}; "
            f"{len(t['attempts'])} measured attempt(s)\n"
            f"latency table {table['path']}: {table['entries']} layers, {table['measured']} "
            f"measured now ({table['measure_seconds']:.1f} s)")


def cmd_analyze(args: argparse.Namespace) -> int:

    model, inputs = _model_and_inputs(args)
    analysis = analyse(capture(model, inputs, method=args.capture))
    data = {"summary": analysis.summary(), "groups": [g.to_json() for g in analysis.groups]}
    if args.json:
        print(json.dumps(data, indent=1))
        return 0
    s = data["summary"]
    print(f"structprune: {args.spec} (captured with {s['capture']})")
    print(f"{s['groups']} groups: {s['exact_groups']} exact, {s['approximate_groups']} "
          f"approximate, {s['blocked_groups']} left unpruned")
    for g in analysis.groups:
        status = ("unpruned" if g.blocked.all() else
                  "approximate" if g.approximate.any() else "exact")
        lead = ", ".join(f"{n}:{d}" for n, d in g.members[:3])
        more = f" +{len(g.members) - 3}" if len(g.members) > 3 else ""
        print(f"  [{g.index:3d}] {status:11s} {g.size:5d} units  {lead}{more}")
        for reason, nodes in g.reasons.items():
            print(f"        {reason} (at {', '.join(sorted(set(nodes))[:3])})")
    return 0


def _timing(args: argparse.Namespace) -> dict[str, Any]:
    for name in ("repeats", "warmup"):
        if getattr(args, name) < (1 if name == "repeats" else 0):
            raise StructPruneError(f"--{name} must be at least {1 if name == 'repeats' else 0}")
    for b in args.batch or []:
        if b < 1:
            raise StructPruneError(f"--batch {b} must be 1 or more")
    return {"repeats": args.repeats, "warmup": args.warmup, "max_seconds": args.max_seconds}


def _read_report(directory: Path) -> dict[str, Any]:
    """The report.json of a `structprune prune` output directory."""
    report_path = directory / "report.json"
    if not report_path.is_file():
        raise StructPruneError(f"{directory} has no report.json: run `structprune prune ... "
                               f"--out {directory}` first")
    try:
        report = json.loads(report_path.read_text())
        report["spec"], report["input_shapes"]  # noqa: B018 - both must be there
    except (ValueError, KeyError, TypeError) as exc:
        raise StructPruneError(f"{report_path} is not a structprune report ({type(exc).__name__}"
                               f": {exc}): run `structprune prune ... --out {directory}` again"
                               ) from exc
    return report


def _dense_and_pruned(directory: Path, report: dict[str, Any]) -> tuple[Any, Any]:
    """The dense model the report names (its seed and weights) and the pruned one saved."""
    dense = build_model(report["spec"], report.get("seed", 0))
    if report.get("weights"):
        load_weights(dense, report["weights"])
    return dense, load(directory, copy.deepcopy(dense))


def _bench_dir(directory: Path, args: argparse.Namespace, bar=None) -> dict[str, Any]:
    report = _read_report(directory)
    for name in ("dense.onnx", "pruned.onnx"):
        if not (directory / name).is_file():
            raise StructPruneError(f"{directory / name} is missing: prune again without --no-onnx")
    torch_models = None
    if torch.cuda.is_available() and not args.no_torch:
        torch_models = _dense_and_pruned(directory, report)

    def progress(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(text)
            bar.update()

    return bench.bench(directory / "dense.onnx", directory / "pruned.onnx",
                       report["input_shapes"], report.get("macs_ratio"),
                       batches=args.batch or (1, 32), threads=args.threads,
                       torch_models=torch_models, progress=progress,
                       openvino=not args.no_openvino, **_timing(args))


def cmd_eval(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    _require_data(args, "eval")
    report = _read_report(directory)
    dense, pruned = _dense_and_pruned(directory, report)
    inputs = random_inputs(report["input_shapes"])
    args.seed = report.get("seed", 0)
    data = _data(args, dense, inputs)
    scores = {"dense": evaluate(dense, data.val), "pruned": evaluate(pruned, data.val)}
    plot_confusion(scores, directory / "confusion.png", data.classes)
    result = {"data": data.summary(), **{k: m.to_json() for k, m in scores.items()}}
    (directory / "eval.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"structprune: {report['spec']} on {data.summary()}")
    print(_table(_metric_rows(result)))
    print(f"wrote {directory}/eval.json and confusion.png")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    check_ratio(args.ratio, "--ratio")
    if args.out:
        writable_parent(Path(args.out))
    demo(args.out, ratio=args.ratio, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
         recover_with=args.recover.split(","), distill=not args.no_distill, seed=args.seed)
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    distributed.start()  # under torchrun --nproc_per_node N: one rank per process
    _require_data(args, "train")
    if args.sparsity not in SPARSITY:
        raise StructPruneError(f"unknown --sparsity {args.sparsity!r}: use one of "
                               + ", ".join(SPARSITY))
    writable_parent(Path(args.out))
    model, inputs = _model_and_inputs(args)
    data = _data(args, model, inputs)
    summary = train_to_dir(model, inputs, data, args.out, args.epochs,
                           sparsity=args.sparsity, strength=args.strength, lr=args.lr,
                           seed=args.seed, record={"spec": args.spec})
    m = summary["metrics"]
    if distributed.rank() != 0:
        return 0
    print(f"structprune: trained {args.spec} for {args.epochs} epochs (sparsity "
          f"{args.sparsity}) on {data.summary()}: top-1 accuracy {100 * m['accuracy']:.2f}%, "
          f"macro F1 {m['macro_f1']:.4f}")
    print(f"wrote {args.out}/weights.safetensors and train.json; prune it with "
          f"`structprune prune {args.spec} --weights {args.out}/weights.safetensors ...`")
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    distributed.start()  # under torchrun --nproc_per_node N: one rank per process
    directory = Path(args.dir)
    _require_data(args, "finetune")
    report = _read_report(directory)
    dense, _ = _dense_and_pruned(directory, report)
    args.seed = report.get("seed", 0)
    data = _data(args, dense, random_inputs(report["input_shapes"]))
    record = finetune_dir(directory, dense, data, args.epochs, distill=args.distill,
                          temperature=args.temperature, distill_weight=args.distill_weight,
                          lr=args.lr, resume=args.resume, exporter=args.exporter,
                          seed=args.seed)
    if distributed.rank() != 0:
        return 0
    rows = [("", "dense", "pruned before", "pruned after")]
    for label, key, scale, fmt in (("top-1 accuracy", "accuracy", 100, "{:.2f}%"),
                                   ("macro F1", "macro_f1", 1, "{:.4f}")):
        rows.append((label, *(fmt.format(scale * record[which][key])
                              for which in ("dense", "before", "after"))))
    print(f"structprune: fine-tuned {directory} for {args.epochs} epochs"
          + (" with distillation" if args.distill else "") + f" on {data.summary()}")
    print(_table(rows))
    if "onnx_rel_error" in record:
        print(f"ONNX: pruned.onnx re-exported, relative error {record['onnx_rel_error']:.1e}")
    print(f"wrote {directory}/pruned.safetensors, report.json, checkpoint.safetensors")
    return 0


def _metric_rows(metrics: dict[str, Any]) -> list[tuple[str, str, str]]:
    d, p = metrics["dense"], metrics["pruned"]
    rows = [("", "dense", "pruned"),
            ("top-1 accuracy", f"{100 * d['accuracy']:.2f}%", f"{100 * p['accuracy']:.2f}%"),
            ("macro F1", f"{d['macro_f1']:.4f}", f"{p['macro_f1']:.4f}"),
            ("lowest class recall", f"{min(d['recall']):.3f}", f"{min(p['recall']):.3f}")]
    return rows


def _cells_expected(args: argparse.Namespace) -> int:

    threads = args.threads or sorted({1, os.cpu_count() or 1})
    n = len(threads) * len(args.batch or (1, 32))
    if bench.openvino_available() and not args.no_openvino:
        n *= 2
    if torch.cuda.is_available() and not args.no_torch:
        n += 4 * len(args.batch or (1, 32))
    return n


def cmd_bench(args: argparse.Namespace) -> int:


    directory = Path(args.dir)
    _timing(args)
    bar = tqdm(total=_cells_expected(args), desc="bench", unit="cell", file=sys.stderr,
               disable=not sys.stderr.isatty())
    result = _bench_dir(directory, args, bar)
    bar.close()
    bench.write(result, directory)
    print(bench.markdown(result), end="")
    print(f"wrote {directory}/bench.json, bench.md, bench.png")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError as exc:
        raise StructPruneError(f"--ratios {args.ratios!r} must be comma-separated numbers") from exc
    for r in ratios:
        check_ratio(r, "ratio in --ratios")
    _timing(args)
    out = Path(args.out)
    writable_parent(out)
    model, inputs = _model_and_inputs(args)
    points = []
    for ratio in tqdm(ratios, desc="sweep", unit="ratio", file=sys.stderr,
                      disable=not sys.stderr.isatty()):
        directory = out / f"ratio_{ratio:.2f}"
        prune_to_dir(model, inputs, directory, ratio=ratio, round_to=args.round_to,
                     exporter=args.exporter, record=_record(args), exact_only=args.exact_only,
                     capture_method=args.capture)
        result = _bench_dir(directory, args)
        bench.write(result, directory)
        points.append({"ratio": ratio, **result})
    sweep = {"spec": args.spec, "points": points}
    (out / "sweep.json").write_text(json.dumps(sweep, indent=1) + "\n")
    bench.plot_sweep(sweep, out / "sweep.png")
    for p in points:
        for c in p["cells"]:
            print(f"ratio {p['ratio']:.2f}  {c['runtime']:24s} t={c['threads'] or '-'} "
                  f"b={c['batch']:<3d} speed-up {c['speedup']:.2f}x (ideal {p['ideal_speedup']:.2f}x)")
    print(f"wrote {out}/sweep.json and sweep.png")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"prune": cmd_prune, "analyze": cmd_analyze, "bench": cmd_bench,
                "sweep": cmd_sweep, "eval": cmd_eval, "finetune": cmd_finetune,
                "train": cmd_train, "demo": cmd_demo}
    try:
        return commands[args.command](args)
    except StructPruneError as exc:
        print(f"structprune: error: {exc}", file=sys.stderr)
        if getattr(args, "verbose", False):
            traceback.print_exception(exc, file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
