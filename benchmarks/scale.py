"""Scale: pass time and peak memory on large models, and time against graph size.

Each run is a fresh subprocess (so peak RSS is its own, and the pass is cold, as a user's
first call is): build with random weights, then one ``structprune.prune(..., check=False)``
at ratio 0.5. Records graph nodes, pass seconds per stage, and the process's peak resident
memory. With ``--repeats N`` every model runs N times and the median pass is reported with
its spread. The cyclic garbage collector's time inside the pass is recorded too (through
``gc.callbacks``): a full collection falls inside a large model's pass whenever the process
has allocated enough since the last one, and code that pauses the collector moves that
collection into the user's next steps instead (``benchmarks/collector.py`` measures that).
A least-squares fit of pass time against node count over the models checks growth is no
worse than linear.

``--baseline DIR`` also runs another checkout of structprune (a ``git worktree`` of an
earlier commit), alternating with this one run by run, so that both see the same machine;
each row then carries the baseline's runs and the ratio of the medians.

    python benchmarks/scale.py --repeats 5 [--baseline /tmp/old --baseline-label 6dc2a35]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent
MODELS = ["resnet18", "resnet50", "resnet152", "densenet121", "densenet201",
          "efficientnet_b0", "efficientnet_v2_l", "convnext_large", "regnet_y_128gf"]

# child code: ``gc.callbacks.append(timed)`` records (generation, seconds) of each collection
COLLECTOR_TIMER = r"""
import gc, time
collections = []
def timed(phase, info, start=[0.0]):
    if phase == "start":
        start[0] = time.perf_counter()
    else:
        collections.append((info["generation"], time.perf_counter() - start[0]))
"""

CHILD = COLLECTOR_TIMER + r"""
import json, resource, sys, torch, torchvision
import structprune as sp
name, size = sys.argv[1], int(sys.argv[2])
torch.manual_seed(0)
t = time.perf_counter()
model = torchvision.models.get_model(name, weights=None).eval()
build = time.perf_counter() - t
x = (torch.randn(1, 3, size, size),)
gc.callbacks.append(timed)
t = time.perf_counter()
result = sp.prune(model, x, 0.5, check=False)
call = time.perf_counter() - t
gc.callbacks.remove(timed)
cap = sp.capture(model, x)
print(json.dumps({"model": name, "structprune": sp.__file__, "input": size, "nodes": len(cap.graph.nodes),
                  "params": sum(p.numel() for p in model.parameters()),
                  "build_s": build, "call_s": call,
                  "pass_s": sum(result.figures["seconds"].values()),
                  "stages_s": result.figures["seconds"],
                  "macs_ratio": result.figures["macs_ratio"],
                  "collector_s": sum(s for _, s in collections),
                  "full_collections": sum(g == 2 for g, _ in collections),
                  "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""


def run_child(name: str, size: int, code: str | None) -> dict[str, Any]:
    """One cold prune in a fresh process, importing structprune from ``code`` if given."""
    env = dict(os.environ)
    if code:  # first on the path, and the working folder (``-c`` puts that first too)
        env["PYTHONPATH"] = os.pathsep.join([code, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run([sys.executable, "-c", CHILD, name, str(size)],
                          capture_output=True, text=True, env=env, cwd=code)
    if proc.returncode != 0:
        raise RuntimeError(f"{name} ({code or 'this checkout'}) failed:\n{proc.stderr[-2000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    if code and not row.pop("structprune").startswith(str(Path(code).resolve())):
        raise RuntimeError(f"the baseline run did not import structprune from {code}")
    row.pop("structprune", None)
    return row


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median pass time, with every run's pass time beside it."""
    ordered = sorted(runs, key=lambda r: r["pass_s"])
    row = dict(ordered[(len(ordered) - 1) // 2])
    row["pass_runs_s"] = [r["pass_s"] for r in runs]
    row["collector_runs_s"] = [r["collector_s"] for r in runs]
    # the pass's own work: each run's pass less the collector's time inside it (for an even
    # count, the lower middle, as for the pass)
    work = sorted(r["pass_s"] - r["collector_s"] for r in runs)
    row["work_s"] = work[(len(work) - 1) // 2]
    row["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--baseline", help="another structprune checkout, run alternately")
    parser.add_argument("--baseline-label", default=None, help="what the baseline is (a commit)")
    parser.add_argument("--out", default=str(ROOT / "results" / "scale_cpu.json"))
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        runs, baseline_runs = [], []
        try:
            for _ in range(args.repeats):
                runs.append(run_child(name, args.size, None))
                if args.baseline:
                    baseline_runs.append(run_child(name, args.size, args.baseline))
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            continue
        row = summarise(runs)
        line = (f"{name:18s} nodes {row['nodes']:5d} params {row['params'] / 1e6:7.1f}M "
                f"pass {row['pass_s']:6.2f}s ({min(row['pass_runs_s']):.2f}-"
                f"{max(row['pass_runs_s']):.2f}) collector "
                f"{np.median(row['collector_runs_s']):.2f}s peak {row['peak_rss_gib']:5.2f} GiB")
        if baseline_runs:
            base = summarise(baseline_runs)
            row["baseline"] = {k: base[k] for k in ("pass_s", "pass_runs_s", "stages_s",
                                                    "peak_rss_gib", "collector_runs_s",
                                                    "work_s")}
            row["ratio_to_baseline"] = row["pass_s"] / base["pass_s"]
            row["work_ratio_to_baseline"] = row["work_s"] / base["work_s"]
            line += (f" | baseline {base['pass_s']:6.2f}s ratio {row['ratio_to_baseline']:.2f}"
                     f" (without the collector {row['work_ratio_to_baseline']:.2f})")
        rows.append(row)
        print(line, flush=True)
    nodes = np.array([r["nodes"] for r in rows], float)
    seconds = np.array([r["pass_s"] for r in rows])
    # growth exponent: slope of log(time) against log(nodes)
    slope = float(np.polyfit(np.log(nodes), np.log(seconds), 1)[0]) if len(rows) > 2 else None
    data = {"what": __doc__.splitlines()[0], "date": dt.date.today().isoformat(),
            "repeats": args.repeats, "baseline": args.baseline_label or args.baseline,
            "rows": rows, "time_vs_nodes_loglog_slope": slope}
    Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
    if slope is not None:
        print(f"log-log slope of pass time against nodes: {slope:.2f} (1.0 = linear)")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
