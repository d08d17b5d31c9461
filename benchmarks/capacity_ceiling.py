"""How accurate can the pruned architecture be at all? A ceiling for label-free distillation.

``label_free.py`` distills the pruned ResNet-20 and MobileNetV2-small from the dense model on
512 unlabeled calibration samples. This script trains the same pruned architectures (the
``obs`` sequential selection at each ratio) *with labels on the whole training split* (6,000
images, twelve times the calibration samples), twice as many epochs as the dense model was
trained, by the same recipe (AdamW, cosine schedule, lr 3e-3): once from the recovered
weights (``lsq`` + ``bn``, what distillation starts from) and once from a fresh
initialisation. What they reach bounds what distillation on 512 unlabeled samples can be
expected to reach. Usage::

    python benchmarks/capacity_ceiling.py [--models resnet20 mobilenetv2s] [--ratios 0.7]
"""

from __future__ import annotations

import copy
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
from structprune.accuracy.train import fit  # noqa: E402


def ceiling_rows(name: str, ratio: float, train, val) -> list[dict]:
    dense = lf.shapes_model(name, train).eval()
    calib = lf.loader(train[0][:lf.CALIBRATION], None, 64, False)
    result = sp.prune(dense, (torch.randn(1, 3, 32, 32),), ratio, criterion="obs", data=calib,
                      sequential=True)
    recover(result.model, dense, result.plan, result.analysis, calib, ["lsq", "bn"])
    recovered = lf.accuracy(result.model, val)
    epochs = 2 * lf.EPOCHS[name]
    dense_accuracy = lf.accuracy(dense, val)
    rows = []
    for start in ("recovered", "fresh"):
        model = copy.deepcopy(result.model)
        if start == "fresh":
            torch.manual_seed(0)
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        began = time.perf_counter()
        fit(model, lf.Epochs(*train), epochs, lr=3e-3, seed=0, progress=False)  # as dense
        rows.append({"model": name, "ratio": ratio, "selection": "obs+sequential",
                     "start": start, "labels": f"all {len(train[0])} training images",
                     "epochs": epochs, "dense_accuracy": dense_accuracy,
                     "calibration_only_accuracy": recovered,
                     "accuracy": lf.accuracy(model, val),
                     "macs_kept": result.figures["macs_ratio"],
                     "seconds": time.perf_counter() - began})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    return lf.run_grid(__doc__, "capacity_ceiling_issue24.json",
                       "the pruned architectures trained with labels on the whole training "
                       "split: a ceiling for label-free distillation", ceiling_rows,
                       ratios=(0.7,))


if __name__ == "__main__":
    raise SystemExit(main())
