"""Scale: pass time and peak memory on large models, and time against graph size.

Each model runs in a fresh subprocess (so peak RSS is its own): build with random
weights, then one ``structprune.prune(..., check=False)`` at ratio 0.5. Records graph
nodes, pass seconds per stage, and the process's peak resident memory. A least-squares fit
of pass time against node count over the models checks growth is no worse than linear.

    python benchmarks/scale.py
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
MODELS = ["resnet18", "resnet50", "resnet152", "densenet121", "densenet201",
          "efficientnet_b0", "efficientnet_v2_l", "convnext_large", "regnet_y_128gf"]

CHILD = r"""
import json, resource, sys, time, torch, torchvision
import structprune as sp
name, size = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
t = time.perf_counter()
model = torchvision.models.get_model(name, weights=None).eval()
build = time.perf_counter() - t
x = (torch.randn(1, 3, size, size),)
t = time.perf_counter()
result = sp.prune(model, x, 0.5, check=False)
call = time.perf_counter() - t
cap = sp.capture(model, x)
print(json.dumps({"model": name, "input": size, "nodes": len(cap.graph.nodes),
                  "params": sum(p.numel() for p in model.parameters()),
                  "build_s": build, "call_s": call,
                  "pass_s": sum(result.figures["seconds"].values()),
                  "stages_s": result.figures["seconds"],
                  "macs_ratio": result.figures["macs_ratio"],
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--out", default=str(ROOT / "results" / "scale_cpu.json"))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        proc = subprocess.run([sys.executable, "-c", CHILD, name, str(args.size)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{name:18s} nodes {row['nodes']:5d} params {row['params'] / 1e6:7.1f}M "
              f"pass {row['pass_s']:6.2f}s peak {row['peak_rss_gib']:5.2f} GiB", flush=True)
    nodes = np.array([r["nodes"] for r in rows], float)
    seconds = np.array([r["pass_s"] for r in rows])
    # growth exponent: slope of log(time) against log(nodes)
    slope = float(np.polyfit(np.log(nodes), np.log(seconds), 1)[0]) if len(rows) > 2 else None
    data = {"what": __doc__.splitlines()[0], "date": dt.date.today().isoformat(),
            "rows": rows, "time_vs_nodes_loglog_slope": slope}
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"log-log slope of pass time against nodes: {slope:.2f} (1.0 = linear)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
