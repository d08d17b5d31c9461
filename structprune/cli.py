"""structprune: structured channel pruning. Commands: prune, bench, sweep, analyze."""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import bench
from .analyse import analyse
from .capture import capture
from .errors import StructPruneError
from .io import load
from .models import build_model, load_weights, parse_shape
from .plan import Plan, check_ratio
from .tree import random_inputs
from .workflow import prune_to_dir, writable_parent

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="structprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("spec", metavar="SPEC",
                       help="torchvision:NAME, timm:NAME or path/to/file.py:FACTORY")
        p.add_argument("--input-shape", action="append", default=None, metavar="N,C,H,W",
                       help="shape of one forward() input; repeat for several (default 1,3,224,224)")
        p.add_argument("--weights", help="state_dict file to load (read with weights_only=True)")
        p.add_argument("--seed", type=int, default=0, help="seed for zoo models' random weights")
        p.add_argument("--capture", choices=["auto", "fx", "export"], default="auto",
                       help="fx tracing, torch.export, or fx with torch.export as fallback")

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
    p.add_argument("--importance", choices=["l1", "l2"], default="l2")
    p.add_argument("--min-width", type=int, default=1, help="fewest channels a group keeps")
    p.add_argument("--exporter", choices=["auto", "dynamo", "torchscript"], default="auto")
    p.add_argument("--no-onnx", action="store_true", help="skip the ONNX files")

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

    shapes = [parse_shape(s) for s in (args.input_shape or ["1,3,224,224"])]
    model = build_model(args.spec, args.seed)
    if args.weights:
        load_weights(model, args.weights)
    model.eval()
    return model, random_inputs(shapes, seed=args.seed)


def _check_settings(args: argparse.Namespace) -> None:
    if args.ratio is None and not args.plan:
        raise StructPruneError("give --ratio (e.g. --ratio 0.5) or --plan plan.json")
    if args.plan and not Path(args.plan).is_file():
        raise StructPruneError(f"--plan {args.plan} does not exist")
    if args.ratio is None:
        return
    check_ratio(args.ratio, "--ratio")
    if args.round_to != "auto" and args.round_to < 1:
        raise StructPruneError(f"--round-to {args.round_to} must be 1 or more")
    if args.min_width < 1:
        raise StructPruneError(f"--min-width {args.min_width} must be 1 or more")


def _table(rows: list[tuple[str, str, str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
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
    steps = 1 if args.no_onnx else 3
    with tqdm(total=steps, desc="structprune", unit="step", file=sys.stderr,
              disable=not sys.stderr.isatty()) as bar:
        def progress(step: str) -> None:  # called as each step starts
            if step != "prune + verify":
                bar.update()  # the step before it is done
            bar.set_postfix_str(step)

        result, figures = prune_to_dir(
            model, inputs, out, ratio=args.ratio, plan=Plan.load(args.plan) if args.plan else None,
            round_to=args.round_to, tune_batch=args.tune_batch, exporter=args.exporter,
            simplify=args.simplify, onnx=not args.no_onnx, record=_record(args),
            progress=progress, importance=args.importance, global_ranking=args.global_ranking,
            min_width=args.min_width, ignore=args.ignore, exact_only=args.exact_only,
            capture_method=args.capture)
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
    print(f"structprune: {spec} (captured with {f['capture']})")
    print(_table(rows))
    if "rounding" in f:
        r = f["rounding"]
        cands = ", ".join(f"{c['round_to']}: {c['speedup']:.2f}x" for c in r["candidates"])
        print(f"round_to {r['chosen']} chosen by timing on {r['runtime']} batch {r['batch']} "
              f"(speed-up over dense per candidate: {cands})")
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


def _bench_dir(directory: Path, args: argparse.Namespace, bar=None) -> dict[str, Any]:


    report_path = directory / "report.json"
    if not report_path.is_file():
        raise StructPruneError(f"{directory} has no report.json: run `structprune prune ... "
                               f"--out {directory}` first")
    try:
        report = json.loads(report_path.read_text())
        spec, input_shapes = report["spec"], report["input_shapes"]
    except (ValueError, KeyError, TypeError) as exc:
        raise StructPruneError(f"{report_path} is not a structprune report ({type(exc).__name__}"
                               f": {exc}): run `structprune prune ... --out {directory}` again"
                               ) from exc
    for name in ("dense.onnx", "pruned.onnx"):
        if not (directory / name).is_file():
            raise StructPruneError(f"{directory / name} is missing: prune again without --no-onnx")
    torch_models = None
    if torch.cuda.is_available() and not args.no_torch:
        dense = build_model(spec, report.get("seed", 0))
        if report.get("weights"):
            load_weights(dense, report["weights"])
        torch_models = (copy.deepcopy(dense), load(directory, dense))

    def progress(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(text)
            bar.update()

    return bench.bench(directory / "dense.onnx", directory / "pruned.onnx",
                       input_shapes, report.get("macs_ratio"),
                       batches=args.batch or (1, 32), threads=args.threads,
                       torch_models=torch_models, progress=progress, **_timing(args))


def _cells_expected(args: argparse.Namespace) -> int:

    threads = args.threads or sorted({1, os.cpu_count() or 1})
    n = len(threads) * len(args.batch or (1, 32))
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
    args = _parser().parse_args(argv)
    commands = {"prune": cmd_prune, "analyze": cmd_analyze, "bench": cmd_bench,
                "sweep": cmd_sweep}
    try:
        return commands[args.command](args)
    except StructPruneError as exc:
        print(f"structprune: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    sys.exit(main())
