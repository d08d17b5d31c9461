"""Stage 4, plan: selection. Which units each group keeps, under a :class:`PruneConfig`.

The units that may go (:func:`prunable_units`) are removed least important first
(:func:`removal_order`); how many each group keeps (:func:`group_keep`, within
:func:`keep_bounds`) follows from the ratio, the threshold, global ranking or a MACs or
parameter budget (:func:`make_plan`), and :func:`plan_from_keep` writes the plan removing
them. The speed search and ``--auto`` choose their own kept counts and write their plans
through the same functions, and so do the steps of iterative pruning (:func:`plan_toward`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from structprune.config import PruneConfig
from structprune.core.analyse import Analysis, Group, matches, module_of
from structprune.core.cost import PruneCost
from structprune.core.plan import Plan, sized_attributes, sliced_params
from structprune.errors import PlanError


def check_names(analysis: Analysis, patterns: Iterable[str], what: str) -> None:
    """Refuse a module name or glob that matches no module with parameters."""
    if not patterns:
        return
    modules = {module_of(name) for name in analysis.sizes}
    for pattern in patterns:
        if not any(matches(pattern, m) for m in modules):
            raise PlanError(f"{what} {pattern!r} matches no module with parameters; "
                            "names look like 'features.0' or 'layer1.0.conv1'")


def make_plan(analysis: Analysis, scores: Mapping[int, np.ndarray],
              config: PruneConfig | None = None, *, cost: PruneCost | None = None) -> Plan:
    """Choose the units each group keeps and list the resulting tensor slices.

    ``cost`` is the cost model for a MACs or parameter budget (built from ``analysis`` with
    the default registry when not given). ``config.sequential`` plays no part here: the
    channels are chosen again by :func:`refine` (as :func:`structprune.prune` does)."""
    config = config or PruneConfig()
    if config.round_to == "auto":
        raise PlanError("round_to 'auto' is chosen by timing candidates on a runtime: use "
                        "structprune.deploy.tune.fastest_rounding (CLI: prune --round-to auto)")
    candidates, group_ratio = prunable_units(analysis, scores, config)
    groups = {group.index: group for group in analysis.groups}
    ranked = removal_order(scores, candidates)
    extra: dict[str, Any] = {}
    mode = config.mode
    if mode in ("macs_budget", "params_budget"):
        cost = cost or PruneCost(analysis)
        keep, ranked, extra["budget"] = _budget(analysis, candidates, scores, config, cost)
    else:
        wanted: dict[int, int] = {}
        if mode == "threshold":
            for g, c in candidates.items():
                below = int((scores[g][c] < config.threshold).sum())
                wanted[g] = min(below, int(len(c) * config.max_group_ratio))
        elif config.global_ranking and candidates:
            pool = np.concatenate([scores[g][c] for g, c in candidates.items()])
            k = int(len(pool) * config.removal_ratio)
            threshold = np.partition(pool, k - 1)[k - 1] if k > 0 else -np.inf
            for g, c in candidates.items():
                below = int((scores[g][c] <= threshold).sum())
                wanted[g] = min(below, int(len(c) * config.max_group_ratio))
        else:
            for g, c in candidates.items():
                wanted[g] = int(len(c) * group_ratio[g])
        keep = {g: group_keep(groups[g], c, wanted[g], config) for g, c in candidates.items()}
    return plan_from_keep(analysis, keep, ranked, config, extra)


def prunable_units(analysis: Analysis, scores: Mapping[int, np.ndarray], config: PruneConfig,
                   ) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Per scored group with something to prune (:meth:`Analysis.prunable_groups` under
    ``exact_only`` and ``ignore``): which of its units may go (a mask), and the ratio that
    applies to it (``config``'s, or a per-module override)."""
    check_names(analysis, config.ignore, "ignored name")
    check_names(analysis, config.ratios, "ratio override")
    candidates: dict[int, np.ndarray] = {}
    group_ratio: dict[int, float] = {}
    for group in analysis.prunable_groups(config.exact_only, config.ignore):
        if group.index not in scores:
            continue
        candidates[group.index] = group.prunable(config.exact_only)
        group_ratio[group.index] = config.removal_ratio
        for pattern, ratio in config.ratios.items():
            if group.matches([pattern]):
                group_ratio[group.index] = ratio
    return candidates, group_ratio


def plan_toward(analysis: Analysis, scores: Mapping[int, np.ndarray], config: PruneConfig,
                target: Plan, fraction: float) -> Plan:
    """One step of iterative pruning toward ``target``, the plan made in one step on the dense
    model: each group that ``target`` narrows from ``n`` dense units to ``K`` keeps
    ``n * (K / n) ** fraction`` (geometric steps, each removing about the same share of what
    is left), a multiple of ``round_to``, at most what it has now and at least ``K``; its
    least important units by ``scores`` go. Groups are matched by their members, so
    ``analysis`` may be of a model earlier steps pruned. At ``fraction`` 1 every group has
    the target's width: the steps end where one step would have, whatever the rounding."""
    if not 0 < fraction <= 1:
        raise PlanError(f"a step's fraction of the way must be in (0, 1], not {fraction}")
    final = {tuple(g["members"]): (g["units"], g["kept"]) for g in target.groups
             if g["kept"] < g["units"]}
    candidates, _ = prunable_units(analysis, scores, config)
    keep: dict[int, int] = {}
    for group in analysis.groups:
        key = tuple(f"{n}:{d}" for n, d in group.members)
        found = final.get(key)
        if found is None or group.index not in candidates:
            continue
        dense, kept = found
        step = _step(config.round_to, group.width)
        wanted = kept if fraction == 1 else \
            -(-round(dense * (kept / dense) ** fraction) // step) * step
        # never below the units that may not go, never wider than the group is now
        fewest = int((~candidates[group.index]).sum())
        keep[group.index] = min(group.size, max(kept, wanted, fewest))
        del final[key]
    if fraction == 1 and final:
        raise PlanError(f"{len(final)} group(s) of the one-step plan, e.g. "
                        f"{next(iter(final))[0]}, cannot be narrowed on this model: prune the "
                        "model the plan was made for, in one step")
    return plan_from_keep(analysis, keep, removal_order(scores, candidates), config)


def refine(analysis: Analysis, scores: Mapping[int, np.ndarray], config: PruneConfig,
           plan: Plan, rescore: Callable[[Mapping[int, int]], dict[int, np.ndarray]]) -> Plan:
    """``plan`` with every group's width, its units chosen again: by ``rescore`` (given the
    units each group loses, the new scores of the groups it measures; a criterion's
    sequential scoring) where it gives scores, by ``scores`` elsewhere. The plan's settings
    and extras stay."""
    removals = {g["index"]: g["units"] - g["kept"] for g in plan.groups}
    refined = plan_toward(analysis, {**scores, **rescore(removals)}, config, plan, 1.0)
    refined.settings, refined.extra = dict(plan.settings), dict(plan.extra)
    return refined


def removal_order(scores: Mapping[int, np.ndarray], candidates: Mapping[int, np.ndarray],
                  ) -> dict[int, np.ndarray]:
    """Per group: its prunable units (local indices), least important first."""
    return {g: np.flatnonzero(c)[np.argsort(scores[g][c], kind="stable")]
            for g, c in candidates.items()}


def keep_bounds(group: Group, prunable: np.ndarray, config: PruneConfig) -> int:
    """The fewest units ``group`` may keep: its unprunable units, ``min_width`` channels and
    what ``max_group_ratio`` leaves."""
    most_removed = int(int(prunable.sum()) * config.max_group_ratio)
    return max(group.size - most_removed, int((~prunable).sum()),
               math.ceil(config.min_width / group.width), 1)


def group_keep(group: Group, prunable: np.ndarray, wanted: int, config: PruneConfig) -> int:
    """Units a group keeps when ``wanted`` of its prunable units should go: at least its
    unprunable units and ``min_width`` channels, a multiple of ``round_to`` channels."""
    return _rounded_keep(group.size, wanted, _step(config.round_to, group.width),
                         int((~prunable).sum()), math.ceil(config.min_width / group.width))


def _step(round_to: int, width: int) -> int:
    return max(1, round_to // math.gcd(round_to, width))


def _rounded_keep(n: int, n_remove: int, step: int, unprunable: int, min_units: int) -> int:
    keep = n - n_remove
    if step > 1:
        keep = max(step, int(math.floor(keep / step + 0.5)) * step)
    keep = max(keep, unprunable, min_units)
    if step > 1:  # the floors above may break the multiple: round up again
        keep = -(-keep // step) * step
    return int(min(n, keep))


def removed_units(analysis: Analysis, keep: Mapping[int, int],
                  ranked: Mapping[int, np.ndarray]) -> np.ndarray:
    """The components removed (a bool each) when each group ``g`` keeps ``keep[g]`` units,
    losing its units in the order ``ranked[g]`` (groups not in ``keep`` stay whole)."""
    removed = np.zeros(analysis.n_components, bool)
    for group in analysis.groups:
        kept = int(keep.get(group.index, group.size))
        if kept < group.size:
            removed[group.units[ranked[group.index][:group.size - kept]]] = True
    return removed


def plan_from_keep(analysis: Analysis, keep: Mapping[int, int],
                   ranked: Mapping[int, np.ndarray], config: PruneConfig,
                   extra: dict[str, Any] | None = None) -> Plan:
    """The plan keeping ``keep[g]`` units of each group ``g``, removing its units in the
    order ``ranked[g]`` (groups not in ``keep`` stay whole); its settings are ``config``'s."""
    removed = removed_units(analysis, keep, ranked)
    decisions: list[dict[str, Any]] = []
    for group in analysis.groups:
        entry: dict[str, Any] = {
            "index": group.index, "units": group.size, "width": group.width,
            "members": [f"{n}:{d}" for n, d in group.members], "status": group.status,
        }
        if group.reasons:
            entry["reasons"] = {k: sorted(set(v))[:5] for k, v in group.reasons.items()}
        entry["kept"] = int(keep.get(group.index, group.size))
        decisions.append(entry)
    return Plan(sliced_params(analysis, removed), decisions, config.to_json(),
                dict(extra or {}), attributes=sized_attributes(analysis, removed))


def _budget(analysis: Analysis, candidates: dict[int, np.ndarray],
            scores: Mapping[int, np.ndarray], config: PruneConfig, cost: PruneCost,
            ) -> tuple[dict[int, int], dict[int, np.ndarray], dict[str, Any]]:
    """Kept units per group and each group's removal order for a MACs or parameter budget.

    All prunable units are ordered by score per unit of cost saved (MACs or parameters of
    the dense model, cheapest importance first, ties in group order). Removing the first k
    of them, within each group's constraints (max_group_ratio, min_width, round_to), leaves
    a cost that never grows with k; a bisection finds the smallest k within the budget."""
    groups = {group.index: group for group in analysis.groups}
    kind = "macs" if config.mode == "macs_budget" else "params"
    fraction = config.macs_budget if kind == "macs" else config.params_budget
    after = cost.macs_after if kind == "macs" else cost.params_after
    dense = cost.dense_macs if kind == "macs" else cost.dense_params
    unit_cost = cost.unit_macs() if kind == "macs" else cost.unit_params()
    limit = fraction * dense

    order_g = list(candidates)
    local = [np.flatnonzero(candidates[g]) for g in order_g]
    group_of = np.repeat(np.arange(len(order_g)), [len(u) for u in local]).astype(np.int64)
    units = np.concatenate(local) if local else np.zeros(0, np.int64)
    score = np.concatenate([scores[g][u] for g, u in zip(order_g, local, strict=True)]) \
        if local else np.zeros(0)
    saved = np.concatenate([unit_cost[groups[g].units[u]]
                            for g, u in zip(order_g, local, strict=True)]) \
        if local else np.zeros(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        per_cost = np.where(saved > 0, score / np.where(saved > 0, saved, 1.0), np.inf)
    order = np.argsort(per_cost, kind="stable")
    # each group's units in global order: the group removes a prefix of them
    ranked = {g: np.zeros(0, np.int64) for g in candidates}
    position = np.empty(len(order), np.int64)
    position[order] = np.arange(len(order))
    for i, g in enumerate(order_g):
        mine = np.flatnonzero(group_of == i)
        ranked[g] = units[mine[np.argsort(position[mine], kind="stable")]]
    caps = np.array([int(groups[g].size * config.max_group_ratio) for g in order_g], np.int64)

    def keep_of(k: int) -> tuple[dict[int, int], np.ndarray]:
        wanted = np.minimum(np.bincount(group_of[order[:k]], minlength=len(order_g)), caps)
        keep = {g: group_keep(groups[g], candidates[g], int(wanted[i]), config)
                for i, g in enumerate(order_g)}
        return keep, removed_units(analysis, keep, ranked)

    lo, hi = 0, len(order)  # the answer lies in [lo, hi]
    keep, removed = keep_of(hi)
    lowest = after(removed)
    if lowest > limit:
        reachable = math.ceil(lowest / dense * 1000) / 1000
        raise PlanError(
            f"{kind}_budget {fraction:g} cannot be reached: the lowest reachable is "
            f"{lowest / dense:.4f} of the dense {'MACs' if kind == 'macs' else 'parameters'}; "
            f"pass {reachable:g} or more, or relax max_group_ratio, min_width, round_to, "
            "ignore or exact_only")
    while lo < hi:
        mid = (lo + hi) // 2
        if after(keep_of(mid)[1]) <= limit:
            hi = mid
        else:
            lo = mid + 1
    keep, removed = keep_of(hi)
    info = {"kind": kind, "target": fraction, "units_ranked": int(hi),
            "macs_ratio_predicted": cost.macs_after(removed) / cost.dense_macs
            if cost.dense_macs else 1.0,
            "params_ratio_predicted": cost.params_after(removed) / cost.dense_params
            if cost.dense_params else 1.0}
    return keep, ranked, info


__all__ = ["check_names", "group_keep", "keep_bounds", "make_plan", "plan_from_keep",
           "plan_toward", "prunable_units", "refine", "removal_order", "removed_units"]
