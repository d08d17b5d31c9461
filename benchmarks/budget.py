"""MACs budgets: how close `macs_budget` lands to its target, counted on the pruned model.

For each torchvision model (random weights after ``torch.manual_seed(0)``, eval mode, one
1x3x224x224 input) structprune prunes with ``macs_budget=F`` (L2 magnitude) and the pruned
model's MACs are recounted from its own graph (``result.figures["macs_ratio"]``); the plan's
prediction from the dense graph (``plan.extra["budget"]``) is recorded beside it.

Usage: ``python benchmarks/budget.py [--models vgg16 resnet50 mobilenet_v2] [--budget 0.4]``
"""

from __future__ import annotations

import argparse
import datetime
import json
import time
from pathlib import Path

import torch
import torchvision

import structprune as sp
from structprune.deploy import bench

ROOT = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["vgg16", "resnet50", "mobilenet_v2"])
    parser.add_argument("--budget", type=float, default=0.4)
    parser.add_argument("--out", default=str(ROOT / "results" / "budget_cpu.json"))
    args = parser.parse_args()
    rows = []
    for name in args.models:
        torch.manual_seed(0)
        model = torchvision.models.get_model(name, weights=None).eval()
        x = torch.randn(1, 3, 224, 224)
        start = time.perf_counter()
        result = sp.prune(model, (x,), macs_budget=args.budget)
        seconds = time.perf_counter() - start
        predicted = result.plan.extra["budget"]["macs_ratio_predicted"]
        rows.append({"model": name, "budget": args.budget,
                     "macs_kept": result.figures["macs_ratio"],
                     "macs_kept_predicted": predicted,
                     "params_kept": result.figures["params_ratio"],
                     "verified": bool(result.verification.ok), "seconds": seconds})
        print(f"{name:14s} budget {args.budget:.2f}: MACs kept {result.figures['macs_ratio']:.4f} "
              f"(predicted {predicted:.4f}), params kept {result.figures['params_ratio']:.3f}")
    out = {"what": "macs_budget: MACs kept, recounted on the pruned model, 224x224",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine(), "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
