"""Pruning criteria on a trained digits CNN: accuracy right after pruning, structprune against
Torch-Pruning, side by side in one process.

The model is ``structprune:digits_cnn`` (a VGG-style CNN, conv 64-64-128-128-256-256 with BN
and a 256-unit MLP head, see structprune/models.py), trained with ``structprune.accuracy.train.fit``
on the training split of ``structprune.accuracy.data.digits()`` (scikit-learn's digits upsampled to
32x32, stratified 70/30, seed 0). Its dense test accuracy is recorded, then for every ratio
in 0.3, 0.5, 0.7:

* structprune, for each criterion of ``structprune.core.score`` (l1, l2, taylor, gradient, bn,
  fpgm, lamp, activation, random), through the stage API: ``capture`` -> ``analyse`` ->
  ``score(analysis, criterion, prunable groups, data=calibration)`` -> ``make_plan`` with
  ``PruneConfig(ratio=ratio)`` -> ``apply_plan``. Nothing needs ignoring for the final
  Linear to keep its 10 outputs: structprune never changes the shape of a model output.
  This is what Torch-Pruning's ``ignored_layers=[final]`` does (the layer's outputs stay,
  its inputs, the hidden Linear's 256 units, are pruned). structprune's ``ignore`` is
  stricter, it leaves every tensor of the module untouched, so
  ``PruneConfig(ignore=["classifier.4"])`` also keeps the hidden Linear's 256 units
  whole; those rows are recorded too, as tool ``structprune_ignore_final``;
* Torch-Pruning on a deepcopy of the same trained weights: ``tp.pruner.MetaPruner`` with
  ``pruning_ratio=ratio``, ``ignored_layers=[classifier.4]``, ``global_pruning=False`` and the
  matching importance (GroupMagnitudeImportance p=1 / p=2, GroupTaylorImportance after
  ``loss.backward()`` on the calibration batches, BNScaleImportance, FPGMImportance,
  LAMPImportance, ActivationImportance after a forward of the calibration batches,
  RandomImportance). Torch-Pruning has no gradient-magnitude importance.

Both tools see the same calibration data: the first 8 batches of 64 of the training split in
dataset order (512 samples), the model in eval mode. Recorded per row: test accuracy and
macro F1 right after pruning (no fine-tuning, no BN recalibration), MACs kept (each tool's
own counter, pruned / dense, for one 1x1x32x32 input) and parameters kept. As a noise floor,
structprune's ``random`` criterion is also run with seeds 0-9 (``random_spread``): how much
accuracy right after pruning moves with the choice of channels alone.

Usage: ``python benchmarks/criteria.py [--epochs 3] [--out PATH]``
"""

from __future__ import annotations

import argparse
import copy
import datetime
import importlib.metadata
import itertools
import json
import platform
import statistics
import time
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.utils.data import DataLoader

import structprune as sp
from structprune.accuracy.data import digits
from structprune.accuracy.evaluate import evaluate
from structprune.accuracy.train import fit
from structprune.core.counts import count_macs, count_params
from structprune.core.score import IMPORTANCE
from structprune.deploy.bench import machine
from structprune.front.models import build_model

SEED = 0
RATIOS = (0.3, 0.5, 0.7)
CRITERIA = ("l1", "l2", "taylor", "gradient", "bn", "fpgm", "lamp", "activation", "random")
FINAL = "classifier.4"  # the classifier's last Linear: its outputs are kept by both tools
# structprune variants: tool name -> PruneConfig.ignore
SP_VARIANTS = {"structprune": [], "structprune_ignore_final": [FINAL]}
CALIBRATION_BATCHES, CALIBRATION_SIZE = 8, 64
RANDOM_SEEDS = 10  # seeds of structprune's random criterion for the noise floor
DEFAULT_OUT = Path(__file__).resolve().parent / "results" / "criteria_digits.json"

# structprune criterion -> the matching Torch-Pruning importance (class name, arguments)
TP_IMPORTANCE: dict[str, tuple[str, dict[str, Any]]] = {
    "l1": ("GroupMagnitudeImportance", {"p": 1}),
    "l2": ("GroupMagnitudeImportance", {"p": 2}),
    "taylor": ("GroupTaylorImportance", {}),
    "bn": ("BNScaleImportance", {}),
    "fpgm": ("FPGMImportance", {}),
    "lamp": ("LAMPImportance", {}),
    "activation": ("ActivationImportance", {}),
    "random": ("RandomImportance", {}),
}


def version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def quality(model: nn.Module, val) -> dict[str, float]:
    m = evaluate(model, val)
    return {"accuracy": m.accuracy, "macro_f1": m.macro_f1}


# ----------------------------------------------------------------------------- structprune


def run_structprune(model: nn.Module, x: torch.Tensor, criterion: str, calibration: list,
                    val, dense: dict[str, int]) -> list[dict[str, Any]]:
    """One criterion at every ratio: the scores are made once, a plan per ratio."""
    t0 = time.perf_counter()
    cap = sp.capture(model, (x,))
    analysis = sp.analyse(cap)
    groups = analysis.prunable_groups()
    scores = sp.score(analysis, criterion, groups, data=calibration)
    score_s = time.perf_counter() - t0
    rows = []
    for (tool, ignore), ratio in itertools.product(SP_VARIANTS.items(), RATIOS):
        t1 = time.perf_counter()
        plan = sp.make_plan(analysis, scores, sp.PruneConfig(ratio=ratio, ignore=ignore))
        pruned = sp.apply_plan(model, plan)
        seconds = score_s + time.perf_counter() - t1
        rows.append({
            "tool": tool, "criterion": criterion, "importance": criterion, "ignore": ignore,
            "ratio": ratio, **quality(pruned, val),
            "macs_kept": count_macs(sp.capture(pruned, (x,))) / dense["macs"],
            "params_kept": count_params(pruned) / dense["params"],
            "seconds": seconds,
        })
    return rows


def random_spread(model: nn.Module, x: torch.Tensor, val, seeds: range) -> dict[str, Any]:
    """structprune's ``random`` criterion over several seeds: how far accuracy right after
    pruning moves with the choice of channels alone, the noise floor of the comparison."""
    analysis = sp.analyse(sp.capture(model, (x,)))
    groups = analysis.prunable_groups()
    accuracy: dict[float, list[float]] = {ratio: [] for ratio in RATIOS}
    for seed in seeds:
        scores = sp.score(analysis, "random", groups, seed=seed)
        for ratio in RATIOS:
            plan = sp.make_plan(analysis, scores, sp.PruneConfig(ratio=ratio))
            accuracy[ratio].append(evaluate(sp.apply_plan(model, plan), val).accuracy)
    return {"seeds": list(seeds), "by_ratio": [
        {"ratio": ratio, "accuracy": values, "min": min(values),
         "median": statistics.median(values), "max": max(values)}
        for ratio, values in accuracy.items()]}


# -------------------------------------------------------------------------- Torch-Pruning


def tp_label(criterion: str) -> str:
    name, kwargs = TP_IMPORTANCE[criterion]
    args = ", ".join(f"{k}={v}" for k, v in kwargs.items())
    return f"{name}({args})"


def run_tp(model: nn.Module, x: torch.Tensor, criterion: str, ratio: float,
           calibration: list, val) -> dict[str, Any]:
    name, kwargs = TP_IMPORTANCE[criterion]
    work = copy.deepcopy(model).eval()
    dense_macs, dense_params = tp.utils.count_ops_and_params(work, x)
    torch.manual_seed(SEED)  # RandomImportance draws from torch's global generator
    t0 = time.perf_counter()
    importance = getattr(tp.importance, name)(**kwargs)
    final = work.get_submodule(FINAL)
    pruner = tp.pruner.MetaPruner(work, example_inputs=x, importance=importance,
                                  pruning_ratio=ratio, ignored_layers=[final],
                                  global_pruning=False)
    if criterion == "taylor":  # the summed per-batch losses, in eval mode, as structprune
        work.zero_grad()
        for inputs, targets in calibration:
            F.cross_entropy(work(inputs), targets).backward()
    if criterion == "activation":
        with torch.no_grad(), importance.compute_importance(work):
            for inputs, _ in calibration:
                work(inputs)
    pruner.step()
    seconds = time.perf_counter() - t0
    work.zero_grad(set_to_none=True)
    macs, params = tp.utils.count_ops_and_params(work, x)
    return {
        "tool": "torch_pruning", "criterion": criterion, "importance": tp_label(criterion),
        "ignored_layers": [FINAL], "ratio": ratio, **quality(work, val),
        "macs_kept": macs / dense_macs, "params_kept": params / dense_params,
        "seconds": seconds,
    }


# -------------------------------------------------------------------------------- report


SHORT = {"structprune": "sp", "structprune_ignore_final": "sp ignore", "torch_pruning": "TP"}


def table(report: dict[str, Any]) -> str:
    """Accuracy per criterion and ratio for each tool, then MACs and parameters kept at 0.5."""
    cell = {(r["tool"], r["criterion"], r["ratio"]): r for r in report["rows"]}
    tools = list(SHORT)
    head = "| criterion | " + " | ".join(
        f"{SHORT[t]} {r}" for r in report["ratios"] for t in tools) + \
        " | MACs kept 0.5 (sp / TP) | params kept 0.5 (sp / sp ignore / TP) |"
    lines = [head, "|---|" + "---:|" * (len(tools) * len(report["ratios"]) + 2)]

    def pct(row: dict | None, key: str) -> str:
        return f"{100 * row[key]:.1f}%" if row else "-"

    for c in report["criteria"]:
        cells = [pct(cell.get((t, c, r)), "accuracy") for r in report["ratios"] for t in tools]
        cells.append(" / ".join(pct(cell.get((t, c, 0.5)), "macs_kept")
                                for t in ("structprune", "torch_pruning")))
        cells.append(" / ".join(pct(cell.get((t, c, 0.5)), "params_kept") for t in tools))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=3, help="training epochs (default 3)")
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT,
                        help="JSON output path (default: benchmarks/results/criteria_digits.json)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # Torch-Pruning warns per layer on unscored groups

    splits = digits(seed=SEED)
    model = build_model("structprune:digits_cnn", seed=SEED)
    t0 = time.perf_counter()
    history = fit(model, splits.train, args.epochs, lr=args.lr, seed=SEED)
    train_s = time.perf_counter() - t0
    model.eval()
    dense_quality = quality(model, splits.val)
    print(f"dense: {args.epochs} epochs in {train_s:.0f} s, test accuracy "
          f"{100 * dense_quality['accuracy']:.2f}%", flush=True)

    # the first 8 batches of 64 of the training split, in dataset order
    loader = DataLoader(splits.train.dataset, batch_size=CALIBRATION_SIZE, shuffle=False)
    calibration = [batch for _, batch in zip(range(CALIBRATION_BATCHES), loader, strict=False)]
    x = calibration[0][0][:1]
    dense = {"macs": count_macs(sp.capture(model, (x,))), "params": count_params(model)}

    missing_sp = [c for c in CRITERIA if c not in IMPORTANCE]
    missing_tp = [c for c, (n, _) in TP_IMPORTANCE.items() if not hasattr(tp.importance, n)]
    rows: list[dict[str, Any]] = []
    for criterion in CRITERIA:
        if criterion not in missing_sp:
            rows += run_structprune(model, x, criterion, calibration, splits.val, dense)
        if criterion in TP_IMPORTANCE and criterion not in missing_tp:
            rows += [run_tp(model, x, criterion, ratio, calibration, splits.val)
                     for ratio in RATIOS]
        done = [r for r in rows if r["criterion"] == criterion]
        print(f"{criterion}: " + ", ".join(
            f"{SHORT[r['tool']]} {r['ratio']} "
            f"{100 * r['accuracy']:.1f}%" for r in done), flush=True)

    spread = random_spread(model, x, splits.val, range(RANDOM_SEEDS))
    print(f"structprune random over seeds 0-{RANDOM_SEEDS - 1}: " + ", ".join(
        f"{r['ratio']} {100 * r['min']:.1f}-{100 * r['max']:.1f}% (median "
        f"{100 * r['median']:.1f}%)" for r in spread["by_ratio"]), flush=True)

    report = {
        "what": "test accuracy right after pruning (no fine-tuning) of a digits CNN, per "
                "criterion and ratio, structprune against Torch-Pruning; final Linear's "
                "outputs kept",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "torch_pruning": version("torch-pruning"),
                     "structprune": sp.__version__, "scikit-learn": version("scikit-learn")},
        "seed": SEED,
        "model": "structprune:digits_cnn",
        "data": splits.summary(),
        "training": {"optimizer": "AdamW (weight decay 0), cosine schedule",
                     "epochs": args.epochs, "lr": args.lr, "batch_size": 64,
                     "seconds": train_s, "history": history},
        "dense": {**dense_quality, "macs": dense["macs"], "params": dense["params"]},
        "calibration": {"batches": CALIBRATION_BATCHES, "batch_size": CALIBRATION_SIZE},
        "final_layer": FINAL,
        "structprune_ignore": SP_VARIANTS,
        "ratios": list(RATIOS),
        "criteria": list(CRITERIA),
        "torch_pruning_importance": {c: tp_label(c) for c in TP_IMPORTANCE},
        "missing": {"structprune": missing_sp, "torch_pruning": missing_tp},
        "rows": rows,
        "random_spread": spread,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(table(report))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
