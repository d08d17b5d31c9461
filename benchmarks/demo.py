"""The demo's recipe at several ratios: train the digits CNN, prune (L2), recover without
training (least squares, then BatchNorm statistics), fine-tune with distillation; accuracy
at every step, parameters, MACs and ONNX Runtime latency, dense against pruned.

Usage: ``python benchmarks/demo.py [--ratios 0.5 0.85]``
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

from structprune.deploy import bench
from structprune.front.demo import demo

ROOT = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.85])
    parser.add_argument("--out", default=str(ROOT / "results" / "demo_digits.json"))
    args = parser.parse_args()
    runs = []
    for ratio in args.ratios:
        report = demo(ratio=ratio)
        runs.append({"ratio": ratio, **{k: report[k] for k in ("dense", "pruned", "recipe",
                                                              "steps", "data")}})
    out = {"what": "structprune demo on scikit-learn's digits (30% stratified test split)",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine(), "runs": runs}
    Path(args.out).write_text(json.dumps(out, indent=1, default=float) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
