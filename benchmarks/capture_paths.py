"""Pass time through each capture path: torch.fx tracing against the torch.export fallback.

Runs ResNet-50 (torchvision) through both paths, and timm models that fx cannot trace
through the fallback, at ratio 0.5 and 224x224; the pass is capture + analyse + score +
plan + apply (``figures["seconds"]``), median of ``--repeats`` warm runs.

    python benchmarks/capture_paths.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
from pathlib import Path

import torch

import structprune as sp
from structprune.deploy import bench
from structprune.front.models import build_model

ROOT = Path(__file__).resolve().parent
CASES = [("torchvision:resnet50", "fx"), ("torchvision:resnet50", "export"),
         ("timm:tf_efficientnet_b0", "export"), ("timm:vgg13_bn", "export")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "results" / "capture_paths_cpu.json"))
    args = parser.parse_args()
    x = (torch.randn(1, 3, 224, 224),)
    rows = []
    for spec, method in CASES:
        model = build_model(spec).eval()
        sp.prune(model, x, 0.5, check=False, capture_method=method)  # warm-up
        runs = []
        for _ in range(args.repeats):
            result = sp.prune(model, x, 0.5, check=False, capture_method=method)
            runs.append(result.figures["seconds"])
        total = [sum(r.values()) for r in runs]
        row = {"spec": spec, "capture": method, "pass_median_s": statistics.median(total),
               "pass_runs_s": total,
               "stage_median_s": {k: statistics.median(r[k] for r in runs) for k in runs[0]},
               "macs_ratio": result.figures["macs_ratio"], "groups": result.figures["groups"]}
        rows.append(row)
        print(f"{spec:28s} {method:6s} pass {row['pass_median_s']:.3f}s "
              f"(capture {row['stage_median_s']['capture']:.3f}s) "
              f"MACs kept {row['macs_ratio']:.3f}", flush=True)
    data = {"what": __doc__.splitlines()[0], "date": dt.date.today().isoformat(),
            "machine": bench.machine(), "structprune": sp.__version__, "rows": rows}
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
