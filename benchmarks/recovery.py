"""Keeping the accuracy, compared on the digits CNN, in one process: every recovery method
right after pruning; one-shot against iterative pruning; fine-tuning with and without
distillation; sparsity training (group lasso over the coupled groups) against none; and
Torch-Pruning's L2 pruning of the same trained weights, fine-tuned the same way, beside them.

Usage: ``python benchmarks/recovery.py [--ratios 0.5 0.7 0.85] [--finetune-epochs 2]``
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import time
from pathlib import Path

import torch
import torch_pruning as tp

import structprune as sp
from structprune.accuracy.data import digits
from structprune.accuracy.evaluate import evaluate
from structprune.accuracy.recover import recover
from structprune.accuracy.sparsity import GroupLasso
from structprune.accuracy.train import fit
from structprune.core.counts import count_macs
from structprune.core.score import calibration
from structprune.deploy import bench
from structprune.front.models import digits_cnn

ROOT = Path(__file__).resolve().parent
RECOVERY = [["none"], ["bn"], ["bias"], ["bias", "bn"], ["lsq"], ["lsq", "bn"]]


def accuracy(model, data) -> float:
    return evaluate(model.eval(), data.val).accuracy


def macs_kept(model, dense_macs: int, x) -> float:
    return count_macs(sp.capture(model, (x,))) / dense_macs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.5, 0.7, 0.85])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--finetune-epochs", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "results" / "recovery_digits.json"))
    args = parser.parse_args()
    start = time.perf_counter()
    data = digits()
    x = torch.randn(1, 1, 32, 32)
    torch.manual_seed(0)
    dense = digits_cnn()
    fit(dense, data.train, args.epochs, seed=0, progress=False)
    dense.eval()
    dense_macs = count_macs(sp.capture(dense, (x,)))
    batches = calibration(data.train, 8)
    rows: list[dict] = []

    def row(**fields) -> None:
        rows.append(fields)
        print(json.dumps(fields))

    def tuned(model, teacher=None) -> float:
        fit(model, data.train, args.finetune_epochs, seed=1, teacher=teacher, progress=False)
        return accuracy(model, data)

    # sparsity-trained twin: the same recipe plus group lasso over the coupled groups
    torch.manual_seed(0)
    sparse = digits_cnn()
    lasso = GroupLasso(sp.analyse(sp.capture(sparse, (x,))), 1e-3)
    fit(sparse, data.train, args.epochs, seed=0, regularizer=lasso, progress=False)
    sparse.eval()

    for ratio in args.ratios:
        for name, model in (("dense", dense), ("sparsity-trained", sparse)):
            for method in RECOVERY:
                result = sp.prune(model, (x,), ratio)
                recover(result.model, model, result.plan, result.analysis, batches, method)
                row(tool="structprune", start=name, ratio=ratio, recovery="+".join(method),
                    step="right after pruning", accuracy=accuracy(result.model, data),
                    macs_kept=result.figures["macs_ratio"])
        for distill in (False, True):
            result = sp.prune(dense, (x,), ratio)
            recover(result.model, dense, result.plan, result.analysis, batches, ["lsq", "bn"])
            row(tool="structprune", start="dense", ratio=ratio, recovery="lsq+bn",
                step=f"one-shot, fine-tuned{' with distillation' if distill else ''}",
                accuracy=tuned(result.model, dense if distill else None),
                macs_kept=result.figures["macs_ratio"])
        # iterative: three equal steps, a third of the fine-tuning after each
        current, per_step = dense, 1 - (1 - ratio) ** (1 / 3)
        for _ in range(3):
            step = sp.prune(current, (x,), per_step)
            recover(step.model, current, step.plan, step.analysis, batches, ["lsq", "bn"])
            current = step.model
            fit(current, data.train, max(1, args.finetune_epochs // 3 + 1), seed=1,
                teacher=dense, progress=False)
        row(tool="structprune", start="dense", ratio=ratio, recovery="lsq+bn",
            step="iterative (3 steps), fine-tuned with distillation",
            accuracy=accuracy(current, data), macs_kept=macs_kept(current, dense_macs, x))
        # Torch-Pruning: L2 magnitude, final classifier ignored, then the same fine-tuning
        model = copy.deepcopy(dense)
        pruner = tp.pruner.MagnitudePruner(
            model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=ratio, ignored_layers=[model.classifier[-1]])
        pruner.step()
        kept = tp.utils.count_ops_and_params(model, x)[0] / \
            tp.utils.count_ops_and_params(dense, x)[0]
        row(tool="torch_pruning", start="dense", ratio=ratio, recovery="none",
            step="right after pruning", accuracy=accuracy(model, data), macs_kept=kept)
        row(tool="torch_pruning", start="dense", ratio=ratio, recovery="none",
            step="one-shot, fine-tuned", accuracy=tuned(model), macs_kept=kept)
    out = {"what": "keeping the accuracy on the digits CNN (30% stratified test split)",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine(), "epochs": args.epochs,
           "finetune_epochs": args.finetune_epochs, "calibration_batches": 8,
           "dense_accuracy": accuracy(dense, data),
           "sparsity_trained_accuracy": accuracy(sparse, data),
           "seconds": time.perf_counter() - start, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
