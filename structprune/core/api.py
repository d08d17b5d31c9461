"""One call for the whole pass: capture, analyse, score, plan, apply, verify."""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from structprune.config import PruneConfig, make_config
from structprune.core.analyse import Analysis
from structprune.core.apply import apply_plan, check_plan
from structprune.core.capture import capture
from structprune.core.cost import PruneCost
from structprune.core.counts import count_macs, count_params
from structprune.core.plan import Plan, sized_attributes, sliced_params
from structprune.core.prepare import prepare
from structprune.core.registry import RuleRegistry
from structprune.core.selection import make_plan, refine
from structprune.core.verify import (
    Verification,
    compare,
    flatten_outputs,
    reference_outputs,
    verify,
)
from structprune.errors import CaptureError, VerificationError
from structprune.tree import evaluation, random_inputs


@dataclass
class PruneResult:
    """The pruned model with its plan, analysis, figures and verification."""

    model: nn.Module
    plan: Plan
    analysis: Analysis
    figures: dict[str, Any] = field(default_factory=dict)
    verification: Verification | None = None


def exact_subplan(analysis: Analysis, plan: Plan) -> Plan:
    """The part of ``plan`` that removes only units of exact (non-approximate) groups."""
    removed = analysis.removed_components(plan.params)
    # per unit: the exact units of a group that also has approximate ones stay checked
    approximate = [g.units[g.approximate] for g in analysis.groups if g.approximate.any()]
    if not any(removed[units].any() for units in approximate):
        return plan
    for units in approximate:
        removed[units] = False
    return Plan(sliced_params(analysis, removed), plan.groups, plan.settings,
                attributes=sized_attributes(analysis, removed))


def prune(
    model: nn.Module,
    example_inputs: Sequence[Any] | Any,
    ratio: float | None = None,
    *,
    config: PruneConfig | None = None,
    plan: Plan | None = None,
    data: Iterable | None = None,
    inplace: bool = False,
    registry: RuleRegistry | None = None,
    leaf_modules: Sequence[type] = (),
    **settings: Any,
) -> PruneResult:
    """Prune ``model`` and return it (a copy unless ``inplace``) with its plan and figures.

    The settings are ``config`` (a :class:`~structprune.config.PruneConfig`, its defaults when
    not given) with ``ratio`` and ``settings`` (its field names, such as ``exact_only=True``
    or ``criterion="taylor"``) replaced; an unknown name is refused. What goes: ``ratio``
    (per group, or over all groups with ``global_ranking``), or ``threshold``, or
    ``macs_budget`` / ``params_budget`` (see :class:`~structprune.config.PruneConfig`).
    ``data`` (``(inputs, targets)`` batches) feeds the data-driven criteria.

    With ``check`` (the default) the pruned model is compared with the dense model whose
    removed channels are masked; a mismatch raises :class:`VerificationError`. When
    approximate groups were pruned, the check covers the exact part of the plan.
    A given ``plan`` (e.g. loaded from plan.json) is applied instead of making one: the
    selection and scoring settings then play no part.
    """
    config = make_config(config, ratio, **settings)
    given_plan = plan is not None
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    prepared = prepare(model, example_inputs, config, data=data, registry=registry,
                       leaf_modules=leaf_modules, scored=not given_plan)
    analysis, cap = prepared.analysis, prepared.analysis.capture
    t3 = time.perf_counter()
    if plan is None:
        budget = config.mode in ("macs_budget", "params_budget")
        plan = make_plan(analysis, prepared.scores, config,
                         cost=PruneCost(analysis, registry) if budget else None)
        if prepared.rescore is not None:  # the same widths, channels chosen on pruned inputs
            plan = refine(analysis, prepared.scores, config, plan, prepared.rescore)
    else:
        check_plan(model, plan)
    t4 = time.perf_counter()

    dense_figures = {"params_dense": count_params(model), "macs_dense": count_macs(cap, registry)}
    inputs = random_inputs(example_inputs, seed=1)
    t5 = time.perf_counter()
    # with a check, in place happens last, once the plan has been checked on a copy
    pruned = apply_plan(model, plan, inplace=inplace and not config.check, registry=registry)
    t6 = time.perf_counter()
    timings = {**prepared.seconds, "plan": t4 - t3, "apply": t6 - t5}
    verification = None
    if config.check:
        verification = _check(analysis, plan, model, pruned, inputs, config.tolerance, registry,
                              given_plan, config.exact_only)
    if inplace and config.check:
        pruned = apply_plan(model, plan, inplace=True, registry=registry)
    try:
        figures = figures_for(dense_figures, pruned, example_inputs, leaf_modules, registry,
                              cap.method)
    except CaptureError as exc:  # unchecked (check=False) and broken: not an input problem
        raise VerificationError(_fails_to_run(exc, given_plan)) from exc
    figures["seconds"] = timings
    if prepared.criterion:  # its name, fallbacks and notes (label-free loss, ...)
        figures["criterion"] = prepared.criterion
    figures.update(analysis.summary())
    approx_pruned = [g["index"] for g in plan.groups
                     if g["status"] == "approximate" and g["kept"] < g["units"]]
    figures["groups_pruned"] = sum(1 for g in plan.groups if g["kept"] < g["units"])
    figures["approximate_groups_pruned"] = len(approx_pruned)
    return PruneResult(pruned, plan, analysis, figures, verification)


def _fails_to_run(exc: BaseException, given_plan: bool) -> str:
    first = str(exc).splitlines()[0] if str(exc) else ""
    what = f"the pruned model fails to run ({type(exc).__name__}: {first})"
    if given_plan:
        return (f"{what}: the given plan does not slice every coupled tensor of this model; "
                "make plans with `structprune prune` or structprune.make_plan")
    return f"{what}; please report this model, and --ignore the modules involved meanwhile"


def _check(analysis: Analysis, plan: Plan, model: nn.Module, pruned: nn.Module,
           inputs: tuple, tolerance: float, registry: RuleRegistry | None, given_plan: bool = False,
           exact_only: bool = False) -> Verification:
    """Compare with the masked dense model: the whole plan when it is exact, else its exact
    part; the pruned model itself must run and keep the dense output shapes either way."""
    checked = exact_subplan(analysis, plan)
    try:
        reference = reference_outputs(analysis, checked, inputs)
        exact_model = pruned if checked is plan else \
            apply_plan(model, checked, inplace=False, registry=registry)
        verification = verify(analysis, checked, exact_model, inputs, tolerance, reference)
        if checked is not plan:
            with torch.no_grad(), evaluation(pruned):
                got = flatten_outputs(pruned(*inputs))
            want = flatten_outputs(reference)
            if [t.shape for t in got] != [t.shape for t in want]:
                raise RuntimeError("output shapes changed")
            verification.approximate_rel_error = compare(reference, pruned(*inputs)).max_rel_error
    except Exception as exc:  # noqa: BLE001 - a pruned model that cannot run is refused
        raise VerificationError(_fails_to_run(exc, given_plan)) from exc
    verification.exact_units_only = checked is plan
    if not verification.ok:
        advice = ("the given plan does not slice every coupled tensor; make plans with "
                  "`structprune prune` or structprune.make_plan") if given_plan else \
            "please report this model, and --ignore the modules involved meanwhile" if exact_only \
            else "please report this model. Use --exact-only or --ignore the modules involved"
        raise VerificationError(
            f"pruned model differs from the masked dense model (relative error "
            f"{verification.max_rel_error:.2e} > {tolerance:.0e}); {advice}")
    return verification


def figures_for(dense: dict[str, int], pruned: nn.Module, example_inputs: Sequence[Any],
                leaf_modules: Sequence[type] = (), registry: RuleRegistry | None = None, method: str = "auto",
                ) -> dict[str, Any]:
    """Parameters and MACs before (counted before surgery) and after."""
    pruned_capture = capture(pruned, example_inputs, leaf_modules, registry, method)
    dense_params, dense_macs = dense["params_dense"], dense["macs_dense"]
    pruned_macs = count_macs(pruned_capture, registry)
    pruned_params = count_params(pruned)
    return {
        "params_dense": dense_params, "params_pruned": pruned_params,
        "macs_dense": dense_macs, "macs_pruned": pruned_macs,
        "macs_ratio": pruned_macs / dense_macs if dense_macs else 1.0,
        "params_ratio": pruned_params / dense_params if dense_params else 1.0,
    }
