"""Pruning to a speed on ONNX Runtime CPU: structprune (plain, ``--round-to auto``,
``--target ort-cpu``) against Torch-Pruning (plain and ``round_to=8``), side by side in one
process.

For each model, ratio and thread count, the dense model and the five pruned ones are exported
with the same exporter (TorchScript, opset 17) and timed in interleaved rounds on ONNX
Runtime CPU at batch 1; per variant we record the median latency and the median and p10-p90
of the per-round speed-ups over dense (dense / variant, both timed in the same round). Then,
for each speed target, ``prune_for_target(speedup=X)`` runs and its own interleaved
measurement is recorded with the latency model's prediction. The latency table is the cached
one (``$STRUCTPRUNE_CACHE`` or ``~/.cache/structprune``).

Writes (merging per model) ``benchmarks/results/speed_targets_cpu<cores>.json``;
``benchmarks/tables.py`` renders it.

    python benchmarks/speed_targets.py --models resnet50 --size 224 --threads 1,2
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import structprune as sp
from structprune.config import TargetConfig
from structprune.deploy import bench
from structprune.deploy.export import export_onnx
from structprune.deploy.runtimes import Target
from structprune.deploy.speed import SlowerError, TargetError, prune_for_target
from structprune.deploy.tune import fastest_rounding

sys.path.insert(0, str(Path(__file__).resolve().parent))
from latency import build, macs, tp_prune  # noqa: E402

ROOT = Path(__file__).resolve().parent
VARIANTS = ("structprune", "structprune_auto", "structprune_target", "torch_pruning",
            "torch_pruning_r8")


def interleaved(models: dict, x: torch.Tensor, threads: int, repeats: int, tmp: Path,
                exported: dict[int, Path]) -> dict[str, dict]:
    """Every model timed in interleaved rounds; per model its median ms and the speed-up
    over dense within each round (median, p10, p90)."""
    runners = {}
    for key, model in models.items():
        path = exported.get(id(model))
        if path is None:
            path = tmp / f"{key}_{len(exported)}.onnx"
            export_onnx(model, (x,), path, exporter="torchscript", opset=17)
            exported[id(model)] = path
        runners[key] = bench.ort_runner(path, 1, [tuple(x.shape)], threads,
                                        "CPUExecutionProvider")
    times = bench.interleaved_many(list(runners.values()), warmup=2, repeats=repeats,
                                   max_seconds=240)
    by_key = dict(zip(runners, (np.array(t) for t in times), strict=True))
    dense = by_key["dense"]
    out = {}
    for key, t in by_key.items():
        ratio = dense / t
        out[key] = {"ms": float(np.median(t)), "speedup": float(np.median(ratio)),
                    "speedup_p10": float(np.percentile(ratio, 10)),
                    "speedup_p90": float(np.percentile(ratio, 90)), "rounds": len(t)}
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet50,mobilenet_v2")
    parser.add_argument("--ratios", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7")
    parser.add_argument("--speedups", default="1.25,1.5,2,3,4")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=8, help="interleaved rounds per cell")
    parser.add_argument("--target-repeats", type=int, default=10,
                        help="interleaved pairs per measurement inside prune_for_target")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    info = bench.machine()
    out = Path(args.out or ROOT / "results" / f"speed_targets_cpu{os.cpu_count()}.json")
    results = json.loads(out.read_text()) if out.exists() else {"rows": [], "targets": []}
    import torch_pruning as tp

    results.update({"machine": info, "date": dt.date.today().isoformat(),
                    "torch_pruning": tp.__version__, "exporter": "torchscript, opset 17",
                    "batch": 1, "runtime": "ort-cpu"})
    threads = [int(t) for t in args.threads.split(",")]
    models = args.models.split(",")
    ratios = [float(r) for r in args.ratios.split(",")] if args.ratios else []
    goals = [float(s) for s in args.speedups.split(",")] if args.speedups else []
    # this run's cells replace earlier ones of the same model, ratio (or goal) and threads
    results["rows"] = [r for r in results["rows"] if not (
        r["model"] in models and r["ratio"] in ratios and r["threads"] in threads)]
    results["targets"] = [r for r in results["targets"] if not (
        r["model"] in models and r["goal"] in goals and r["threads"] in threads)]
    results.setdefault("runs", []).append({"argv": sys.argv[1:], "size": args.size,
                                           "repeats": args.repeats,
                                           "target_repeats": args.target_repeats})
    x = torch.randn(1, 3, args.size, args.size)
    timing = {"repeats": args.target_repeats, "max_seconds": 120}
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            dense = build(name)
            exported: dict[int, Path] = {}
            for ratio in ratios:
                t0 = time.perf_counter()
                base = {"structprune": sp.prune(dense, (x,), ratio, check=False).model,
                        "torch_pruning": tp_prune(dense, x, ratio, None),
                        "torch_pruning_r8": tp_prune(dense, x, ratio, 8)}
                for n in threads:
                    target = Target("ort-cpu", n, 1)
                    auto = fastest_rounding(dense, (x,), ratio, runtime=target, repeats=6)
                    variants = {"dense": dense, **base, "structprune_auto": auto.model}
                    row = {"model": name, "size": args.size, "ratio": ratio, "threads": n,
                           "round_to_auto": auto.figures["rounding"]["chosen"]}
                    try:
                        targeted = prune_for_target(dense, (x,), TargetConfig(
                                                    "ort-cpu", n, 1), ratio=ratio,
                                                    exporter="torchscript", **timing)
                        variants["structprune_target"] = targeted.model
                        t = targeted.figures["target"]
                        row.update({"target_attempts": t["attempts"],
                                    "target_latency_model": {
                                        k: v for k, v in t["latency_model"].items()
                                        if k != "table"},
                                    "table": t["latency_model"]["table"]})
                    except SlowerError as exc:  # refused: recorded, nothing to time
                        row.update({"target_refused": str(exc)})
                    timed = interleaved(variants, x, n, args.repeats, Path(tmp), exported)
                    row.update({"macs": {k: macs(m, x) for k, m in variants.items()},
                                "latency": timed})
                    results["rows"].append(row)
                    print(json.dumps({"model": name, "ratio": ratio, "threads": n,
                                      **{k: round(v["speedup"], 2) for k, v in timed.items()},
                                      "s": round(time.perf_counter() - t0)}),
                          file=sys.stderr, flush=True)
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_text(json.dumps(results, indent=1) + "\n")
            for goal in goals:
                for n in threads:
                    t0 = time.perf_counter()
                    target = TargetConfig("ort-cpu", n, 1, speedup=goal)
                    entry = {"model": name, "size": args.size, "goal": goal, "threads": n}
                    try:
                        result = prune_for_target(dense, (x,), target,
                                                  exporter="torchscript", attempts=4, **timing)
                        t = result.figures["target"]
                        entry.update({"met": t["met"], "measured": t["measured"],
                                      "macs_ratio": result.figures["macs_ratio"],
                                      "attempts": t["attempts"],
                                      "latency_model": {k: v for k, v in
                                                        t["latency_model"].items()
                                                        if k != "table"}})
                    except TargetError as exc:
                        entry.update({"met": False, "error": str(exc),
                                      "attempts": exc.attempts})
                    entry["seconds"] = time.perf_counter() - t0
                    results["targets"].append(entry)
                    print(json.dumps({k: entry.get(k) for k in ("model", "goal", "threads",
                                                                 "met")}
                                     | {"speedup": entry.get("measured", {}).get("speedup"),
                                        "s": round(entry["seconds"])}),
                          file=sys.stderr, flush=True)
                    out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
