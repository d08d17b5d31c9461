"""``structprune prune``: prune a model and write plan, weights and ONNX files into a folder.

The flags become the run's settings in one place (:func:`configs`): a
:class:`~structprune.config.PruneConfig` for the pass, a
:class:`~structprune.config.RunConfig` for what happens around it and, with ``--target``, a
:class:`~structprune.config.TargetConfig`. The configs check their values and combinations;
this module checks only what is about the flags themselves.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from structprune.config import IF_SLOWER, PruneConfig, RunConfig, TargetConfig
from structprune.core.api import PruneResult
from structprune.core.plan import Plan
from structprune.core.score import IMPORTANCE, NEEDS_DATA, NORMALIZE
from structprune.deploy.quantize import check as check_quantize
from structprune.deploy.runtimes import RUNTIMES, make_target
from structprune.errors import StructPruneError
from structprune.front.cli.arguments import (
    data_args,
    data_splits,
    exporter_arg,
    model_and_inputs,
    model_args,
    round_to,
)
from structprune.front.cli.output import fidelity_line, human, metric_rows, table
from structprune.front.cli.quantize import quantize_args, quantize_config
from structprune.front.models import export_signature
from structprune.front.quantize import summary_lines
from structprune.front.runs import model_record, writable_parent
from structprune.front.workflow import prune_to_dir

HELP = "prune a model and write plan, weights and ONNX files"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", help=HELP)
    model_args(p)
    p.add_argument("--ratio", type=float, default=None, help="fraction of channels to remove")
    p.add_argument("--plan", metavar="FILE", help="apply this plan.json instead of making one")
    p.add_argument("--simplify", action="store_true",
                   help="fold constants (BN into conv, ...) in the ONNX files")
    p.add_argument("--out", required=True, metavar="DIR", help="output directory")
    p.add_argument("--exact-only", action="store_true",
                   help="prune only groups whose removal is exact (no approximate groups)")
    p.add_argument("--round-to", type=round_to, default=1, metavar="N|auto",
                   help="keep channel counts that are multiples of N; 'auto' measures "
                        "1, 8, 16, 32, 64 on this machine's runtime (at --batch) and keeps "
                        "the fastest")
    p.add_argument("--ignore", action="append", default=[], metavar="NAME",
                   help="module (or glob) whose parameters stay untouched; repeatable")
    p.add_argument("--global", dest="global_ranking", action="store_true",
                   help="rank channels across all groups instead of per group")
    p.add_argument("--criterion", default="l2",
                   help="importance of a channel: " + ", ".join(IMPORTANCE) + " ("
                        + ", ".join(NEEDS_DATA) + " need --data, labels or not; obs: the "
                        "error left once consumers are refitted by least squares)")
    p.add_argument("--sequential", action="store_true",
                   help="with --criterion obs: choose each group's channels again on the "
                        "inputs the model pruned so far gives it, in graph order (same widths)")
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
                   help="reach --ratio's widths in this many steps, recovering (and with "
                        "--finetune-epochs fine-tuning) after each")
    p.add_argument("--finetune-epochs", type=int, default=0,
                   help="epochs of fine-tuning on --data after each step")
    p.add_argument("--distill", action="store_true",
                   help="fine-tune between steps distilled from the dense model")
    p.add_argument("--recover", metavar="none|bn|bias|lsq[,...]",
                   help="after surgery, without training: re-estimate BN statistics (bn), fold "
                        "removed channels' mean into biases (bias) or refit consumers by least "
                        "squares (lsq); default bn with --data, none without")
    p.add_argument("--memory-budget", metavar="BYTES|8G",
                   help="most memory recovery may allocate (lsq solves or skips the layers "
                        "that do not fit); default half of the memory available")
    p.add_argument("--min-width", type=int, default=1, help="fewest channels a group keeps")
    exporter_arg(p)
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX files")
    quantize_args(p, with_switch=True)
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
    t.add_argument("--batch", type=int, default=None, metavar="N",
                   help="batch size every latency is measured at, by --target and by "
                        "--round-to auto (default 1)")
    t.add_argument("--if-slower", choices=IF_SLOWER, default="fix",
                   help="with --target, when the pruned model is not faster than dense: fix "
                        "it by narrower fast widths (default) or fail (exit 2, nothing written)")
    return p


def configs(args: argparse.Namespace) -> tuple[PruneConfig, RunConfig, TargetConfig | None]:
    """The run's settings, built once from the flags and refused before any work, one line
    each: here what is about the flags themselves, in the configs their values and
    combinations."""
    modes = [m for m in ("ratio", "threshold", "macs_budget", "params_budget", "target_speedup",
                         "target_latency") if getattr(args, m) is not None]
    if not modes and not args.plan:
        raise StructPruneError("say what goes: --ratio 0.5, --threshold T, --macs-budget F, "
                               "--params-budget F, --target-speedup X, --target-latency MS "
                               "or --plan plan.json")
    if args.plan and not Path(args.plan).is_file():
        raise StructPruneError(f"--plan {args.plan} does not exist")
    if args.target is None:
        if args.target_speedup is not None or args.target_latency is not None:
            raise StructPruneError("a speed target is measured on a runtime: add --target "
                                   "ort-cpu (or another of " + ", ".join(RUNTIMES) + ")")
        if args.threads is not None:
            raise StructPruneError("--threads sets the --target runtime: add --target")
        if args.batch is not None and args.round_to != "auto":
            raise StructPruneError("--batch sets the batch --target and --round-to auto time "
                                   "at: add --target or --round-to auto")
    batch = 1 if args.batch is None else args.batch
    config = PruneConfig(
        ratio=args.ratio, threshold=args.threshold, macs_budget=args.macs_budget,
        params_budget=args.params_budget, global_ranking=args.global_ranking,
        round_to=args.round_to, min_width=args.min_width, ignore=tuple(args.ignore),
        exact_only=args.exact_only, criterion=args.criterion, normalize=args.normalize,
        calibration_batches=args.calibration_batches, seed=args.seed,
        sequential=args.sequential,
        capture_method=args.capture)
    target = TargetConfig(args.target, args.threads, batch, args.target_speedup,
                          args.target_latency, args.if_slower,
                          quantize=args.quantize is not None) if args.target else None
    run = RunConfig(steps=args.steps, finetune_epochs=args.finetune_epochs,
                    distill=args.distill, auto=args.auto, recover=args.recover,
                    memory_budget=args.memory_budget,
                    tune_batch=batch, exporter=args.exporter, simplify=args.simplify,
                    onnx=not args.no_onnx, quantize=quantize_config(args, args.quantize),
                    signature=export_signature(args.spec))
    run.check(config, target, plan_given=bool(args.plan), data_given=bool(args.data))
    if run.quantize is not None:  # an unknown quantize runtime before the model is built
        check_quantize(run.quantize)
    if target is not None:  # an unavailable runtime is refused before the model is built
        make_target(target.runtime, target.threads, target.batch, target.quantize)
    return config, run, target


def handle(args: argparse.Namespace) -> int:
    config, run, target = configs(args)
    out = Path(args.out)
    writable_parent(out)
    model, inputs = model_and_inputs(args)
    data = data_splits(args, model, inputs, seed=args.seed)
    steps = (1 if args.no_onnx else 3) + (data is not None) + (run.quantize is not None)
    with tqdm(total=steps, desc="structprune", unit="step", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        def progress(step: str) -> None:  # called as each step starts
            if not step.startswith("prune + verify"):
                bar.update()  # the step before it is done
            bar.set_postfix_str(step)

        result, figures = prune_to_dir(
            model, inputs, out, config, run=run, target=target,
            plan=Plan.load(args.plan) if args.plan else None, data=data,
            record=model_record(args.spec, args.seed, args.weights), progress=progress)
        bar.update()
    _print_report(args.spec, figures, result, out)
    return 0


def _print_report(spec: str, f: dict[str, Any], result: PruneResult, out: Path) -> None:
    rows = [("", "dense", "pruned"),
            ("parameters", human(f["params_dense"]), human(f["params_pruned"])),
            ("MACs", human(f["macs_dense"]), human(f["macs_pruned"])),
            ("MACs kept", "100.0%", f"{100 * f['macs_ratio']:.1f}%"),
            ("groups pruned", "", f"{f['groups_pruned']} of {f['prunable_groups']} prunable"),
            ("approximate groups pruned", "", str(f["approximate_groups_pruned"]))]
    if "metrics" in f:
        rows += metric_rows(f["metrics"])[1:]
    print(f"structprune: {spec} (captured with {f['capture']})")
    print(table(rows))
    if "fidelity" in f:
        print(fidelity_line(f["fidelity"]))
    if "quantize" in f:
        print("\n".join(summary_lines(f["quantize"])))
    if "rounding" in f:
        r = f["rounding"]
        cands = ", ".join(f"{c['round_to']}: {c['speedup']:.2f}x" for c in r["candidates"])
        print(f"round_to {r['chosen']} chosen by timing on {r['runtime']} batch {r['batch']} "
              f"(speed-up over dense per candidate: {cands})")
    if "target" in f:
        print(_target_lines(f["target"]))
    if f.get("recovery"):
        r = f["recovery"]
        undone = [s["method"] for s in r.get("steps", ()) if "undone" in s]
        print(f"recovery: {', '.join(r['method'])} (output MSE against the dense model on "
              f"{r['check']['samples']} held-out samples {r['output_mse_before']:.3g} -> "
              f"{r['output_mse_after']:.3g}" + (f"; undone, as it made it worse: "
                                                 f"{', '.join(undone)}" if undone else "") + ")")
    for step, r in enumerate(f.get("steps", {}).get("recovery", ()), 1):
        print(f"step {step} recovery: {', '.join(r['method'])} (output MSE against the "
              f"step's starting model {r['output_mse_before']:.3g} -> "
              f"{r['output_mse_after']:.3g})")
    v = result.verification
    scope = "whole plan" if v and v.exact_units_only else "exact part of the plan"
    if v:
        print(f"verification: {'OK' if v.ok else 'FAILED'} against the masked dense model "
              f"({scope}), max relative error {v.max_rel_error:.1e}")
    if "onnx_rel_error" in f:
        print(f"ONNX: pruned.onnx matches torch in ONNX Runtime, relative error "
              f"{f['onnx_rel_error']:.1e} ({f['exporter_pruned']} exporter; dense.onnx's own "
              f"{f['onnx_dense_rel_error']:.1e}, allowed {f['onnx_allowed_rel_error']:.1e})")
    seconds = sum(f["seconds"].values())
    print(f"pass time {seconds:.2f}s; wrote {out}/: "
          + ", ".join(sorted(p.name for p in out.iterdir())))


def _target_lines(t: dict[str, Any]) -> str:
    """What the target run measured and predicted, in three lines."""
    m, lm = t["measured"], t["latency_model"]
    target = t["target"]
    where = (f"{target['runtime']}" + (f", {target['threads']} threads" if target["threads"]
                                       else "") + f", batch {target['batch']}"
             + (", pruned in INT8 against dense in FP32" if target.get("int8") else ""))
    goal = (f"goal {t['goal_speedup']:g}x {'met' if t['met'] else 'NOT met'}"
            if t["goal_speedup"] else
            f"goal {t['goal_latency_ms']:g} ms {'met' if t['met'] else 'NOT met'}"
            if t["goal_latency_ms"] else "faster than dense" if t["faster"] else "NOT faster")
    cache = lm["table"]
    return (f"target {where}: dense {m['dense_ms']:.2f} ms, pruned {m['pruned_ms']:.2f} ms, "
            f"speed-up {m['speedup']:.2f}x (p10-p90 {m['speedup_p10']:.2f}-"
            f"{m['speedup_p90']:.2f}, {m['pairs']} interleaved pairs); {goal}\n"
            f"latency model (sum of {lm['layers']} layers): dense {lm['dense_predicted_ms']:.2f} "
            f"ms predicted / {lm['dense_measured_ms']:.2f} measured, pruned "
            f"{lm['pruned_predicted_ms']:.2f} / {lm['pruned_measured_ms']:.2f}; "
            f"{len(t['attempts'])} measured attempt(s)\n"
            f"latency table {cache['path']}: {cache['entries']} layers, {cache['measured']} "
            f"measured now ({cache['measure_seconds']:.1f} s)")


__all__ = ["HELP", "add_parser", "configs", "handle"]
