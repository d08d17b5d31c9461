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

from structprune.accuracy.evaluate import evaluate, fidelity
from structprune.accuracy.recover import BATCH_NORMS, recover
from structprune.batches import split
from structprune.config import PruneConfig, make_config
from structprune.core.analyse import Analysis
from structprune.core.apply import apply_plan
from structprune.core.cost import PruneCost
from structprune.core.plan import Plan
from structprune.core.prepare import prepare
from structprune.core.registry import RuleRegistry
from structprune.core.selection import (
    group_keep,
    plan_from_keep,
    prunable_units,
    refine,
    removal_order,
    removed_units,
)
from structprune.errors import PlanError

RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


class GroupRatios:
    """Plans removing a ratio of chosen groups' prunable units, least important first, by
    the plan's selection (:mod:`structprune.core.selection`): the units that may go under
    ``config`` (``exact_only``, ``ignore``), kept counts within its ``min_width`` (and
    ``round_to``). A ratio applies to a group's prunable units; at least one unit stays."""

    def __init__(self, analysis: Analysis, scores: Mapping[int, np.ndarray],
                 config: PruneConfig):
        self.analysis = analysis
        self.config = config
        self.candidates, _ = prunable_units(analysis, scores, config)
        self.ranked = removal_order(scores, self.candidates)
        self._groups = {g.index: g for g in analysis.groups}

    def keep(self, ratios: Mapping[int, float]) -> dict[int, int]:
        """Units each group of ``ratios`` keeps when it loses that ratio of its prunable
        units."""
        return {g: group_keep(self._groups[g], self.candidates[g],
                              int(int(self.candidates[g].sum()) * ratio), self.config)
                for g, ratio in ratios.items()}

    def removed(self, ratios: Mapping[int, float]) -> np.ndarray:
        """The components removed (a bool each) by :meth:`plan`."""
        return removed_units(self.analysis, self.keep(ratios), self.ranked)

    def plan(self, ratios: Mapping[int, float]) -> Plan:
        """The plan removing ``ratios[g]`` of each group ``g``'s prunable units."""
        return plan_from_keep(self.analysis, self.keep(ratios), self.ranked, self.config)


def quality(model: nn.Module, dense: nn.Module, batches: list[Any]) -> tuple[float, str]:
    """How good ``model`` is on ``batches``, and what that number is: accuracy when the
    batches carry labels; without labels its fidelity to ``dense``, the top-1 agreement for a
    classifier, else one minus the mean relative output error (1.0 for ``dense`` itself)."""
    if batches and split(batches[0])[1] is not None:
        return evaluate(model, batches).accuracy, "accuracy"
    found = fidelity(model, dense, batches)
    if found["top1_agreement"] is not None:
        return found["top1_agreement"], "top-1 agreement with the dense model"
    errors = list(found["rel_error"].values())
    return 1.0 - sum(errors) / max(1, len(errors)), "1 - relative output error"


def measure(model: nn.Module, selection: GroupRatios, batches: Iterable[Any],
            ratios: Sequence[float] = RATIOS, progress: bool = True,
            recalibrate: Iterable[Any] | None = None) -> dict[str, Any]:
    """Accuracy on ``batches`` with each prunable group alone pruned at each ratio (on
    batches without labels, fidelity to the dense model: :func:`quality`; ``measured``
    says which). With ``recalibrate`` (calibration batches), each trial's BatchNorm
    statistics are first re-estimated on them (``recover``'s ``bn``), as the recovery that
    follows the plan will: a group the stale statistics ruin but recalibration repairs is
    not mistaken for a sensitive one (Li et al. 2020, "EagleEye": accuracy after adaptive
    BatchNorm predicts accuracy after fine-tuning, raw accuracy does not)."""
    batches = list(batches)
    recalibrate = list(recalibrate or ())
    if not any(isinstance(m, BATCH_NORMS) for m in model.modules()):
        recalibrate = []  # nothing to re-estimate
    dense, what = quality(model, model, batches)
    groups = [g for g in selection.analysis.groups if g.index in selection.candidates]
    rows = []
    steps = tqdm(total=len(groups) * len(ratios), desc="sensitivity", unit="trial",
                 disable=not progress)
    with steps:
        for group in groups:
            accuracy = []
            for ratio in ratios:
                plan = selection.plan({group.index: ratio})
                pruned = apply_plan(model, plan)
                if recalibrate:
                    recover(pruned, model, plan, selection.analysis, recalibrate, "bn")
                accuracy.append(quality(pruned, model, batches)[0])
                steps.update()
            rows.append({"group": group.index, "units": int(group.size),
                         "members": [f"{n}:{d}" for n, d in group.members[:3]],
                         "accuracy": accuracy})
    found = {"dense_accuracy": dense, "measured": what, "ratios": list(ratios),
             "groups": rows}
    if recalibrate:
        found["recalibrated"] = (f"each trial's BatchNorm statistics were re-estimated on "
                                 f"{len(recalibrate)} calibration batches before it was "
                                 f"measured")
    return found


def allocate(sensitivity: Mapping[str, Any], selection: GroupRatios,
             macs_after: Callable[[np.ndarray], float], budget: float, step: float = 0.05,
             ) -> dict[int, float]:
    """Per-group ratios whose model keeps at most ``budget`` of the dense MACs, chosen by
    the least predicted accuracy loss per MAC saved, each at most the largest ratio measured
    and ``max_group_ratio``; raises PlanError if none can."""
    ratios = [0.0, *sensitivity["ratios"]]
    curves = {row["group"]: [sensitivity["dense_accuracy"], *row["accuracy"]]
              for row in sensitivity["groups"]}
    ceiling = min(max(ratios), selection.config.max_group_ratio)

    def loss(group: int, ratio: float) -> float:
        return sensitivity["dense_accuracy"] - float(np.interp(ratio, ratios, curves[group]))

    dense_macs = macs_after(np.zeros(selection.analysis.n_components, bool))
    chosen = dict.fromkeys(curves, 0.0)
    current = macs_after(selection.removed(chosen))
    while current > budget * dense_macs:
        best = None
        for group, ratio in chosen.items():
            # the next ratio that removes another unit: in a group of fewer than 1 / step
            # units one step removes none, and the group would never be pruned
            after = round(ratio + step, 6)
            while after <= ceiling + 1e-9:
                macs = macs_after(selection.removed({**chosen, group: after}))
                if macs < current:
                    break
                after = round(after + step, 6)
            else:
                continue
            cost = (loss(group, after) - loss(group, ratio)) / (current - macs)
            if best is None or cost < best[0]:
                best = (cost, group, after, macs)
        if best is None:
            raise PlanError(f"no ratios up to {ceiling:g} per group reach {budget:g} of the "
                            f"MACs (lowest {current / dense_macs:.3f}): raise the budget")
        _, group, chosen[group], current = best  # group first, then its ratio
    return {g: r for g, r in chosen.items() if r > 0}


def auto_plan(model: nn.Module, example_inputs: Sequence[Any], val_batches: Iterable[Any],
              config: PruneConfig | None = None, *, data: Iterable | None = None,
              registry: RuleRegistry | None = None, leaf_modules: Sequence[type] = (),
              ratios: Sequence[float] = RATIOS, progress: bool = True,
              recalibrate: Iterable[Any] | None = None,
              **settings: Any) -> tuple[Plan, dict[str, Any]]:
    """A plan keeping at most ``macs_budget`` of the dense MACs, its per-group ratios chosen
    from each group's measured sensitivity on ``val_batches``; returns it with the
    measurements (``sensitivity.json``).

    The pass settings are ``config`` with ``settings`` (its field names) replaced, as
    :func:`structprune.prune` takes them; ``macs_budget`` must be set. Each group's units go
    least important first (``criterion``, on ``data`` for the data-driven ones), within
    ``exact_only``, ``ignore``, ``min_width`` and ``max_group_ratio``; ``round_to`` is
    refused. The plan's check is :func:`structprune.prune`'s when it is applied. With
    ``recalibrate`` (calibration batches: pass them when BatchNorm recalibration, ``bn``,
    will follow), each trial is measured after its BatchNorm statistics are re-estimated
    (:func:`measure`)."""
    config = make_config(config, **settings)
    if config.macs_budget is None:
        raise PlanError("auto_plan meets a MACs budget: set macs_budget (--macs-budget)")
    if config.round_to != 1:
        # rounded widths jump several units at once: the allocation would read a step's
        # loss off the measured curve at its nominal ratio, not at the share it removes
        raise PlanError(f"--auto chooses each group's ratio unit by unit: it does not combine "
                        f"with --round-to {config.round_to}")
    prepared = prepare(model, example_inputs, config, data=data, registry=registry,
                       leaf_modules=leaf_modules)
    selection = GroupRatios(prepared.analysis, prepared.scores, config)
    measured = measure(model, selection, val_batches, ratios, progress, recalibrate)
    cost = PruneCost(prepared.analysis, registry)
    chosen = allocate(measured, selection, cost.macs_after, config.macs_budget)
    plan = selection.plan(chosen)
    if prepared.rescore is not None:  # the chosen widths, channels chosen on pruned inputs
        plan = refine(prepared.analysis, prepared.scores, config, plan, prepared.rescore)
        measured["channels"] = ("each group's accuracy above was measured with the channels "
                                "the criterion's dense scores drop; the plan keeps the widths "
                                "allocated from it, with channels chosen sequentially")
    plan.settings.update(auto=True, group_ratios={str(g): r for g, r in chosen.items()})
    measured["group_ratios"] = plan.settings["group_ratios"]
    measured["macs_ratio_predicted"] = \
        cost.macs_after(selection.removed(chosen)) / cost.dense_macs
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
