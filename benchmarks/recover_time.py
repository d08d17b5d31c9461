"""Recovery time and peak memory: ``recover(..., ["lsq", "bn"])`` on random-weight models
pruned at ratio 0.5 (L2), each case in a fresh process so that its peak RSS is its own.

Cases:

- ``vgg16``: torchvision VGG16 at 224x224, 256 calibration images in batches of 32;
- ``small``: a conv + BatchNorm + pooling stack whose last feature map is permuted and
  flattened into a linear classifier (five refitted layers), 64x64, 256 images;
- ``wide22m``: the 22M-parameter stack of the issue (1024 channels wide, 8x8 and 16x16
  kernels, a 2048-feature classifier), 16x16, 256 images; once with the default budget and
  once with ``--memory-budget 2G``.

The wall time is of ``recover`` alone (the pruning before it is not counted), with its CPU
time beside it (user + system, all threads: on a busy machine wall time stretches, CPU time
much less; on a quiet one the wall time lies between the CPU time divided by the threads and
the CPU time); the peak RSS is the process's (model, data and recovery); the load average is
read before and after each case. Usage: ``python benchmarks/recover_time.py [--cases vgg16 small wide22m]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "recover_time_issue24.json"


class SmallCNN(nn.Module):
    """conv-bn-relu-pool x 4 at 64x64, the last map permuted (NHWC) and flattened into a
    linear classifier."""

    def __init__(self) -> None:
        super().__init__()
        widths = [3, 64, 128, 256, 256]
        self.features = nn.Sequential(*[m for a, b in zip(widths, widths[1:], strict=False)
                                        for m in (nn.Conv2d(a, b, 3, padding=1),
                                                  nn.BatchNorm2d(b), nn.ReLU(),
                                                  nn.MaxPool2d(2))])
        self.hidden = nn.Linear(4 * 4 * 256, 256)
        self.head = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x).permute(0, 2, 3, 1).flatten(1)
        return self.head(torch.relu(self.hidden(x)))


class Wide22M(nn.Module):
    """The issue's 22M-parameter case: 1024 channels into an 8x8 conv, a 16x16 conv, a
    2048-channel map pooled into a 2048-feature classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 1024, 3, padding=1), nn.BatchNorm2d(1024), nn.ReLU(),
            nn.Conv2d(1024, 256, 8, padding="same"), nn.BatchNorm2d(256), nn.ReLU(),
            nn.Conv2d(256, 64, 16, padding="same"), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 2048, 1), nn.BatchNorm2d(2048), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(2048, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def build(case: str) -> tuple[nn.Module, int]:
    """The model (random weights, BN statistics of its own random inputs) and input size."""
    if case == "vgg16":
        import torchvision
        return torchvision.models.vgg16(weights=None), 224
    model, size = (SmallCNN(), 64) if case == "small" else (Wide22M(), 16)
    with torch.no_grad():  # BN statistics that describe the data, as a trained model's do
        model.train()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = None
        for _ in range(2):
            model(torch.randn(32, 3, size, size))
    return model, size


def run_case(case: str, budget: str | None, images: int, batch: int) -> dict:
    import structprune as sp
    from structprune.accuracy.recover import recover

    torch.manual_seed(0)
    model, size = build(case)
    model.eval()
    batches = [torch.randn(batch, 3, size, size) for _ in range(images // batch)]
    result = sp.prune(model, (batches[0][:1],), 0.5)
    load_before = os.getloadavg()
    start, cpu = time.perf_counter(), time.process_time()
    report = recover(result.model, model, result.plan, result.analysis, batches,
                     ["lsq", "bn"], memory_budget=budget)
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    lsq = [layer for layer in report["layers"] if layer["method"] == "lsq"]
    return {"case": case, "input": [batch, 3, size, size], "images": images,
            "memory_budget": budget, "seconds": round(seconds, 2),
            "cpu_seconds": round(cpu, 2), "threads": torch.get_num_threads(),
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "params_dense": sum(p.numel() for p in model.parameters()),
            "load_average_before": load_before, "load_average_after": os.getloadavg(),
            "output_mse_before": report["output_mse_before"],
            "output_mse_after": report["output_mse_after"], "steps": report["steps"],
            "check": report["check"], "memory": report["memory"],
            "lsq_layers": [{k: layer.get(k) for k in ("module", "rows", "check_mse_before",
                                                      "check_mse_after", "skipped", "undone")}
                           | {"solver": (layer.get("plan") or {}).get("method"),
                              "bytes_needed": (layer.get("plan") or {}).get("bytes_needed"),
                              "bytes_allowed": (layer.get("plan") or {}).get("bytes_allowed")}
                           for layer in lsq]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--cases", nargs="+", default=["vgg16", "small", "wide22m"])
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--one", nargs=2, metavar=("CASE", "BUDGET"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a single case, in this (fresh) process
        case, budget = args.one
        print(json.dumps(run_case(case, None if budget == "default" else budget, args.images,
                                  args.batch)))
        return 0
    from structprune.deploy import bench

    runs = [(case, "default") for case in args.cases]
    if "wide22m" in args.cases:
        runs.append(("wide22m", "2G"))
    rows = []
    for case, budget in runs:
        done = subprocess.run([sys.executable, __file__, "--one", case, budget, "--images",
                               str(args.images), "--batch", str(args.batch)],
                              capture_output=True, text=True, check=True)
        row = json.loads(done.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{case:8s} budget {budget:8s}: {row['seconds']:7.1f} s ({row['cpu_seconds']:.1f} "
              f"s CPU), peak RSS "
              f"{row['peak_rss_bytes'] / 2 ** 30:.2f} GiB, output MSE "
              f"{row['output_mse_before']:.3g} -> {row['output_mse_after']:.3g}, load "
              f"{row['load_average_before'][0]:.1f}/{row['load_average_after'][0]:.1f}")
    out = {"what": "recover(..., ['lsq', 'bn']) wall time and peak RSS, random weights, "
                   "pruned at 0.5 (L2), each case in its own process",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine(), "threads": torch.get_num_threads(), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
