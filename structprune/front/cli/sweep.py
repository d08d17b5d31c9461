"""``structprune sweep``: prune at several ratios, export, benchmark each, and plot speed-up
against ratio."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from structprune.config import PruneConfig, RunConfig
from structprune.deploy import bench
from structprune.errors import StructPruneError
from structprune.files import atomic_write_text
from structprune.front.cli.arguments import (
    exporter_arg,
    model_and_inputs,
    model_args,
    round_to,
    timing,
    timing_args,
)
from structprune.front.cli.bench import bench_dir
from structprune.front.models import export_signature
from structprune.front.runs import model_record, writable_parent
from structprune.front.workflow import prune_to_dir

HELP = "prune at several ratios, export, benchmark and plot"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("sweep", help=HELP)
    model_args(p)
    p.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7",
                   help="comma-separated fractions of channels to remove, one run each")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: one ratio_R folder per ratio, sweep.json and "
                        "sweep.png")
    p.add_argument("--round-to", type=round_to, default=1, metavar="N|auto",
                   help="keep channel counts that are multiples of N; 'auto' measures "
                        "1, 8, 16, 32, 64 on this machine's runtime (at the first --batch) "
                        "and keeps the fastest, at each ratio")
    p.add_argument("--exact-only", action="store_true",
                   help="prune only groups whose removal is exact (no approximate groups)")
    exporter_arg(p)
    timing_args(p)
    return p


def configs(args: argparse.Namespace) -> tuple[list[tuple[float, PruneConfig]], RunConfig]:
    """The pass config of each ratio and the run around each, built once from the flags."""
    try:
        ratios = [float(r) for r in args.ratios.split(",")]
    except ValueError as exc:
        raise StructPruneError(f"--ratios {args.ratios!r} must be comma-separated numbers") from exc
    base = PruneConfig(round_to=args.round_to, exact_only=args.exact_only,
                       capture_method=args.capture)
    run = RunConfig(exporter=args.exporter, tune_batch=(args.batch or [1])[0],
                    signature=export_signature(args.spec))
    return [(ratio, base.replace(ratio=ratio)) for ratio in ratios], run


def handle(args: argparse.Namespace) -> int:
    runs, run = configs(args)
    timing(args)
    out = Path(args.out)
    writable_parent(out)
    model, inputs = model_and_inputs(args)
    points = []
    for ratio, config in tqdm(runs, desc="sweep", unit="ratio", file=sys.stderr,
                              disable=not sys.stderr.isatty()):
        directory = out / f"ratio_{ratio:.2f}"
        prune_to_dir(model, inputs, directory, config, run=run,
                     record=model_record(args.spec, args.seed, args.weights))
        result = bench_dir(directory, args)
        bench.write(result, directory)
        points.append({"ratio": ratio, **result})
    sweep = {"spec": args.spec, "points": points}
    atomic_write_text(out / "sweep.json", json.dumps(sweep, indent=1) + "\n")
    bench.plot_sweep(sweep, out / "sweep.png")
    for p in points:
        for c in p["cells"]:
            print(f"ratio {p['ratio']:.2f}  {c['runtime']:24s} t={c['threads'] or '-'} "
                  f"b={c['batch']:<3d} speed-up {c['speedup']:.2f}x (ideal "
                  f"{p['ideal_speedup']:.2f}x)")
    print(f"wrote {out}/sweep.json and sweep.png")
    return 0


__all__ = ["HELP", "add_parser", "configs", "handle"]
