"""Stage 2, analyse: find which channels are coupled and must be removed together.

Every sliceable position of every parameter dimension is an *atom*. Each tensor in the graph
carries zero or more :class:`ChannelMap`s: for the dims a map lives on, it says which atom
each index belongs to. Rules (one small function per op, in :mod:`structprune.core.rules`) move
maps from an op's inputs to its outputs and state facts about atoms:

- ``unify(a, b)``: removing atom ``a`` requires removing ``b`` (residual add, BN after conv,
  conv input and the previous conv's output, ...);
- ``consume(...)``: the op's result with those channels deleted equals its result with them
  zeroed at its input (conv, linear, matmul, sum); the verifier masks exactly there;
- ``approx(...)``: removing the atoms changes the op's result (mean or softmax over channels,
  LayerNorm over channels): allowed, but never under ``exact_only``;
- ``block(...)``: the atoms must stay (they reach a model output, a size is hard-coded, the
  op is unknown).

After one pass over the graph, the connected components of the unify edges are the *units*
of removal. Units touching the same set of parameter dimensions form a :class:`Group` (for
example one conv's output channels together with its BN and the next conv's input columns).
The engine knows no op by name: everything op-specific is in the rule registry.
"""

from __future__ import annotations

import fnmatch
import itertools
import math
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
from scipy.sparse import csr_matrix
from scipy.sparse.csgraph import connected_components

from structprune.core.capture import Capture
from structprune.core.registry import RuleRegistry
from structprune.core.rules import DEFAULT_REGISTRY
from structprune.core.rules.base import pin_counted_channels
from structprune.tree import tensor_index
from structprune.types import PINNED, ChannelMap, TensorInfo, TensorSpec, spec_to_info, tensor_infos

# the reason recorded when a rule raises on a call it cannot read (tests look for it)
RULE_FAILED = "its channel rule failed on this call"


@dataclass(frozen=True)
class Consumption:
    """A node input whose removed channels the verifier zeroes to build the masked model."""

    node: str
    arg: int | str
    ndim: int
    dims: tuple[int, ...]
    ids: np.ndarray


@dataclass
class Group:
    """Units touching the same parameter dimensions; the plan keeps or drops whole units."""

    index: int
    members: list[tuple[str, int]]
    units: np.ndarray  # component ids, in channel order of the first member
    width: int  # slots per unit in the narrowest member (e.g. channels per conv group)
    blocked: np.ndarray  # per unit
    approximate: np.ndarray  # per unit
    reasons: dict[str, list[str]] = field(default_factory=dict)  # reason -> node names

    @property
    def size(self) -> int:
        return len(self.units)

    @property
    def status(self) -> str:
        """``blocked`` (no unit may go), ``approximate`` (removing some units changes the
        result beyond masking) or ``exact``."""
        if self.blocked.all():
            return "blocked"
        return "approximate" if self.approximate.any() else "exact"

    def prunable(self, exact_only: bool = False) -> np.ndarray:
        """Per unit: whether it may go (not blocked; not approximate under ``exact_only``)."""
        return ~self.blocked & ~self.approximate if exact_only else ~self.blocked

    @property
    def modules(self) -> set[str]:
        """The names of the modules whose parameters the group slices."""
        return {module_of(name) for name, _ in self.members}

    def matches(self, patterns: Iterable[str]) -> bool:
        """Whether one of the group's modules matches one of ``patterns`` (:func:`matches`)."""
        modules = self.modules
        return any(matches(pattern, module) for pattern in patterns for module in modules)

    def to_json(self) -> dict:
        return {
            "index": self.index,
            "status": self.status,
            "members": [f"{name}:{dim}" for name, dim in self.members],
            "units": int(self.size),
            "width": self.width,
            "blocked_units": int(self.blocked.sum()),
            "approximate_units": int(self.approximate.sum()),
            "reasons": {k: sorted(set(v)) for k, v in self.reasons.items()},
        }


@dataclass
class Analysis:
    """Output of :func:`analyse`: atoms, their components, parameter slots and groups."""

    capture: Capture
    component: np.ndarray  # atom -> component id
    slots: dict[tuple[str, int], np.ndarray]  # (param, dim) -> atom per index
    groups: list[Group]
    consumptions: list[Consumption]
    sizes: dict[str, tuple[int, ...]]  # param or buffer name -> dense shape
    # "module.attr" -> atom per channel, for sizes no tensor carries (a norm without weights)
    attributes: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def n_components(self) -> int:
        """How many components (units of removal) the atoms form."""
        return int(self.component.max()) + 1 if self.component.size else 0

    def prunable_groups(self, exact_only: bool = False, ignore: Iterable[str] = (),
                        ) -> list[Group]:
        """The groups with a unit that may go, under ``exact_only``, that slice no module
        of ``ignore`` (names or globs, :func:`matches`)."""
        ignore = list(ignore)
        return [g for g in self.groups
                if g.prunable(exact_only).any() and not (ignore and g.matches(ignore))]

    def removed_components(self, params: Iterable[dict]) -> np.ndarray:
        """Components a plan's ``params`` entries remove (a bool per component)."""
        removed = np.zeros(self.n_components, bool)
        for entry in params:
            ids = self.slots.get((entry["name"], entry["dim"]))
            if ids is None:
                continue
            drop = np.ones(len(ids), bool)
            drop[np.asarray(entry["keep"], dtype=np.int64)] = False
            removed[self.component[ids[drop]]] = True
        return removed

    def summary(self) -> dict:
        statuses = [g.status for g in self.groups]
        return {
            "capture": self.capture.method,
            "groups": len(self.groups),
            "prunable_groups": len(self.groups) - statuses.count("blocked"),
            "exact_groups": statuses.count("exact"),
            "approximate_groups": statuses.count("approximate"),
            "blocked_groups": statuses.count("blocked"),
        }


def module_of(name: str) -> str:
    """The module holding the parameter or buffer ``name`` (``""`` for the root's own)."""
    return name.rsplit(".", 1)[0] if "." in name else ""


def matches(pattern: str, module: str) -> bool:
    """Whether ``pattern`` names ``module``: a glob (``layer1.*``) matches whole names, a
    plain name matches that module and every module inside it."""
    if any(c in pattern for c in "*?["):
        return re.fullmatch(fnmatch.translate(pattern), module) is not None
    return module == pattern or module.startswith(pattern + ".")


class AtomTable:
    """Atoms and the facts rules state about them."""

    def __init__(self) -> None:
        self.count = 0
        self._edges: list[tuple[np.ndarray, np.ndarray]] = []
        self.blocked: list[tuple[np.ndarray, str, str]] = []
        self.approx: list[tuple[np.ndarray, str, str]] = []
        self.kernel_taps: list[np.ndarray] = []

    def fresh(self, shape: tuple[int, ...]) -> np.ndarray:
        n = math.prod(shape)
        ids = np.arange(self.count, self.count + n, dtype=np.int64).reshape(shape)
        self.count += n
        return ids

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        if a.shape != b.shape:
            a, b = np.broadcast_arrays(a, b)
        self._edges.append((a.ravel(), b.ravel()))

    def unify_along(self, ids: np.ndarray, axes: Iterable[int]) -> np.ndarray:
        """Make atoms equal along ``axes``; returns the ids with those axes reduced to size 1."""
        axes = tuple(axes)
        if not axes:
            return ids
        first = ids[tuple(slice(0, 1) if i in axes else slice(None) for i in range(ids.ndim))]
        self.unify(ids, first)
        return first

    def components(self) -> np.ndarray:
        if self.count == 0:
            return np.zeros(0, np.int64)
        if self._edges:
            a = np.concatenate([e[0] for e in self._edges])
            b = np.concatenate([e[1] for e in self._edges])
        else:
            a = b = np.zeros(0, np.int64)
        # float64 weights are what csgraph works in (other dtypes are converted first), and
        # weak components of the directed graph skip symmetrising it
        graph = csr_matrix((np.ones(len(a)), (a, b)), shape=(self.count, self.count))
        _, labels = connected_components(graph, directed=True, connection="weak")
        return labels.astype(np.int64)


class EngineContext:
    """The engine's :class:`~structprune.types.RuleContext`: the node, its module, and the
    atom operations."""

    def __init__(self, engine: _Engine, node: fx.Node, module: nn.Module | None):
        self._engine = engine
        self.node = node
        self.module = module

    # what the node produced in capture
    @property
    def output(self) -> Any:
        return self._engine.capture.values[self.node.name]

    @property
    def out_shape(self) -> tuple[int, ...]:
        spec = self.output
        if not isinstance(spec, TensorSpec):
            raise TypeError(f"{self.node.name} has no single tensor output")
        return spec.shape

    def result(self, maps: Iterable[ChannelMap] = (), spec: Any = None) -> TensorInfo:
        spec = self.output if spec is None else spec
        kept = tuple(m for m in maps if m is not None and m.ids.size > 1)
        return TensorInfo(spec.shape, kept)

    def fresh(self, shape: tuple[int, ...]) -> np.ndarray:
        return self._engine.atoms.fresh(shape)

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        self._engine.atoms.unify(a, b)

    def unify_along(self, ids: np.ndarray, axes: Iterable[int]) -> np.ndarray:
        return self._engine.atoms.unify_along(ids, axes)

    def block(self, what: TensorInfo | ChannelMap | np.ndarray | None, reason: str) -> None:
        for ids in _ids_of(what):
            self._engine.atoms.blocked.append((ids, reason, self.node.name))

    def kernel_taps(self, what: TensorInfo | ChannelMap | np.ndarray | None) -> None:
        """These atoms are no channel axis at all (kernel taps): never pruned, never listed."""
        self._engine.atoms.kernel_taps.extend(_ids_of(what))

    def approx(self, what: TensorInfo | ChannelMap | np.ndarray | None, reason: str) -> None:
        for ids in _ids_of(what):
            self._engine.atoms.approx.append((ids, reason, self.node.name))

    def consume(self, arg: int | str, info: TensorInfo, cmap: ChannelMap | None) -> None:
        """Record that this node consumes ``info``'s channels ``cmap`` (maskable exactly).

        ``arg`` is where the input usually sits; the argument actually holding ``info`` is
        looked up, so keyword calls such as ``F.linear(input=x, ...)`` work too.
        """
        if cmap is None:
            return
        env = self._engine.env
        for position, raw in list(enumerate(self.node.args)) + list(self.node.kwargs.items()):
            if isinstance(raw, fx.Node) and env.get(raw) is info:
                arg = position
                break
        self._engine.consumptions.append(
            Consumption(self.node.name, arg, info.ndim, cmap.dims, cmap.ids))

    def sized_attribute(self, attr: str, ids: np.ndarray | None) -> None:
        """This node's module keeps the number of channels ``ids`` in ``attr`` (e.g. a norm
        without weights in ``num_features``): the plan resets it to the number kept."""
        if ids is not None and self.node.op == "call_module":
            self._engine.attributes[f"{self.node.target}.{attr}"] = np.asarray(ids).ravel()

    def param(self, name: str) -> TensorInfo:
        return self._engine.param_info(name)

    def module_param(self, attr: str, same_as: dict[int, np.ndarray] | None = None,
                     ) -> TensorInfo | None:
        """The parameter or buffer ``attr`` of this node's module, or None if it is unset.

        ``same_as`` states that axis ``d`` of the parameter carries the atoms ``ids`` (a
        norm's vectors carry its input's channels): a parameter seen for the first time takes
        those atoms instead of fresh ones, which would only be unified with them.
        """
        module = self.module
        tensor = getattr(module, attr, None)
        if not isinstance(tensor, torch.Tensor):
            return None
        name = self._engine.tensor_names.get(id(tensor))
        if name is None:  # computed on access (parametrizations, weight norm): not sliceable
            return TensorInfo(tuple(tensor.shape))
        return self._engine.param_info(name, same_as)

    def owner(self, info: Any) -> nn.Module | None:
        """The module that holds ``info`` when it is a parameter or buffer itself."""
        if not isinstance(info, TensorInfo) or info.param is None:
            return None
        path = info.param.rsplit(".", 1)[0] if "." in info.param else ""
        return self._engine.model_modules.get(path)

    def maintained_sizes(self, sizes: Any) -> str | None:
        """The attribute (``path.attr``) holding ``sizes`` in the module this op runs in, when
        that module's resizer recomputes it after pruning; None when the sizes are fixed."""
        if not isinstance(sizes, (list, tuple)):
            return None
        stack = self.node.meta.get("nn_module_stack") or {}
        path = list(stack.values())[-1][0] if stack else ""  # empty: the root's own forward
        module = self._engine.model_modules.get(path)
        if module is None:
            return None
        for attr in self._engine.registry.maintained_attributes(module):
            value = getattr(module, attr, None)
            if isinstance(value, (list, tuple)) and list(value) == list(sizes):
                return f"{path}.{attr}" if path else attr
        return None

    def info_of(self, node: fx.Node) -> Any:
        """What the analysis holds for an earlier node: a TensorInfo, or a plain value."""
        return self._engine.env.get(node)

    def is_literal(self, position: int | str) -> bool:
        """Whether the node's raw argument at ``position`` is a constant in the traced code."""
        raw = self.node.args[position] if isinstance(position, int) else self.node.kwargs[position]
        return not isinstance(raw, fx.Node)

    def raw_arg(self, position: int | str, default: Any = None) -> Any:
        if isinstance(position, int):
            return self.node.args[position] if position < len(self.node.args) else default
        return self.node.kwargs.get(position, default)


def _ids_of(what: Any) -> list[np.ndarray]:
    if what is None:
        return []
    if isinstance(what, np.ndarray):
        return [what]
    if isinstance(what, ChannelMap):
        return [what.ids]
    if isinstance(what, TensorInfo):
        return [m.ids for m in what.maps]
    if isinstance(what, (list, tuple)):
        return [ids for w in what for ids in _ids_of(w)]
    if isinstance(what, dict):
        return [ids for w in what.values() for ids in _ids_of(w)]
    return []


class _Engine:
    def __init__(self, capture: Capture, registry: RuleRegistry):
        self.capture = capture
        self.registry = registry
        self.atoms = AtomTable()
        self.consumptions: list[Consumption] = []
        self.slots: dict[tuple[str, int], np.ndarray] = {}
        self.attributes: dict[str, np.ndarray] = {}
        self._params: dict[str, TensorInfo] = {}
        # only the user's own parameters and buffers can be sliced: tensors fx stored as
        # graph constants or copied plain attributes are constants
        index = tensor_index(capture.model)
        self.tensors: dict[str, torch.Tensor] = index.named
        self.tensor_names: dict[int, str] = index.canonical
        # owners by name in the user's model (an exported graph holds plain containers)
        self.model_modules = dict(capture.model.named_modules())
        self.modules: dict[str, nn.Module] = {}
        self.env: dict[fx.Node, Any] = {}

    def param_info(self, name: str, same_as: dict[int, np.ndarray] | None = None) -> TensorInfo:
        info = self._params.get(name)
        if info is None:
            tensor = self.tensors[name]
            maps = []
            for dim, size in enumerate(tensor.shape):
                if size > 1:
                    ids = same_as.get(dim) if same_as else None
                    if ids is None or ids.shape != (size,):
                        ids = self.atoms.fresh((size,))
                    self.slots[(name, dim)] = ids
                    maps.append(ChannelMap((dim,), ids))
            info = TensorInfo(tuple(tensor.shape), tuple(maps), param=name)
            self._params[name] = info
        return info

    def get_attr(self, node: fx.Node) -> Any:
        value = self.capture.resolve(node.target)
        if isinstance(value, torch.Tensor):
            name = self.tensor_names.get(id(value))
            if name is None and node.target in self.tensors:  # torch.export: copies by name
                name = self.tensor_names.get(id(self.tensors[node.target]), node.target)
            if name is not None:
                return self.param_info(name)
            return TensorInfo(tuple(value.shape))
        return value

    def run(self, capture: Capture) -> dict[fx.Node, Any]:
        """One pass over ``capture``'s graph; atoms and facts accumulate across passes."""
        self.capture = capture  # the rules read this pass's captured values through it
        env: dict[fx.Node, Any] = {}
        self.env = env
        self.modules = self.capture.modules
        values = self.capture.values
        for node in self.capture.graph.nodes:
            if node.op == "placeholder":
                env[node] = spec_to_info(values.get(node.name))
            elif node.op == "get_attr":
                env[node] = self.get_attr(node)
            elif node.op == "output":
                ctx = EngineContext(self, node, None)
                outputs = fx.node.map_arg(node.args, env.__getitem__)
                ctx.block(tensor_infos(outputs), "reaches a model output")
            else:
                env[node] = self.call(node, env)
        return env

    def call(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        args = fx.node.map_arg(node.args, env.__getitem__)
        kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
        spec = self.capture.values[node.name]
        module = self.modules[node.target] if node.op == "call_module" else None
        if not tensor_infos((args, kwargs)):
            if isinstance(spec, TensorSpec):  # a tensor made from numbers (torch.tensor(C))
                pin_counted_channels(EngineContext(self, node, module))
            return spec_to_info(spec)  # sizes, shape arithmetic, factories
        ctx = EngineContext(self, node, module)
        if PINNED in node.meta:
            ctx.block(tensor_infos((args, kwargs)), node.meta[PINNED])
        rule = self.registry.rule_for(node, module)
        if rule is None:
            return self.registry.unknown(ctx, args, kwargs)
        try:
            return rule(ctx, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - a rule that cannot read this call
            # what it coupled so far stays coupled (more is safe); the rest is kept whole
            ctx.block(tensor_infos((args, kwargs)),
                      f"{RULE_FAILED} ({type(exc).__name__}: {str(exc)[:80]})")
            return spec_to_info(ctx.output)


def _touch_table(reps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every component the representatives touch, in order of first appearance (along the
    representatives, then their positions), with a row of the representatives it touches
    (ascending, padded with -1) and its fewest slots in one of them.

    Vectorised over the (representative, component) pairs: a Python step per pair took about
    15% of ResNet-50's whole pass."""
    if not any(comps.size for comps in reps):
        empty = np.zeros(0, np.int64)
        return empty, np.zeros((0, 1), np.int64), empty
    # each (representative, component) pair once, with its first position and its count
    stride = int(max(comps.max() for comps in reps if comps.size)) + 1
    pairs = np.concatenate([r * stride + comps for r, comps in enumerate(reps)])
    pair, seen, count = np.unique(pairs, return_index=True, return_counts=True)
    rep, comp = np.divmod(pair, stride)
    order = np.lexsort((rep, comp))
    comp, rep, count, seen = comp[order], rep[order], count[order], seen[order]
    starts = np.flatnonzero(np.r_[True, comp[1:] != comp[:-1]])
    n_touched = np.diff(np.r_[starts, comp.size])
    touches = np.full((starts.size, n_touched.max()), -1, np.int64)
    touches[np.repeat(np.arange(starts.size), n_touched),
            np.arange(comp.size) - np.repeat(starts, n_touched)] = rep
    fewest = np.minimum.reduceat(count, starts)
    appearance = np.argsort(np.minimum.reduceat(seen, starts), kind="stable")
    return comp[starts][appearance], touches[appearance], fewest[appearance]


def _unit_groups(engine: _Engine, component: np.ndarray) -> list[Group]:
    """Group components by the set of parameter dimensions they touch.

    Groups and their units are numbered in order of first appearance along the slots
    (parameter order, then position), so a group's units follow its first member's order.
    """
    if not engine.slots:
        return []
    n_comp = int(component.max()) + 1
    blocked = np.zeros(n_comp, bool)
    approximate = np.zeros(n_comp, bool)
    records: list[tuple[np.ndarray, str, str, str]] = []
    for kind, entries, flag in (("blocked", engine.atoms.blocked, blocked),
                                ("approximate", engine.atoms.approx, approximate)):
        for ids, reason, node in entries:
            comps = component[ids.ravel()]
            flag[comps] = True
            records.append((comps, kind, reason, node))
    taps = np.zeros(n_comp, bool)
    for ids in engine.atoms.kernel_taps:
        taps[component[ids.ravel()]] = True
    listed = ~(taps & ~blocked & ~approximate)  # kernel taps alone are no channel axis
    blocked |= taps

    # tensors sliced in lockstep (a BN's weight, bias and statistics) have equal component
    # arrays: one representative each stands for all of them
    rep_of: dict[tuple[str, int], int] = {}
    by_content: dict[bytes, int] = {}
    reps: list[np.ndarray] = []
    for key, ids in engine.slots.items():
        comps = component[ids]
        rep = by_content.setdefault(comps.tobytes() + str(comps.size).encode(), len(reps))
        if rep == len(reps):
            reps.append(comps)
        rep_of[key] = rep

    comps, touches, fewest = _touch_table(reps)
    comps, touches, fewest = comps[listed[comps]], touches[listed[comps]], fewest[listed[comps]]
    # components touching the same representatives form one group, numbered by appearance
    numbering: dict[bytes, int] = {}
    group_of_row = np.fromiter((numbering.setdefault(row.tobytes(), len(numbering))
                                for row in touches), np.int64, len(touches))
    n_groups = len(numbering)
    group_of_comp = np.full(n_comp, -1, np.int64)
    group_of_comp[comps] = group_of_row
    by_group = np.argsort(group_of_row, kind="stable")  # appearance order within a group
    bounds = np.searchsorted(group_of_row[by_group], np.arange(n_groups + 1))
    units = [comps[by_group[a:b]].tolist() for a, b in itertools.pairwise(bounds.tolist())]
    widths = np.minimum.reduceat(fewest[by_group], bounds[:-1]).tolist() if units else []
    group_of = {tuple(r for r in touches[by_group[a]].tolist() if r >= 0): g
                for g, a in enumerate(bounds[:-1].tolist())}

    reasons: list[dict[str, list[str]]] = [defaultdict(list) for _ in units]
    for comps, kind, reason, node in records:
        for g in np.unique(group_of_comp[comps]).tolist():
            if g >= 0:
                reasons[g][f"{kind}: {reason}"].append(node)
    groups_of_rep: dict[int, list[int]] = defaultdict(list)
    for touches, g in group_of.items():
        for rep in touches:
            groups_of_rep[rep].append(g)
    members: list[list[tuple[str, int]]] = [[] for _ in units]
    for key, rep in rep_of.items():  # in slot order
        for g in groups_of_rep[rep]:
            members[g].append(key)

    groups = []
    for g, unit_list in enumerate(units):
        ids = np.asarray(unit_list, np.int64)
        groups.append(Group(
            index=g, members=members[g], units=ids, width=max(1, widths[g]),
            blocked=blocked[ids], approximate=approximate[ids] & ~blocked[ids],
            reasons=dict(reasons[g]),
        ))
    return groups


def analyse(capture: Capture, registry: RuleRegistry | None = None) -> Analysis:
    """Find the pruning groups of a captured model."""
    engine = _Engine(capture, registry or DEFAULT_REGISTRY)
    engine.run(capture)
    consumptions = list(engine.consumptions)  # the verifier masks the main graph only
    for other in capture.other_modes:  # couplings of training-only branches count too
        engine.run(other)
    component = engine.atoms.components()
    groups = _unit_groups(engine, component)
    sizes = {name: tuple(t.shape) for name, t in engine.tensors.items()}
    return Analysis(capture, component, engine.slots, groups, consumptions, sizes,
                    engine.attributes)


__all__ = ["Analysis", "AtomTable", "Consumption", "EngineContext", "Group", "analyse",
           "matches", "module_of"]
