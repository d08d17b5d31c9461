"""Stage 6, verify: the pruned model must equal the dense model with removed channels masked.

The masked model is the captured dense graph with a multiplication by a 0/1 mask inserted
at every *consumption* the analysis recorded (a conv's or linear's input, a matmul operand,
a sum): zeroing a channel there is exactly what deleting it does. If pruning removed
anything else that mattered, or sliced a tensor inconsistently, outputs differ.

A model that ranks values (top-k query selection, sorted detections) turns float32 rounding
into large output differences wherever two values nearly tie, in the masked model as in the
pruned one: when float32 disagrees, both are compared again in float64, where rounding is
far too small to reorder anything; the verdict is then float64's, and the float32 error is
kept beside it.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from structprune.batches import flatten_outputs
from structprune.core.analyse import Analysis
from structprune.core.plan import Plan
from structprune.tree import evaluation, resolve_target


@dataclass
class Verification:
    """How far the pruned model's outputs are from the masked dense model's."""

    max_abs_error: float
    max_rel_error: float
    tolerance: float
    exact_units_only: bool = True
    approximate_rel_error: float | None = None  # whole plan, when approximate groups were cut
    float32_rel_error: float | None = None  # set when float64 gave the verdict

    @property
    def ok(self) -> bool:
        return self.max_rel_error <= self.tolerance

    def to_json(self) -> dict[str, Any]:
        return {"ok": self.ok, "max_abs_error": self.max_abs_error,
                "max_rel_error": self.max_rel_error, "tolerance": self.tolerance,
                "exact_units_only": self.exact_units_only,
                "approximate_rel_error": self.approximate_rel_error,
                "float32_rel_error": self.float32_rel_error}


def masked_model(analysis: Analysis, plan: Plan) -> fx.GraphModule:
    """The dense graph with the plan's removed channels zeroed at every consumer."""
    capture = analysis.capture
    removed = analysis.removed_components(plan.params)
    graph = fx.Graph()
    gm_src = capture.graph_module
    env: dict[fx.Node, fx.Node] = {}
    masks: dict[str, torch.Tensor] = {}
    by_node: dict[str, list] = {}
    for c in analysis.consumptions:
        by_node.setdefault(c.node, []).append(c)
    for node in gm_src.graph.nodes:
        new = graph.node_copy(node, lambda n: env[n])
        for c in by_node.get(node.name, []):
            keep = ~removed[analysis.component[c.ids]]
            if keep.all():
                continue
            shape = [1] * c.ndim
            for d, size in zip(c.dims, c.ids.shape, strict=True):
                shape[d] = size
            name = f"_structprune_mask_{len(masks)}"
            masks[name] = torch.as_tensor(keep.astype(np.float32)).reshape(shape)
            with graph.inserting_before(new):
                mask = graph.get_attr(name)
                source = new.args[c.arg] if isinstance(c.arg, int) else new.kwargs[c.arg]
                typed = graph.call_method("type_as", (mask, source))  # bf16/fp16 models
                masked = graph.call_function(torch.mul, (source, typed))
            if isinstance(c.arg, int):
                args = list(new.args)
                args[c.arg] = masked
                new.args = tuple(args)
            else:
                new.kwargs = {**new.kwargs, c.arg: masked}
        env[node] = new
    root: dict[str, Any] = dict(masks)
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr") and node.target not in root:
            root[node.target] = gm_src.get_submodule(node.target) if node.op == "call_module" \
                else resolve_target(gm_src, node.target)
    return fx.GraphModule(root, graph)


def compare(reference: Any, candidate: Any, tolerance: float = 1e-4) -> Verification:
    """Largest absolute and relative (to the reference's largest value) output difference."""
    refs, cands = flatten_outputs(reference), flatten_outputs(candidate)
    if len(refs) != len(cands):
        return Verification(float("inf"), float("inf"), tolerance)
    max_abs, max_rel = 0.0, 0.0
    for r, c in zip(refs, cands, strict=True):
        if r.shape != c.shape:
            return Verification(float("inf"), float("inf"), tolerance)
        r, c = r.detach().double(), c.detach().double()
        finite = torch.isfinite(r)
        # NaN and inf must sit in the same places with the same values; the rest is compared
        same_special = torch.equal(finite, torch.isfinite(c)) and torch.equal(
            torch.where(finite, 0, r).nan_to_num(nan=7.0), torch.where(finite, 0, c).nan_to_num(nan=7.0))
        if not same_special:
            return Verification(float("inf"), float("inf"), tolerance)
        r, c = r[finite], c[finite]
        diff = float((r - c).abs().max()) if r.numel() else 0.0
        scale = float(r.abs().max()) if r.numel() else 0.0
        max_abs = max(max_abs, diff)
        max_rel = max(max_rel, diff / max(scale, 1e-12))
    return Verification(max_abs, max_rel, tolerance)


def reference_outputs(analysis: Analysis, plan: Plan, inputs: Sequence[Any]) -> Any:
    """Outputs of the masked dense model (eval mode) on ``inputs``."""
    masked = masked_model(analysis, plan)
    with torch.no_grad(), evaluation(masked):
        return masked(*inputs)


def verify(analysis: Analysis, plan: Plan, pruned: nn.Module, inputs: Sequence[Any],
           tolerance: float = 1e-4, reference: Any = None) -> Verification:
    """Compare ``pruned`` with the masked dense model on ``inputs``."""
    if reference is None:
        reference = reference_outputs(analysis, plan, inputs)
    with torch.no_grad(), evaluation(pruned):
        out = pruned(*inputs)
    result = compare(reference, out, tolerance)
    return result if result.ok else _in_float64(analysis, plan, pruned, inputs, result)


def _in_float64(analysis: Analysis, plan: Plan, pruned: nn.Module, inputs: Sequence[Any],
                float32: Verification) -> Verification:
    """The comparison again with both models and the inputs in float64 (copies); ``float32``
    itself when that differs too or cannot run (a dtype fixed in the model's code)."""
    wide = tuple(x.double() if isinstance(x, torch.Tensor) and x.is_floating_point() else x
                 for x in inputs)
    try:
        masked = copy.deepcopy(masked_model(analysis, plan)).double()
        candidate = copy.deepcopy(pruned).double()
        with torch.no_grad(), evaluation(masked, candidate):
            result = compare(masked(*wide), candidate(*wide), float32.tolerance)
    except Exception:  # noqa: BLE001 - the float32 verdict stands
        return float32
    if not result.ok:
        return float32
    result.float32_rel_error = float32.max_rel_error
    return result
