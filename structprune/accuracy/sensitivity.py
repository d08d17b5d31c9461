"""Sensitivity: how much accuracy each group loses when it alone is pruned, and per-group
ratios that meet a MACs budget with the least predicted loss (``prune --auto``).

``measure`` prunes each prunable group alone at several ratios (its least important units
first, as the plan would) and evaluates the result on validation batches; ``allocate``
then raises group ratios greedily, always taking the step that loses the least predicted
accuracy per MAC saved (losses read off the measured curves, added over groups), until the
model's MACs, counted exactly from the graph, fall within the budget.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch.nn as nn
from tqdm import tqdm

from structprune.accuracy.evaluate import evaluate
from structprune.core.analyse import Analysis, Group
from structprune.core.apply import apply_plan
from structprune.core.literals import analyse_model
from structprune.core.plan import Plan, PlanSettings, PruneCost, sized_attributes, sliced_params
from structprune.core.registry import RuleRegistry
from structprune.core.score import Importance, score
from structprune.errors import PlanError

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def prunable_units(group: Group, exact_only: bool = False) -> np.ndarray:
    """Positions of the group's units that may go."""
    allowed = ~group.blocked & (~group.approximate if exact_only else True)
    return np.flatnonzero(allowed)


def removal(analysis: Analysis, scores: Mapping[int, np.ndarray],
            ratios: Mapping[int, float], exact_only: bool = False) -> np.ndarray:
    """The components removed when each group ``g`` loses ``ratios[g]`` of its prunable
    units, least important first; at least one unit of each group stays."""
    removed = np.zeros(int(analysis.component.max()) + 1, bool)
    by_index = {g.index: g for g in analysis.groups}
    for index, ratio in ratios.items():
        group = by_index[index]
        units = prunable_units(group, exact_only)
        count = min(int(len(units) * ratio), group.size - 1)
        if count > 0:
            ranked = units[np.argsort(scores[index][units], kind="stable")]
            removed[group.units[ranked[:count]]] = True
    return removed


def plan_of(analysis: Analysis, removed: np.ndarray) -> Plan:
    """The plan removing the components flagged in ``removed``, with its group decisions."""
    decisions = [{"index": g.index, "units": int(g.size), "width": g.width,
                  "members": [f"{n}:{d}" for n, d in g.members],
                  "status": "blocked" if g.blocked.all() else
                            "approximate" if g.approximate.any() else "exact",
                  "kept": int(g.size - removed[g.units].sum())} for g in analysis.groups]
    return Plan(sliced_params(analysis, removed), decisions,
                attributes=sized_attributes(analysis, removed))


def measure(model: nn.Module, analysis: Analysis, scores: Mapping[int, np.ndarray],
            batches: Iterable[Any], ratios: Sequence[float] = RATIOS,
            exact_only: bool = False, progress: bool = True) -> dict[str, Any]:
    """Accuracy on ``batches`` with each prunable group alone pruned at each ratio."""
    batches = list(batches)
    dense = evaluate(model, batches).accuracy
    groups = [g for g in analysis.groups if g.index in scores
              and len(prunable_units(g, exact_only)) > 0]
    rows = []
    steps = tqdm(total=len(groups) * len(ratios), desc="sensitivity", unit="trial",
                 disable=not progress)
    with steps:
        for group in groups:
            accuracy = []
            for ratio in ratios:
                removed = removal(analysis, scores, {group.index: ratio}, exact_only)
                pruned = apply_plan(model, plan_of(analysis, removed))
                accuracy.append(evaluate(pruned, batches).accuracy)
                steps.update()
            rows.append({"group": group.index, "units": int(group.size),
                         "members": [f"{n}:{d}" for n, d in group.members[:3]],
                         "accuracy": accuracy})
    return {"dense_accuracy": dense, "ratios": list(ratios), "groups": rows}


def allocate(sensitivity: Mapping[str, Any], analysis: Analysis,
             scores: Mapping[int, np.ndarray], macs_after: Callable[[np.ndarray], float],
             budget: float, exact_only: bool = False, step: float = 0.05,
             ) -> dict[int, float]:
    """Per-group ratios whose model keeps at most ``budget`` of the dense MACs, chosen by
    the least predicted accuracy loss per MAC saved; raises PlanError if none can."""
    ratios = [0.0, *sensitivity["ratios"]]
    curves = {row["group"]: [sensitivity["dense_accuracy"], *row["accuracy"]]
              for row in sensitivity["groups"]}
    ceiling = max(ratios)

    def loss(group: int, ratio: float) -> float:
        return sensitivity["dense_accuracy"] - float(np.interp(ratio, ratios, curves[group]))

    dense_macs = macs_after(np.zeros(int(analysis.component.max()) + 1, bool))
    chosen = dict.fromkeys(curves, 0.0)
    current = macs_after(removal(analysis, scores, chosen, exact_only))
    while current > budget * dense_macs:
        best = None
        for group, ratio in chosen.items():
            if ratio + step > ceiling + 1e-9:
                continue
            trial = {**chosen, group: round(ratio + step, 6)}
            macs = macs_after(removal(analysis, scores, trial, exact_only))
            saved = current - macs
            if saved <= 0:
                continue
            cost = (loss(group, ratio + step) - loss(group, ratio)) / saved
            if best is None or cost < best[0]:
                best = (cost, group, macs)
        if best is None:
            raise PlanError(f"no ratios up to {ceiling:g} per group reach {budget:g} of the "
                            f"MACs (lowest {current / dense_macs:.3f}): raise the budget")
        _, group, current = best
        chosen[group] = round(chosen[group] + step, 6)
    return {g: r for g, r in chosen.items() if r > 0}


def auto_plan(model: nn.Module, example_inputs: Sequence[Any], val_batches: Iterable[Any], *,
              macs_budget: float, importance: str | Importance = "l2",
              data: Iterable | None = None, normalize: str = "mean",
              calibration_batches: int | None = None, seed: int = 0, exact_only: bool = False,
              ignore: Sequence[str] = (), registry: RuleRegistry | None = None,
              leaf_modules: Sequence[type] = (), capture_method: str = "auto",
              ratios: Sequence[float] = RATIOS, progress: bool = True,
              **unused: Any) -> tuple[Plan, dict[str, Any]]:
    """A plan keeping at most ``macs_budget`` of the dense MACs, its per-group ratios chosen
    from each group's measured sensitivity on ``val_batches``; returns it with the
    measurements (``sensitivity.json``). Other ``prune`` settings are accepted and unused."""
    settings = PlanSettings(macs_budget=macs_budget, ignore=list(ignore), exact_only=exact_only)
    settings.validate()
    analysis = analyse_model(model, example_inputs, leaf_modules, registry, capture_method)
    ignored = {g.index for g in analysis.groups if any(
        fnmatch.fnmatch(name.rpartition(".")[0], pattern) or
        name.startswith(pattern + ".") for pattern in ignore for name, _ in g.members)}
    groups = [g for g in analysis.groups if (~g.blocked).any() and g.index not in ignored]
    scores = score(analysis, importance, groups, data=data, normalize=normalize, seed=seed,
                   batches=calibration_batches)
    measured = measure(model, analysis, scores, val_batches, ratios, exact_only, progress)
    cost = PruneCost(analysis, registry)
    chosen = allocate(measured, analysis, scores, cost.macs_after, macs_budget, exact_only)
    removed = removal(analysis, scores, chosen, exact_only)
    plan = plan_of(analysis, removed)
    plan.settings = {"auto": True, "macs_budget": macs_budget, "importance": str(importance),
                     "group_ratios": {str(g): r for g, r in chosen.items()}}
    measured["group_ratios"] = plan.settings["group_ratios"]
    measured["macs_ratio_predicted"] = cost.macs_after(removed) / cost.dense_macs
    return plan, measured


def plot(sensitivity: Mapping[str, Any], path: str | os.PathLike, top: int = 12) -> None:
    """Accuracy against ratio for the most sensitive groups (``sensitivity.png``)."""
    from matplotlib.figure import Figure

    rows = sorted(sensitivity["groups"], key=lambda r: min(r["accuracy"]))[:top]
    figure = Figure(figsize=(7, 4.5))
    ax = figure.subplots()
    for row in rows:
        ax.plot(sensitivity["ratios"], row["accuracy"], marker="o", markersize=3,
                label=f"[{row['group']}] {row['members'][0]}")
    ax.axhline(sensitivity["dense_accuracy"], color="grey", lw=0.8, ls="--", label="dense")
    ax.set_xlabel("ratio of the group's units removed (that group alone)")
    ax.set_ylabel("validation accuracy")
    ax.set_title("sensitivity per group")
    ax.legend(fontsize=6)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
