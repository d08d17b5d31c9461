"""Analysis that holds on torch.export graphs: literals that do not follow channel counts.

torch.export bakes every size and every tensor made from a number into its graph as a
literal, so one graph cannot tell ``x.view(b, x.shape[1], -1)`` from
``x.view(b, self.c, -1)``, nor ``torch.tensor(x.shape[1])`` from a true constant. Capturing
the *pruned* model again tells them apart, node by node (both graphs come from the same
code, so their nodes have the same names):

- an integer argument that equalled an axis of the node's input, kept its value while that
  axis shrank: a size fixed in the model's code (``self.c``);
- a graph constant whose value changed: a tensor made from a channel count;
- a line of the model's code that no longer runs: its nodes read a fixed size;
- a model that still fails there once those nodes are pinned: the size came from another
  tensor (``B, C, H, W = x.shape`` applied to ``v.view(B, C, H, W)``), which the graph does
  not show; the groups whose removal alone stops the model are found by halving the probe
  (:func:`breaking_groups`) and kept whole.

:func:`settle_literals` takes an analysis of a torch.export graph, prunes a probe copy (half
of every group), finds such nodes (:func:`pinned_nodes`), marks them (``node.meta[PINNED]``:
the analysis keeps whole every channel axis a marked node reads) and analyses again, until
the probe shows none. The plan is then made once, on that analysis
(:func:`structprune.core.prepare.prepare` runs it for every caller).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from structprune.config import PruneConfig
from structprune.core.analyse import Analysis, Group, analyse
from structprune.core.apply import apply_plan
from structprune.core.capture import Capture, capture, innermost_user_frame, is_user_file
from structprune.core.registry import RuleRegistry
from structprune.core.score import score
from structprune.core.selection import make_plan
from structprune.errors import CaptureError
from structprune.tree import evaluation
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


def _run_error(model: nn.Module, analysis: Analysis, scores: dict[int, np.ndarray],
               groups: list[Group], registry: RuleRegistry | None) -> BaseException | None:
    """What stops ``model`` from running (eagerly, on the capture's inputs) with half of each
    of ``groups`` pruned; None when it runs."""
    plan = make_plan(analysis, {g.index: scores[g.index] for g in groups},
                     PruneConfig(ratio=0.5))
    pruned = apply_plan(model, plan, registry=registry)
    try:
        with torch.no_grad(), evaluation(pruned):
            pruned(*analysis.capture.example_inputs)
    except Exception as exc:  # noqa: BLE001 - any failure of the pruned model counts
        return exc
    return None


def breaking_groups(model: nn.Module, analysis: Analysis, scores: dict[int, np.ndarray],
                    registry: RuleRegistry | None = None) -> dict[int, str]:
    """The prunable groups whose pruning alone stops ``model`` from running, found by
    halving: group index -> reason. A size read from one tensor and applied to another (the
    graph holds it as a plain number) makes such a group; when only several groups together
    fail, all of them are named. The groups whose channels the failing line's module reads
    are tried first: that is where such a size is usually read (``B, C, H, W = x.shape``)."""
    groups = [g for g in analysis.prunable_groups() if g.index in scores]
    exc = _run_error(model, analysis, scores, groups, registry)
    if exc is None:
        return {}
    frame = _failing_frame(exc)
    reason = "its channel count sets a size elsewhere" + \
        (f" ({frame[0]}:{frame[1]})" if frame else "")

    def fails(part: list[Group]) -> bool:
        return bool(part) and _run_error(model, analysis, scores, part, registry) is not None

    def culprits(part: list[Group]) -> list[Group]:
        if len(part) == 1:
            return part
        halves = (part[:len(part) // 2], part[len(part) // 2:])
        return [g for half in halves if fails(half) for g in culprits(half)] or part

    near = _read_in_module(analysis, groups, frame)
    return {g.index: reason for g in culprits(near if fails(near) else groups)}


def _read_in_module(analysis: Analysis, groups: list[Group],
                    frame: tuple[str, int] | None) -> list[Group]:
    """The groups whose channels are consumed inside the modules whose code holds ``frame``
    (every instance of that module)."""
    graph = analysis.capture.graph

    def stack(node: fx.Node) -> list[str]:
        return [path for path, _ in (node.meta.get("nn_module_stack") or {}).values()]

    found = {stack(node)[-1] for node in graph.nodes
             if stack(node) and user_frame(node.meta.get("stack_trace")) == frame}
    # the frame's own modules, not the submodules they call on that line
    owners = {p for p in found if not any(p.startswith(q + ".") for q in found)}
    if frame is None or not owners:
        return []
    inside = {node.name for node in graph.nodes if owners.intersection(stack(node))}
    read = set()
    for consumption in analysis.consumptions:
        if consumption.node in inside:
            read.update(np.unique(analysis.component[consumption.ids]).tolist())
    return [g for g in groups if read.intersection(g.units.tolist())]


def group_readers(cap: Capture, group: Group) -> list[fx.Node]:
    """Nodes to mark so that ``group`` is kept whole: those whose parameters are all vectors
    of the group (its norms, its biases), which read no other group's channels; failing
    those, every node that reads one of the group's parameters."""
    tensors = dict(cap.model.named_parameters(remove_duplicate=False))
    tensors.update(cap.model.named_buffers(remove_duplicate=False))
    params = {name for name, _ in group.members}
    vectors = {name for name, dim in group.members if dim == 0 and tensors[name].ndim == 1}
    readers, touching = [], []
    for node in cap.graph.nodes:
        if node.op != "call_function":
            continue
        read = {a.target for a in node.all_input_nodes
                if a.op == "get_attr" and a.target in tensors}
        if read and read <= vectors:
            readers.append(node)
        if read & params:
            touching.append(node)
    return readers or touching


def settle_literals(model: nn.Module, analysis: Analysis,
                    registry: RuleRegistry | None = None) -> Analysis:
    """``analysis`` itself for an fx capture; for a torch.export capture, analysed again
    until a probe (half of every group pruned) shows no node whose literals do not follow
    channel counts, and runs (see the module doc)."""
    cap = analysis.capture
    if cap.method != "export":
        return analysis
    for _ in range(MAX_PROBES):
        groups = analysis.prunable_groups()
        if not groups:
            break
        scores = score(analysis, "l2", groups)
        probe = make_plan(analysis, scores, PruneConfig(ratio=0.5))
        pinned = pinned_nodes(cap, apply_plan(model, probe, registry=registry), registry)
        if not pinned:
            break
        if not mark(cap, pinned):
            # nothing new to pin in the graph, yet the probe still fails: a size taken from
            # another tensor; the groups that break it are kept whole
            by_index = {g.index: g for g in groups}
            pinned = {node.name: reason
                      for index, reason in breaking_groups(model, analysis, scores,
                                                           registry).items()
                      for node in group_readers(cap, by_index[index])}
            if not mark(cap, pinned):
                break
        analysis = analyse(cap, registry)
    return analysis


__all__ = ["breaking_groups", "group_readers", "mark", "pinned_nodes", "settle_literals",
           "user_frame"]
