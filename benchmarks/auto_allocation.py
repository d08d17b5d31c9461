"""``--auto`` against the uniform ratio at the same MACs, with sensitivity measured raw or
after BatchNorm recalibration, all recovered alike; in one process.

On ``label_free.py``'s ResNet-20 and MobileNetV2-small, for each ratio: the uniform per-group
ratio (``obs`` selection, sequential), then ``auto_plan`` at the MACs budget that ratio
keeps, its sensitivity measured on the 512 unlabeled calibration samples (top-1 agreement
with the dense model) either on each trial as it is (``raw``) or after its BatchNorm
statistics are re-estimated on those samples (``recalibrated``, what ``prune --auto`` does
when ``bn`` recovery follows). Every plan is then recovered with ``lsq`` + ``bn`` and
evaluated on the labeled validation split. Usage::

    python benchmarks/auto_allocation.py [--models resnet20 mobilenetv2s] [--ratios 0.5]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import label_free as lf  # noqa: E402

import structprune as sp  # noqa: E402
from structprune.accuracy.recover import recover  # noqa: E402
from structprune.accuracy.sensitivity import auto_plan  # noqa: E402


def rows_of(name: str, ratio: float, train, val) -> list[dict]:
    dense = lf.shapes_model(name, train).eval()
    calib = lf.loader(train[0][:lf.CALIBRATION], None, 64, False)
    x = (torch.randn(1, 3, 32, 32),)
    settings = {"criterion": "obs", "data": calib, "sequential": True}
    dense_accuracy = lf.accuracy(dense, val)
    rows: list[dict] = []

    def row(allocation: str, result, seconds: float, sensitivity=None) -> None:
        recover(result.model, dense, result.plan, result.analysis, calib, ["lsq", "bn"])
        rows.append({"model": name, "ratio": ratio, "allocation": allocation,
                     "recovery": "lsq+bn", "dense_accuracy": dense_accuracy,
                     "accuracy": lf.accuracy(result.model, val),
                     "macs_kept": result.figures["macs_ratio"], "plan_seconds": seconds,
                     **({"group_ratios": sensitivity["group_ratios"]} if sensitivity else {})})
        print(json.dumps(rows[-1]), flush=True)

    began = time.perf_counter()
    uniform = sp.prune(dense, x, ratio, **settings)
    row("uniform", uniform, time.perf_counter() - began)
    budget = uniform.figures["macs_ratio"]
    for how, recalibrate in (("auto, raw sensitivity", None),
                             ("auto, recalibrated sensitivity", calib)):
        began = time.perf_counter()
        plan, sensitivity = auto_plan(dense, x, calib, macs_budget=budget, progress=False,
                                      recalibrate=recalibrate, **settings)
        row(how, sp.prune(dense, x, plan=plan), time.perf_counter() - began, sensitivity)
    return rows


def main() -> int:
    return lf.run_grid(__doc__, "auto_allocation_issue24.json",
                       "--auto against the uniform ratio at its MACs: sensitivity raw or "
                       "after BatchNorm recalibration, every plan recovered with lsq+bn",
                       rows_of)


if __name__ == "__main__":
    raise SystemExit(main())
