"""Both capture paths know the same elementwise ops.

The fx path declares each op by its Python spellings (rules/elementwise.py); the torch.export
path declares the ATen overloads derived from them (rules/aten.py). These tests read the
registry, export every fx spelling with torch.export itself, and prune small models through
the ops that the export path once blocked, on both paths.
"""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from structprune.core.capture import export_graph
from structprune.core.rules import DEFAULT_REGISTRY
from structprune.core.rules import elementwise as fx_elementwise
from structprune.core.rules.aten import twins

from .oracles import check_pruned, randomize

FAMILY_RULES = {rule for rule, _ in fx_elementwise.FAMILIES}


def is_aten(target: Any) -> bool:
    return isinstance(target, torch._ops.OpOverload)


def fx_spellings() -> dict[Any, Any]:
    """Every function and method name the registry declares with an elementwise family's
    rule, with that rule (module types are leaves of the fx trace: export inlines them)."""
    return {target: op.rule for target, op in DEFAULT_REGISTRY.ops.items()
            if op.rule in FAMILY_RULES and not is_aten(target) and not isinstance(target, type)}


def aten_declarations() -> dict[Any, Any]:
    return {target: op.rule for target, op in DEFAULT_REGISTRY.ops.items()
            if op.rule in FAMILY_RULES and is_aten(target)}


# Argument lists tried on every spelling, from the inputs (x, y: float; b: bool; w: 1-d): the
# spellings take one tensor, two, a tensor and a number (either way round), three (lerp,
# addcmul, where, masked_fill), a prelu weight, an attribute name (getattr).
CALLS = [
    lambda x, y, b, w: (x,), lambda x, y, b, w: (x, y), lambda x, y, b, w: (x, 0.5),
    lambda x, y, b, w: (0.5, x), lambda x, y, b, w: (x, y, y), lambda x, y, b, w: (x, y, 0.5),
    lambda x, y, b, w: (x, 0.5, 0.5), lambda x, y, b, w: (b, x, y),
    lambda x, y, b, w: (x, b, 0.5), lambda x, y, b, w: (b,), lambda x, y, b, w: (b, b),
    lambda x, y, b, w: (x, w), lambda x, y, b, w: (x, "shape"),
]


def inputs_of(ndim: int) -> tuple[torch.Tensor, ...]:
    shape = (1, 4, 3, 3, 3)[:ndim]
    x, y = torch.randn(shape), torch.rand(shape) + 0.5
    return x, y, x > 0, torch.rand(4)


def calling(spelling: Any, args: tuple, kwargs: dict) -> Any:
    """Call a function, or the method of that name on the first argument."""
    if isinstance(spelling, str):
        return getattr(args[0], spelling)(*args[1:], **kwargs)
    return spelling(*args, **kwargs)


def working_calls(spelling: Any) -> tuple[int, list]:
    """The (rank of the inputs, argument lists and keywords) the spelling runs eagerly on;
    ``inplace=True`` as well where the function has that flag."""
    for ndim in (4, 3, 5):
        sample = inputs_of(ndim)
        works = []
        for call in CALLS:
            for kwargs in ({}, {"inplace": True}):
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        # on copies: in-place spellings leave the samples alone
                        calling(spelling, call(*[t.clone() for t in sample]), kwargs)
                except Exception:  # noqa: BLE001 - not a way to call this spelling
                    continue
                works.append((call, kwargs))
        if works:
            return ndim, works
    return 0, []


class Calls(nn.Module):
    """Runs one spelling every way it runs; returns the tensor outputs."""

    def __init__(self, spelling: Any, works: list):
        super().__init__()
        self.spelling, self.works = spelling, works

    def forward(self, x, y, b, w):
        outs = []
        for call, kwargs in self.works:
            out = calling(self.spelling, call(x, y, b, w), kwargs)
            outs += [out] if isinstance(out, torch.Tensor) else []
        return tuple(outs)


class AllCalls(nn.Module):
    def __init__(self, calls: list[Calls]):
        super().__init__()
        self.calls = nn.ModuleList(calls)

    def forward(self, *inputs):
        # each on copies, made out here: in-place spellings leave the inputs alone
        return tuple(calls(*[t.clone() for t in inputs]) for calls in self.calls)


def exported_ops(spellings: list) -> tuple[dict[Any, list], list]:
    """The ATen overloads torch.export writes for each spelling (one export per input rank,
    each spelling in its own submodule), and the spellings that cannot run on this machine."""
    by_rank: dict[int, list] = {}
    unrun = []
    for spelling in spellings:
        ndim, works = working_calls(spelling)
        if works:
            by_rank.setdefault(ndim, []).append(Calls(spelling, works))
        else:
            unrun.append(spelling)
    found: dict[Any, list] = {}
    for ndim, calls in by_rank.items():
        gm = export_graph(AllCalls(calls), inputs_of(ndim))
        for node in gm.graph.nodes:
            stack = list(node.meta.get("nn_module_stack", {}).values())
            if node.op == "call_function" and is_aten(node.target) and len(stack) > 1:
                spelling = calls[int(stack[1][0].split(".")[1])].spelling  # from calls.<i>
                found.setdefault(spelling, []).append(node.target)
    return found, unrun


def test_every_aten_op_an_fx_spelling_exports_to_is_declared_on_the_export_path():
    spellings = fx_spellings()
    assert torch.floor in spellings and "lerp" in spellings and torch.remainder in spellings
    found, unrun = exported_ops(list(spellings))
    missing = {}
    for spelling, ops in found.items():
        undeclared = sorted({str(op) for op in ops if DEFAULT_REGISTRY.ops.get(op) is None
                             or DEFAULT_REGISTRY.ops[op].rule is None})
        if undeclared:
            missing[getattr(spelling, "__name__", spelling)] = undeclared
    assert not missing, "fx spellings whose exported ATen ops the export path does not know " \
        f"(name them in rules/aten.py's ATEN_NAMES): {missing}"
    issue_ops = [torch.floor, torch.ceil, torch.round, torch.sin, torch.cos, torch.eq,
                 torch.lerp, torch.remainder]
    assert all(found.get(op) for op in issue_ops)  # they were checked
    # only a CUDA move cannot run here
    assert set(unrun) <= ({"cuda"} if not torch.cuda.is_available() else set()), unrun


def test_every_export_path_op_twins_an_fx_spelling_with_the_same_rule():
    spellings = fx_spellings()
    derived = {}
    for spelling, rule in spellings.items():
        for op in twins([spelling]):
            derived.setdefault(op, set()).add(rule)
    declared = aten_declarations()
    assert torch.ops.aten.floor.default in declared
    unmatched = {str(op): rule.__name__ for op, rule in declared.items()
                 if rule not in derived.get(op, set())}
    assert not unmatched, f"export-path ops without an fx spelling of the same rule: {unmatched}"
    assert all(op in declared for op in derived)  # and every twin is declared as its fx rule


class Through(nn.Module):
    """conv -> ``op`` -> conv, and a second conv branch where ``op`` takes two tensors."""

    def __init__(self, op):
        super().__init__()
        self.op = op
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.head(self.op(self.a(x), self.b(x)))


def _eq(h, other):
    """``eq`` feeding a ``where``, so that the model stays a float one."""
    return torch.where(torch.eq(torch.sign(h), 1.0), h, 0.1 * other)


THROUGH = {
    "floor": lambda h, other: torch.floor(2 * h),
    "ceil": lambda h, other: torch.ceil(2 * h),
    "round": lambda h, other: torch.round(2 * h),
    "sin": lambda h, other: torch.sin(h),
    "cos": lambda h, other: torch.cos(h) + other,
    "eq": _eq,
    "lerp": lambda h, other: torch.lerp(h, other, 0.25),
    "lerp_tensor": lambda h, other: h.lerp(other, torch.sigmoid(other)),
    "remainder": lambda h, other: torch.remainder(h, 1.5),
    "mod": lambda h, other: (h % 0.75) * other,
}


@pytest.mark.parametrize("name", list(THROUGH))
def test_the_export_path_prunes_through_the_op_as_the_fx_path_does(name):
    model = randomize(Through(THROUGH[name]).eval())
    x = (torch.randn(1, 3, 8, 8),)
    fx = check_pruned(model, x, 0.5, capture_method="fx")
    exported = check_pruned(model, x, 0.5, capture_method="export")
    assert fx.analysis.capture.method == "fx"
    assert exported.analysis.capture.method == "export"
    assert exported.plan.params == fx.plan.params
    pruned = {p["name"]: len(p["keep"]) for p in exported.plan.params}
    assert pruned["a.weight"] == 4 and pruned["head.weight"] == 4  # through the op
    assert not any("no channel rule" in r for g in exported.analysis.groups for r in g.reasons)


def test_a_dtype_conversion_passes_channels_on_the_export_path():
    """``.float()`` exports to ``to`` beside the exporter's dtype check, which reads no data."""
    model = randomize(Through(lambda h, other: F.relu(h).float() * other.half().float()).eval())
    x = (torch.randn(1, 3, 8, 8),)
    fx = check_pruned(model, x, 0.5, capture_method="fx")
    exported = check_pruned(model, x, 0.5, capture_method="export")
    assert exported.plan.params == fx.plan.params
    assert {p["name"] for p in exported.plan.params} >= {"a.weight", "b.weight", "head.weight"}
