"""Latency of pruned models: structprune against Torch-Pruning, side by side in one process.

For each model and ratio, the dense model, structprune's pruned model and Torch-Pruning's
(``MagnitudePruner``, L2, classifier ignored), each with and without rounding to multiples
of 8, are timed in interleaved rounds on:

- ``ort-cpu``: ONNX Runtime CPU (all threads, and 1 thread), batch 1, all models exported
  with the same exporter (TorchScript, opset 17, as in the Torch-Pruning anchors);
- ``torch-cuda``: torch on CUDA, fp16, channels_last, CUDA-graph replay, batch 64 and 1
  (when a GPU is present).

Writes ``benchmarks/results/latency_<machine>.json``; ``benchmarks/tables.py`` renders it.

    python benchmarks/latency.py --models vgg16,resnet50,mobilenet_v2 --ratios 0.5
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torchvision

import structprune as sp
from structprune.core.counts import count_macs
from structprune.deploy import bench, tune
from structprune.deploy.export import export_onnx

ROOT = Path(__file__).resolve().parent


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.get_model(name, weights=None).eval()


def tp_prune(model: nn.Module, x: torch.Tensor, ratio: float, round_to: int | None) -> nn.Module:
    import torch_pruning as tp

    model = copy.deepcopy(model)
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(model, example_inputs=x,
                                       importance=tp.importance.MagnitudeImportance(p=2),
                                       pruning_ratio=ratio, ignored_layers=head,
                                       round_to=round_to)
    pruner.step()
    return model.eval()


def variants(name: str, ratio: float, x: torch.Tensor, with_tp: bool, auto: bool,
             ) -> tuple[dict[str, nn.Module], dict]:
    dense = build(name)
    out = {"dense": dense,
           "structprune": sp.prune(dense, (x,), ratio, check=False).model,
           "structprune_r8": sp.prune(dense, (x,), ratio, round_to=8, check=False).model}
    tuning = {}
    if auto:  # round_to measured on this machine's runtime (GPU fp16 batch 64, else ORT CPU)
        batch = 64 if torch.cuda.is_available() else 1
        tuned = tune.fastest_rounding(dense, (x,), ratio, batch=batch)
        out["structprune_auto"] = tuned.model
        tuning = tuned.figures["rounding"]
    if with_tp:
        out["torch_pruning"] = tp_prune(dense, x, ratio, None)
        out["torch_pruning_r8"] = tp_prune(dense, x, ratio, 8)
    return out, tuning


def macs(model: nn.Module, x: torch.Tensor) -> int:
    return count_macs(sp.capture(model, (x,)))


def time_ort(models: dict[str, nn.Module], x: torch.Tensor, threads: int, repeats: int,
             tmp: Path) -> dict[str, dict]:
    runners = {}
    for key, model in models.items():
        path = tmp / f"{key}.onnx"
        export_onnx(model, (x,), path, exporter="torchscript", opset=17)
        runners[key] = bench.ort_runner(path, 1, [tuple(x.shape)], threads, "CPUExecutionProvider")
    times = bench.interleaved_many(list(runners.values()), warmup=3, repeats=repeats,
                                   max_seconds=120)
    return {k: summarize(t) for k, t in zip(runners, times, strict=True)}


def time_cuda(models: dict[str, nn.Module], x: torch.Tensor, batch: int, repeats: int,
              ) -> dict[str, dict]:
    runners = {}
    for key, model in models.items():
        m = copy.deepcopy(model).to("cuda", torch.float16).to(memory_format=torch.channels_last)
        inp = torch.randn((batch, *x.shape[1:]), device="cuda", dtype=torch.float16)
        runners[key] = bench.torch_runner(m, [inp.to(memory_format=torch.channels_last)], True)
    times = bench.interleaved_many(list(runners.values()), warmup=10, repeats=repeats,
                                   max_seconds=60, sync=torch.cuda.synchronize)
    return {k: summarize(t) for k, t in zip(runners, times, strict=True)}


def summarize(ms: list[float]) -> dict:
    ms = sorted(ms)
    return {"median": ms[len(ms) // 2], "p10": ms[len(ms) // 10], "p90": ms[(9 * len(ms)) // 10],
            "runs": len(ms)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet50,mobilenet_v2")
    parser.add_argument("--ratios", default="0.5")
    parser.add_argument("--runtimes", default="ort-cpu,torch-cuda")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--cuda-repeats", type=int, default=50)
    parser.add_argument("--no-tp", action="store_true", help="skip Torch-Pruning")
    parser.add_argument("--no-auto", action="store_true", help="skip --round-to auto")
    parser.add_argument("--threads", default=None,
                        help="ORT CPU thread counts, comma-separated (default all cores and 1)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    runtimes = args.runtimes.split(",")
    cuda = torch.cuda.is_available() and "torch-cuda" in runtimes
    info = bench.machine()
    tag = "h100" if info["gpu"] and "H100" in info["gpu"] else \
        (info["gpu"] or "cpu").split()[-1].lower() if info["gpu"] else f"cpu{os.cpu_count()}"
    out = Path(args.out or ROOT / "results" / f"latency_{tag}.json")
    results = {"machine": info, "date": dt.date.today().isoformat(),
               "structprune": sp.__version__, "rows": []}
    try:
        import torch_pruning as tp
        results["torch_pruning"] = tp.__version__
    except ImportError:
        args.no_tp = True
    x = torch.randn(1, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            for ratio in (float(r) for r in args.ratios.split(",")):
                t0 = time.perf_counter()
                models, tuning = variants(name, ratio, x, not args.no_tp, not args.no_auto)
                row = {"model": name, "ratio": ratio, "rounding": tuning,
                       "macs": {k: macs(m, x) for k, m in models.items()}}
                if "ort-cpu" in runtimes:
                    counts = [int(t) for t in args.threads.split(",")] if args.threads else \
                        sorted({os.cpu_count() or 1, 1}, reverse=True)
                    for threads in counts:
                        row[f"ort_cpu{threads}_bs1_ms"] = time_ort(models, x, threads,
                                                                  args.repeats, Path(tmp))
                if cuda:
                    for batch in (64, 1):
                        row[f"gpu_fp16_bs{batch}_ms"] = time_cuda(models, x, batch,
                                                                  args.cuda_repeats)
                results["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "macs"})[:400],
                      f"({time.perf_counter() - t0:.0f}s)", file=sys.stderr, flush=True)
                out.parent.mkdir(parents=True, exist_ok=True)
                out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
