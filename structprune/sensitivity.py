"""Sensitivity: how much accuracy each group loses when it alone is pruned, and per-group
ratios that meet a MACs budget with the least predicted loss (``prune --auto``).

``measure`` prunes each prunable group alone at several ratios (its least important units
first, as the plan would) and evaluates the result on validation batches; ``allocate``
then raises group ratios greedily, always taking the step that loses the least predicted
accuracy per MAC saved (losses read off the measured curves, added over groups), until the
model's MACs, counted exactly from the graph, fall within the budget.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch.nn as nn
from tqdm import tqdm

from .analyse import Analysis, Group
from .apply import apply_plan
from .errors import PlanError
from .evaluate import evaluate
from .plan import Plan, sized_attributes, sliced_params

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
    return Plan(sliced_params(analysis, removed), attributes=sized_attributes(analysis, removed))


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
