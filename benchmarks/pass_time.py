"""Whole-pass pruning time: structprune vs Torch-Pruning, side by side, on CPU.

For each torchvision model (random init after ``torch.manual_seed(0)``, eval mode, one
1x3x224x224 input) both tools prune 50% of the channels of every prunable layer with L2
magnitude importance, in one process, with ``torch`` at its default thread count.

What is timed:

* structprune: ``structprune.prune(model, (x,), 0.5, check=False)``. That call also builds
  figures (a second trace of the pruned model to count MACs), which is not part of the pass,
  so two numbers are kept: the wall time of the whole call (``call``), and the sum of
  ``result.figures["seconds"]`` over capture, analyse, score, plan and apply (``pass``). The
  pass sum is the one compared with Torch-Pruning. It is timed twice: as ``prune`` runs by
  default, on a copy of the model (the copy is part of its apply stage), and with
  ``inplace=True``, which slices the given model as Torch-Pruning does (on a fresh deepcopy
  each run, not timed).
* Torch-Pruning: construction of ``tp.pruner.MagnitudePruner`` (which traces the model and
  builds its dependency graph) plus ``pruner.step()``, with ``MagnitudeImportance(p=2)``,
  ``pruning_ratio=0.5`` and the final classifier ``Linear`` ignored, on a fresh deepcopy of
  the model each run; the deepcopy is not timed.

Each tool is warmed up once per model, then run ``--repeats`` times (default 5), the
variants interleaved; medians are reported. Before every timed run the cyclic garbage
collector empties its generations (``gc.collect()``, not timed), so that neither tool pays
for collecting the other's garbage. The speed-up is Torch-Pruning's median over
structprune's median pass. Each tool's MACs ratio (pruned / dense) is recorded too,
structprune's from ``result.figures["macs_ratio"]``, Torch-Pruning's from
``tp.utils.count_ops_and_params`` before and after the step; and ``weights_read_once_s``,
the time to read every weight once, a floor under any magnitude-scored pass (both tools
read each weight along two axes).

The timings are only meaningful on an otherwise idle machine: with other processes busy on a
small CPU, torch's OpenMP workers get descheduled and every small parallel op (such as the
per-layer norms of the score stage) can stall for a scheduler slice, inflating both tools'
times many-fold. The 1-minute load average before and after is recorded, and a warning is
printed when the machine is not idle at the start.

Usage: ``python benchmarks/pass_time.py [--models vgg16 resnet50 densenet121] [--out PATH]``
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import importlib.metadata
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
import torchvision

import structprune

RATIO = 0.5
DEFAULT_MODELS = ("vgg16", "resnet50", "densenet121")
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "pass_time_cpu.json"
STAGES = ("capture", "analyse", "score", "plan", "apply")
THREAD_ENV = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "MKL_NUM_THREADS")


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo, or platform's guess elsewhere."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def machine() -> dict[str, Any]:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "torch_pruning": version("torch-pruning"),
        "structprune": structprune.__version__,
        "env": {k: os.environ[k] for k in THREAD_ENV if k in os.environ},
    }


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name).eval()


def final_classifier(model: nn.Module) -> nn.Linear:
    """The last ``nn.Linear`` registered in the model: the classifier head."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError("model has no Linear layer to keep as its classifier")
    return linears[-1]


def run_structprune(model: nn.Module, x: torch.Tensor, inplace: bool = False) -> dict[str, Any]:
    work = copy.deepcopy(model) if inplace else model
    gc.collect()  # neither tool pays for the garbage the other left behind
    t0 = time.perf_counter()
    result = structprune.prune(work, (x,), RATIO, check=False, inplace=inplace)
    call = time.perf_counter() - t0
    stages = {k: result.figures["seconds"][k] for k in STAGES}
    return {"call": call, "pass": sum(stages.values()), "stages": stages,
            "macs_ratio": result.figures["macs_ratio"]}


def run_tp(model: nn.Module, x: torch.Tensor) -> dict[str, Any]:
    work = copy.deepcopy(model)
    gc.collect()
    t0 = time.perf_counter()
    pruner = tp.pruner.MagnitudePruner(
        work, example_inputs=x, importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=RATIO, ignored_layers=[final_classifier(work)])
    pruner.step()
    return {"pass": time.perf_counter() - t0, "model": work}


@torch.no_grad()
def weights_read_once(model: nn.Module, repeats: int) -> float:
    """Median time to read every parameter once (one norm each): the memory floor of a pass
    whose importance reads each weight, as both tools' magnitude scores do (along two axes)."""
    params = [p.detach() for p in model.parameters()]
    times = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for p in params:
            torch.linalg.vector_norm(p)
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:])


@torch.no_grad()
def tp_macs(model: nn.Module, x: torch.Tensor) -> float:
    macs, _ = tp.utils.count_ops_and_params(model, x)
    return float(macs)


def _summary(runs: list[dict[str, Any]], macs_ratio: float) -> dict[str, Any]:
    return {
        "pass_median_s": statistics.median(r["pass"] for r in runs),
        "call_median_s": statistics.median(r["call"] for r in runs),
        "pass_runs_s": [r["pass"] for r in runs],
        "call_runs_s": [r["call"] for r in runs],
        "stage_median_s": {k: statistics.median(r["stages"][k] for r in runs) for k in STAGES},
        "macs_ratio": macs_ratio,
    }


def bench_model(name: str, repeats: int) -> dict[str, Any]:
    model = build(name)
    x = torch.randn(1, 3, 224, 224)

    # Warm-up, one per tool; also gives the MACs ratios (not timed).
    sp = run_structprune(model, x)
    run_structprune(model, x, inplace=True)
    tp_run = run_tp(model, x)
    dense_macs = tp_macs(model, x)
    tp_ratio = tp_macs(tp_run.pop("model"), x) / dense_macs
    print(f"{name}: warm-up done (structprune pass {sp['pass']:.3f}s, "
          f"Torch-Pruning {tp_run['pass']:.3f}s)", flush=True)

    sp_runs, inplace_runs, tp_runs = [], [], []
    for i in range(repeats):
        sp_runs.append(run_structprune(model, x))
        inplace_runs.append(run_structprune(model, x, inplace=True))
        r = run_tp(model, x)
        del r["model"]
        tp_runs.append(r)
        print(f"{name} run {i + 1}/{repeats}: structprune pass {sp_runs[-1]['pass']:.3f}s "
              f"(in place {inplace_runs[-1]['pass']:.3f}s), Torch-Pruning {r['pass']:.3f}s",
              flush=True)

    tp_pass = statistics.median(r["pass"] for r in tp_runs)
    copy_summary = _summary(sp_runs, sp["macs_ratio"])
    inplace_summary = _summary(inplace_runs, sp["macs_ratio"])
    return {
        "structprune": copy_summary,
        "structprune_inplace": inplace_summary,
        "torch_pruning": {
            "pass_median_s": tp_pass,
            "pass_runs_s": [r["pass"] for r in tp_runs],
            "macs_ratio": tp_ratio,
        },
        "speedup_pass": tp_pass / copy_summary["pass_median_s"],
        "speedup_pass_inplace": tp_pass / inplace_summary["pass_median_s"],
        "speedup_call": tp_pass / copy_summary["call_median_s"],
        "weights_read_once_s": weights_read_once(model, repeats),
    }


def table(results: dict[str, dict[str, Any]]) -> str:
    rows = [
        "| model | structprune pass (s) | in place (s) | Torch-Pruning (s) "
        "| speed-up | speed-up in place | MACs ratio sp | MACs ratio TP |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, r in results.items():
        sp, ip, tpr = r["structprune"], r["structprune_inplace"], r["torch_pruning"]
        rows.append(
            f"| {name} | {sp['pass_median_s']:.3f} | {ip['pass_median_s']:.3f} "
            f"| {tpr['pass_median_s']:.3f} | {r['speedup_pass']:.1f}x "
            f"| {r['speedup_pass_inplace']:.1f}x "
            f"| {sp['macs_ratio']:.3f} | {tpr['macs_ratio']:.3f} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS),
                        help="torchvision model names (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON output path (default: benchmarks/results/pass_time_cpu.json)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per tool and model")
    args = parser.parse_args()

    load_before = os.getloadavg()
    if load_before[0] >= 0.5:
        print(f"warning: load average {load_before[0]:.2f}; other processes are busy and the "
              "timings will be inflated", flush=True)
    results = {name: bench_model(name, args.repeats) for name in args.models}
    report = {
        "what": "whole pruning pass time, ratio 0.5, L2 magnitude, input 1x3x224x224, CPU",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "load_average_1min": {"before": load_before[0], "after": os.getloadavg()[0]},
        "ratio": RATIO,
        "repeats": args.repeats,
        "warmup": 1,
        "models": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(results))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
