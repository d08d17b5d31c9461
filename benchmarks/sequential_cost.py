"""What keeping the dense pass's rows saves sequential selection, in one process.

``--sequential`` measures each group's consumers on the pruned model's inputs and on the
dense model's, the same rows of both. The dense rows are the ones the first (dense) pass of
``obs`` already drew, so that pass keeps them (:meth:`OBS.expect_rescore`, within a second
memory budget) instead of running the dense model again for every group. This script runs
a user's whole task, ``prune(..., criterion="obs", sequential=True)`` and ``recover(...,
["lsq", "bn"])``, both ways on the same model and samples, checks that the pruned models are
identical, and records the seconds and peak resident memory of each. The models are
``label_free.py``'s (trained there, cached) and its YOLOv8n. Usage::

    python benchmarks/sequential_cost.py [--models resnet20 mobilenetv2s yolov8n]
        [--ratio 0.5] [--threads 1]
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import sys
from pathlib import Path
from unittest import mock

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import label_free as lf  # noqa: E402

import structprune as sp  # noqa: E402
from structprune.accuracy.recover import recover  # noqa: E402
from structprune.core.obs import OBS  # noqa: E402
from structprune.deploy import bench  # noqa: E402


def model_and_samples(name: str, yolo: Path):
    """The dense model, an example input and the unlabeled calibration batches."""
    if name == "yolov8n":
        from yolo import images  # benchmarks/yolo.py

        from structprune.front.models import build_model

        dense = build_model(f"ultralytics:{yolo}").eval()
        root = yolo.parents[2] / "shapes" / "images"
        return dense, torch.randn(1, 3, 192, 192), images(root / "train", 192, 256, 32)
    train, _ = lf.shapes_data()
    build = lf.ResNet20 if name == "resnet20" else lf.MobileNetV2Small
    dense = lf.trained(name, build, train, lf.EPOCHS[name])
    return dense, torch.randn(1, 3, 32, 32), lf.loader(train[0][:lf.CALIBRATION], None, 64,
                                                       False)


def task(dense, x, calib, ratio: float, keep_rows: bool) -> tuple[dict, dict]:
    """Prune sequentially and recover; the seconds of each and the pruned state."""
    off = mock.patch.object(OBS, "expect_rescore", lambda self: None)  # the dense model anew
    with contextlib.nullcontext() if keep_rows else off, lf.Peak() as selection:
        result = sp.prune(dense, (x,), ratio, criterion="obs", data=calib, sequential=True)
    with lf.Peak() as recovery:
        recover(result.model, dense, result.plan, result.analysis, calib, ["lsq", "bn"])
    return ({"select_seconds": selection.seconds, "recover_seconds": recovery.seconds,
             "macs_kept": result.figures["macs_ratio"]},
            {k: v.clone() for k, v in result.model.state_dict().items()})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2s", "yolov8n"])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--yolo", default=str(lf.CACHE / "yolo_bench" / "dense" / "weights" /
                                              "best.pt"))
    parser.add_argument("--out", default=str(ROOT / "results" /
                                             "sequential_cost_issue24.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        if name == "yolov8n" and not Path(args.yolo).is_file():
            print(f"skip yolov8n: no {args.yolo} (run benchmarks/yolo.py first)")
            continue
        dense, x, calib = model_and_samples(name, Path(args.yolo))
        rounds = {"dense_rerun": [], "rows_kept": []}
        states = {}
        for round_ in range(args.repeats):
            for keep_rows in ((False, True) if round_ % 2 == 0 else (True, False)):
                figures, states[keep_rows] = task(dense, x, calib, args.ratio, keep_rows)
                rounds["rows_kept" if keep_rows else "dense_rerun"].append(figures)
        fastest = {way: min(r["select_seconds"] for r in runs) for way, runs in rounds.items()}
        recovery = min(r["recover_seconds"] for runs in rounds.values() for r in runs)
        row = {"model": name, "ratio": args.ratio,
               "macs_kept": rounds["rows_kept"][0]["macs_kept"],
               "identical": states[False].keys() == states[True].keys() and all(
                   torch.equal(states[False][k], states[True][k]) for k in states[False]),
               "rounds": rounds, "select_seconds": fastest, "recover_seconds": recovery,
               "select_saved": 1 - fastest["rows_kept"] / fastest["dense_rerun"],
               "task_saved": 1 - (fastest["rows_kept"] + recovery)
               / (fastest["dense_rerun"] + recovery)}
        rows.append(row)
        print(json.dumps(row), flush=True)
    out = {"what": "sequential obs selection + lsq,bn recovery: the dense model run again per "
                   "group against the dense pass's rows kept",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine(), "load_average": os.getloadavg(),
           "threads": args.threads, "repeats": args.repeats, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
