"""Collector: does pausing Python's garbage collector during the pass save the user time?

Code before #13's rewrite (6dc2a35) paused the cyclic collector for the whole of ``prune``.
A full collection then never fell inside the pass, and large models' passes read 0.2-0.3 s
faster. This measures whether that time is saved or only moved: a user's task, in a fresh
process per run, is a sweep of three prunes (ratios 0.25, 0.5, 0.75, results kept, as
``structprune sweep`` does) with some of the user's own allocation between them, in two
modes, alternating run by run:

- ``left alone``: the collector runs as Python schedules it (what structprune does);
- ``paused``: the collector is disabled inside each ``prune`` call and enabled after it.

For each it records the first call's pass time (what the scale table measures), the whole
task's time, and the collector's time and full collections over the task (``gc.callbacks``).

    python benchmarks/collector.py --repeats 3 [--models efficientnet_v2_l,densenet201]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
from scale import COLLECTOR_TIMER  # benchmarks/ is on the path of a script run from it

ROOT = Path(__file__).resolve().parent
MODELS = ["resnet50", "densenet201", "efficientnet_v2_l"]
MODES = ["left alone", "paused"]

CHILD = COLLECTOR_TIMER + r"""
import json, sys, torch, torchvision
import structprune as sp
name, paused = sys.argv[1], sys.argv[2] == "paused"
torch.manual_seed(0)
model = torchvision.models.get_model(name, weights=None).eval()
x = (torch.randn(1, 3, 224, 224),)
gc.callbacks.append(timed)
calls, results, kept = [], [], []
task = time.perf_counter()
for ratio in (0.25, 0.5, 0.75):
    t = time.perf_counter()
    if paused:
        gc.disable()
    results.append(sp.prune(model, x, ratio, check=False))
    if paused:
        gc.enable()
    calls.append(time.perf_counter() - t)
    kept.append([{"step": [i]} for i in range(50_000)])  # the user's own objects
task = time.perf_counter() - task
gc.callbacks.remove(timed)
print(json.dumps({"calls_s": calls, "task_s": task,
                  "collector_s": sum(s for _, s in collections),
                  "full_collections": sum(g == 2 for g, _ in collections)}))
"""


def run_child(name: str, mode: str) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, "-c", CHILD, name, mode], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} ({mode}) failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=str(ROOT / "results" / "collector_cpu.json"))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in MODES}
        for _ in range(args.repeats):
            for mode in MODES:
                runs[mode].append(run_child(name, mode))
        row: dict[str, Any] = {"model": name}
        for mode in MODES:
            row[mode] = {
                "first_call_s": float(np.median([r["calls_s"][0] for r in runs[mode]])),
                "task_s": float(np.median([r["task_s"] for r in runs[mode]])),
                "collector_s": float(np.median([r["collector_s"] for r in runs[mode]])),
                "full_collections": float(np.median([r["full_collections"]
                                                     for r in runs[mode]])),
                "runs": runs[mode]}
        alone, paused = row["left alone"], row["paused"]
        row["first_call_saved"] = 1 - paused["first_call_s"] / alone["first_call_s"]
        row["task_saved"] = 1 - paused["task_s"] / alone["task_s"]
        rows.append(row)
        print(f"{name:18s} first call {alone['first_call_s']:.2f} s -> "
              f"{paused['first_call_s']:.2f} s ({row['first_call_saved']:+.0%}); task "
              f"{alone['task_s']:.2f} s -> {paused['task_s']:.2f} s ({row['task_saved']:+.0%}); "
              f"collector {alone['collector_s']:.2f} s ({alone['full_collections']:.0f} full) -> "
              f"{paused['collector_s']:.2f} s ({paused['full_collections']:.0f} full)", flush=True)
    data = {"what": __doc__.splitlines()[0], "date": dt.date.today().isoformat(),
            "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
