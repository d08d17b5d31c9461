"""Analysis that holds on torch.export graphs: literals that do not follow channel counts.

torch.export bakes every size and every tensor made from a number into its graph as a
literal, so one graph cannot tell ``x.view(b, x.shape[1], -1)`` from
``x.view(b, self.c, -1)``, nor ``torch.tensor(x.shape[1])`` from a true constant. Capturing
the *pruned* model again tells them apart, node by node (both graphs come from the same
code, so their nodes have the same names):

- an integer argument that equalled an axis of the node's input, kept its value while that
  axis shrank: a size fixed in the model's code (``self.c``);
- a graph constant whose value changed: a tensor made from a channel count;
- a line of the model's code that no longer runs: its nodes read a fixed size.

:func:`settle_literals` takes an analysis of a torch.export graph, prunes a probe copy (half
of every group), finds such nodes (:func:`pinned_nodes`), marks them (``node.meta[PINNED]``:
the analysis keeps whole every channel axis a marked node reads) and analyses again, until
the probe shows none. The plan is then made once, on that analysis
(:func:`structprune.core.prepare.prepare` runs it for every caller).
"""

from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn

from structprune.config import PruneConfig
from structprune.core.analyse import Analysis, analyse
from structprune.core.apply import apply_plan
from structprune.core.capture import Capture, capture, innermost_user_frame, is_user_file
from structprune.core.registry import RuleRegistry
from structprune.core.score import score
from structprune.core.selection import make_plan
from structprune.errors import CaptureError
from structprune.types import PINNED

# probes of an export graph: each finds the fixed literals of one or more lines of code
MAX_PROBES = 8

_FRAME = re.compile(r'File "([^"]+)", line (\d+)')


def user_frame(stack_trace: str | None) -> tuple[str, int] | None:
    """The innermost frame of a node's ``stack_trace`` in the user's code."""
    frames = [(f, int(n)) for f, n in _FRAME.findall(stack_trace or "")]
    outside = [f for f in frames if is_user_file(f[0])]
    return outside[-1] if outside else None


def _failing_frame(exc: BaseException) -> tuple[str, int] | None:
    """The innermost frame in the user's code of the error that stopped a capture."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    frame = innermost_user_frame(exc)
    return (frame.filename, frame.lineno) if frame is not None else None


def _flat(value: Any) -> list[Any]:
    """A node's (nested) arguments, flattened, in order."""
    flat: list[Any] = []
    fx.node.map_aggregate(value, flat.append)
    return flat


def _ints(value: Any) -> list[int]:
    """The integer literals among a node's arguments, flattened, in order."""
    return [v for v in _flat(value) if type(v) is int]


def _shape(node: Any) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _fixed_size(node: fx.Node, twin: fx.Node) -> bool:
    """An integer argument matched an input axis that shrank, yet kept its value."""
    inputs = [a for a in node.args if isinstance(a, fx.Node)]
    twin_inputs = [a for a in twin.args if isinstance(a, fx.Node)]
    shrunk: set[int] = set()
    for a, b in zip(inputs, twin_inputs, strict=False):
        before, after = _shape(a), _shape(b)
        if before and after and len(before) == len(after):
            shrunk |= {s for s, t in zip(before, after, strict=True) if s != t}
    if not shrunk:
        return False
    ours, theirs = _ints((node.args, node.kwargs)), _ints((twin.args, twin.kwargs))
    if len(ours) != len(theirs):
        return False
    return any(v in shrunk and w == v for v, w in zip(ours, theirs, strict=True))


def _changed_constant(dense: Capture, pruned: Capture, node: fx.Node,
                      ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A graph constant with another value in the pruned model's graph, as (before, after)."""
    try:
        before, after = dense.resolve(node.target), pruned.resolve(node.target)
    except AttributeError:
        return None
    if not isinstance(before, torch.Tensor) or not isinstance(after, torch.Tensor):
        return None
    same = before.shape == after.shape and torch.equal(before, after)
    return None if same else (before, after)


def _downstream(node: fx.Node, limit: int = 8) -> list[fx.Node]:
    """The nodes a constant flows through until it meets another tensor (``x / sqrt(C)``)."""
    found, frontier = [], list(node.users)
    while frontier and len(found) < limit:
        user = frontier.pop()
        found.append(user)
        others = [a for a in user.all_input_nodes if a not in found and a is not node
                  and isinstance(a.meta.get("val"), torch.Tensor)]
        if not others:  # still only the constant's own value: follow it
            frontier.extend(user.users)
    return found


def pinned_nodes(dense: Capture, pruned: nn.Module,
                 registry: RuleRegistry | None = None) -> dict[str, str]:
    """Nodes of ``dense`` (a torch.export capture) whose literals do not follow channel
    counts, found by capturing ``pruned`` the same way: node name -> reason."""
    try:
        again = capture(pruned, dense.example_inputs, dense.leaf_types, registry, "export")
    except CaptureError as exc:
        frame = _failing_frame(exc)
        if frame is None:
            return {}
        where = f"{frame[0]}:{frame[1]}"
        return {n.name: f"a size fixed in the model's code ({where})" for n in dense.graph.nodes
                if n.op == "call_function" and user_frame(n.meta.get("stack_trace")) == frame}
    twins = {n.name: n for n in again.graph.nodes}
    # the model's own tensors are sliced by the plan; only the graph's constants are literals
    own = {name for name, _ in dense.model.named_parameters(remove_duplicate=False)}
    own |= {name for name, _ in dense.model.named_buffers(remove_duplicate=False)}
    pinned: dict[str, str] = {}
    for node in dense.graph.nodes:
        twin = twins.get(node.name)
        if twin is None or twin.op != node.op or twin.target != node.target:
            continue
        if node.op == "call_function" and _fixed_size(node, twin):
            pinned[node.name] = "a size fixed in the model's code" + _where(node)
        elif node.op == "call_function" and (values := _float_changed(node, twin)):
            reason = "a number made from a channel count" + _where(node)
            for reader in [node, *_count_readers(node, twins, values)]:
                pinned[reader.name] = reason
        elif node.op == "get_attr" and node.target not in own and \
                (constants := _changed_constant(dense, again, node)):
            before, after = constants
            values = (float(before), float(after)) if before.numel() == 1 == after.numel() \
                else None
            for user in _downstream(node):
                reason = "a constant made from a channel count" + _where(user)
                pinned[user.name] = reason
                for reader in _count_readers(user, twins, values):
                    pinned[reader.name] = reason
    return pinned


def _float_changed(node: fx.Node, twin: fx.Node) -> tuple[float, float] | None:
    """The first float argument whose value differs in the pruned graph (a float is never a
    size: it was computed from one, like ``x / C ** 0.5``), as (before, after)."""
    ours, theirs = _flat((node.args, node.kwargs)), _flat((twin.args, twin.kwargs))
    if len(ours) != len(theirs):
        return None
    for a, b in zip(ours, theirs, strict=True):
        if type(a) is float and type(b) is float and a != b:
            return a, b
    return None


def _count_readers(node: fx.Node, twins: dict[str, fx.Node],
                   values: tuple[float, float] | None, limit: int = 40) -> list[fx.Node]:
    """Nodes upstream of ``node`` that read a tensor whose axis shrank from the count behind
    ``values`` (the count itself, its square root or its inverse square root) to the pruned
    one: the channels a number was counted from, even when ``node``'s own input has lost
    that axis (``matmul(a, b) / sqrt(C)`` contracts C)."""
    if values is None:
        return []
    counts = set()
    for transform in (lambda v: v, lambda v: v * v, lambda v: 1 / (v * v) if v else 0.0):
        before, after = transform(values[0]), transform(values[1])
        if abs(before - round(before)) < 1e-3 and abs(after - round(after)) < 1e-3:
            counts.add((round(before), round(after)))
    found, frontier, seen = [], list(node.all_input_nodes), set()
    while frontier and len(seen) < limit:
        upstream = frontier.pop(0)
        if upstream in seen:
            continue
        seen.add(upstream)
        frontier.extend(upstream.all_input_nodes)
        twin = twins.get(upstream.name)
        if twin is None:
            continue
        for a, b in zip(upstream.all_input_nodes, twin.all_input_nodes, strict=False):
            before, after = _shape(a), _shape(b)
            if before and after and len(before) == len(after) and any(
                    (s, t) in counts for s, t in zip(before, after, strict=True)):
                found.append(upstream)
                break
    return found


def _where(node: fx.Node) -> str:
    frame = user_frame(node.meta.get("stack_trace"))
    return f" ({frame[0]}:{frame[1]})" if frame else ""


def mark(cap: Capture, pinned: dict[str, str]) -> int:
    """Record ``pinned`` in ``cap``'s nodes; returns how many were not marked before."""
    new = 0
    for node in cap.graph.nodes:
        if node.name in pinned and PINNED not in node.meta:
            node.meta[PINNED] = pinned[node.name]
            new += 1
    return new


def settle_literals(model: nn.Module, analysis: Analysis,
                    registry: RuleRegistry | None = None) -> Analysis:
    """``analysis`` itself for an fx capture; for a torch.export capture, analysed again
    until a probe (half of every group pruned) shows no node whose literals do not follow
    channel counts (see the module doc)."""
    cap = analysis.capture
    if cap.method != "export":
        return analysis
    for _ in range(MAX_PROBES):
        groups = analysis.prunable_groups()
        if not groups:
            break
        probe = make_plan(analysis, score(analysis, "l2", groups), PruneConfig(ratio=0.5))
        if not mark(cap, pinned_nodes(cap, apply_plan(model, probe, registry=registry),
                                      registry)):
            break
        analysis = analyse(cap, registry)
    return analysis


__all__ = ["mark", "pinned_nodes", "settle_literals", "user_frame"]
