"""YOLOv8n and YOLO11n pruned on ONNX Runtime CPU: dense against pruned at ratios 0.3 and 0.5.

For each model (ultralytics' yaml, random weights, head in export form, 640x640, batch 1) and
ratio, two pruned models are made in this process: plain structprune (``prune(ratio)``) and
structprune with its widths chosen for speed on this runtime (``--target ort-cpu``: the
ratio's widths snapped to ones the measured latency table says are fast, and never slower
than dense). All are exported with the same exporter and timed in interleaved rounds on
ONNX Runtime CPU with 1 and 2 threads; per variant: median latency, and the median and
p10-p90 of the per-round speed-ups over dense.

Writes ``benchmarks/results/yolo_latency_cpu<cores>.json``; ``benchmarks/tables.py`` renders
it.

    python benchmarks/yolo_latency.py --models yolov8n,yolo11n --ratios 0.3,0.5
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

import torch

import structprune as sp
from structprune.config import TargetConfig
from structprune.deploy import bench
from structprune.deploy.speed import prune_for_target
from structprune.front.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parent))
from speed_targets import interleaved  # noqa: E402

ROOT = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="yolov8n,yolo11n")
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--size", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    threads = [int(t) for t in args.threads.split(",")]
    out = ROOT / "results" / f"yolo_latency_cpu{os.cpu_count()}.json"
    result = {"machine": bench.machine(), "date": dt.date.today().isoformat(),
              "size": args.size, "repeats": args.repeats, "rows": []}
    torch.set_grad_enabled(False)
    x = torch.randn(1, 3, args.size, args.size)
    with tempfile.TemporaryDirectory() as tmp_dir:
        tmp = Path(tmp_dir)
        for name in args.models.split(","):
            dense = build_model(f"ultralytics:{name}.yaml")
            exported: dict[int, Path] = {}
            for ratio in (float(r) for r in args.ratios.split(",")):
                start = time.perf_counter()
                plain = sp.prune(dense, (x,), ratio)
                # widths for speed on the runtime it will run on (2 threads, as measured below)
                fast = prune_for_target(dense, (x,),
                                        TargetConfig("ort-cpu", threads=max(threads)),
                                        ratio=ratio)
                seconds = time.perf_counter() - start
                models = {"dense": dense, "structprune": plain.model,
                          "structprune_target": fast.model}
                for n in threads:
                    timed = interleaved(models, x, n, args.repeats, tmp, exported)
                    row = {"model": name, "ratio": ratio, "threads": n,
                           "macs_ratio": {"structprune": plain.figures["macs_ratio"],
                                          "structprune_target": fast.figures["macs_ratio"]},
                           "prune_seconds": seconds, "timing": timed}
                    result["rows"].append(row)
                    print(f"{name} r={ratio} t={n}: dense {timed['dense']['ms']:.1f} ms; "
                          + "; ".join(f"{k} {v['speedup']:.2f}x "
                                      f"({v['speedup_p10']:.2f}-{v['speedup_p90']:.2f})"
                                      for k, v in timed.items() if k != "dense"), flush=True)
                out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
