"""Stage 4, plan: the cost model. MACs and parameters of the model after removing units,
counted from the dense graph, and the MACs each node does (the counters registered beside
the channel rules)."""

from __future__ import annotations

import numpy as np
import torch
import torch.fx as fx

from structprune.core.analyse import Analysis
from structprune.core.capture import Capture
from structprune.core.registry import RuleRegistry
from structprune.core.rules import DEFAULT_REGISTRY
from structprune.tree import tensor_index
from structprune.types import TensorSpec


def count_node_macs(capture: Capture, registry: RuleRegistry | None = None) -> dict[str, int]:
    """Multiply-accumulates per node name (nodes with a counter and a nonzero count)."""
    registry = registry or DEFAULT_REGISTRY
    counts: dict[str, int] = {}
    for node in capture.graph.nodes:
        if not isinstance(capture.values.get(node.name), TensorSpec):
            continue
        module = capture.resolve(node.target) \
            if node.op == "call_module" else None
        counter = registry.macs_for(node, module)
        if counter is not None:
            macs = int(counter(capture, node, module))
            if macs:
                counts[node.name] = macs
    return counts


def _weight_name(capture: Capture, node: fx.Node, names: dict[int, str],
                 named: dict[str, torch.Tensor]) -> str | None:
    """The canonical name of the parameter whose shape scales ``node``'s MACs: a called
    module's ``weight``, else the one model tensor of two or more axes that the node reads
    through ``get_attr`` (F.conv2d's, F.linear's or an ATen conv's weight)."""
    if node.op == "call_module":
        weight = getattr(capture.resolve(node.target), "weight", None)
        return names.get(id(weight)) if isinstance(weight, torch.Tensor) else None
    found = set()
    for arg in node.all_input_nodes:
        if arg.op != "get_attr":
            continue
        value = capture.resolve(arg.target)
        if not isinstance(value, torch.Tensor) or value.ndim < 2:
            continue
        name = names.get(id(value))
        if name is None and arg.target in named:  # torch.export: copies by name
            name = names.get(id(named[arg.target]))
        if name is not None:
            found.add(name)
    return found.pop() if len(found) == 1 else None


class PruneCost:
    """MACs and parameters of the pruned model, counted from the dense graph.

    A conv's, transposed conv's or linear map's MACs are proportional to its weight's size
    (out-channels x in-channels per group x kernel taps; spatial sizes stay), so after
    removing units they are the dense count times kept/size along each sliced axis of the
    weight; nodes whose MACs no parameter scales (a product of two activations) keep theirs.
    A parameter's size likewise scales by kept/size along each sliced axis (buffers are not
    parameters). Kept counts per axis are the slots whose component is not removed, the same
    rule :func:`structprune.core.plan.sliced_params` follows, so the figures equal a recount
    of the pruned model (:func:`structprune.core.counts.count_macs`, ``count_params``)
    wherever every MAC-bearing node reads a weight; ``node_weight`` names each node's (None
    where the count stays dense).
    """

    def __init__(self, analysis: Analysis, registry: RuleRegistry | None = None):
        self.analysis = analysis
        capture = analysis.capture
        index = tensor_index(capture.model)
        self.node_macs = count_node_macs(capture, registry)
        # node name -> the parameter scaling its MACs, or None
        self.node_weight: dict[str, str | None] = {}
        nodes = {node.name: node for node in capture.graph.nodes}
        for name in self.node_macs:
            self.node_weight[name] = _weight_name(capture, nodes[name], index.canonical,
                                                  index.named)

        # one axis per distinct slot array (tensors sliced in lockstep share theirs)
        axis_of: dict[int, int] = {}
        arrays: list[np.ndarray] = []
        self.axis: dict[tuple[str, int], int] = {}
        for key, ids in analysis.slots.items():
            a = axis_of.setdefault(id(ids), len(arrays))
            if a == len(arrays):
                arrays.append(ids)
            self.axis[key] = a
        self.n_axes = len(arrays)
        self.sizes = np.array([len(ids) for ids in arrays] + [1], np.int64)  # + a unit axis
        self._components = np.concatenate([analysis.component[ids] for ids in arrays]) \
            if arrays else np.zeros(0, np.int64)
        self._axis_of_slot = np.repeat(np.arange(self.n_axes), self.sizes[:-1])

        def axes_of(name: str) -> list[int]:
            return [self.axis[(name, d)] for d in range(len(analysis.sizes[name]))
                    if (name, d) in self.axis]

        macs_terms = [(m, axes_of(self.node_weight[n]) if self.node_weight[n] else [])
                      for n, m in self.node_macs.items()]
        params = {index.canonical[id(p)]: p.numel()
                  for p in capture.model.parameters()}  # parameters() skips shared ones
        param_terms = [(numel, axes_of(name) if name in analysis.sizes else [])
                       for name, numel in params.items()]
        self.dense_macs = int(sum(self.node_macs.values()))
        self.dense_params = int(sum(params.values()))
        self._macs = self._terms(macs_terms)
        self._params = self._terms(param_terms)

    def _terms(self, terms: list[tuple[int, list[int]]]) -> tuple[np.ndarray, ...]:
        """Values and their sliced axes as arrays (padded with the unit axis)."""
        width = max([len(axes) for _, axes in terms] + [1])
        axes = np.full((len(terms), width), self.n_axes, np.int64)
        for t, (_, ax) in enumerate(terms):
            axes[t, :len(ax)] = ax
        values = np.array([v for v, _ in terms], np.int64).reshape(-1)
        denom = self.sizes[axes].prod(axis=1)
        return values, axes, denom

    # exact figures after removal

    def kept_counts(self, removed: np.ndarray) -> np.ndarray:
        """Kept indices per axis (and 1 for the unit axis at the end)."""
        kept = np.bincount(self._axis_of_slot, weights=~removed[self._components],
                           minlength=self.n_axes)
        return np.append(np.rint(kept).astype(np.int64), 1)

    def _after(self, terms: tuple[np.ndarray, ...], removed: np.ndarray) -> int:
        values, axes, denom = terms
        if not values.size:
            return 0
        kept = self.kept_counts(np.asarray(removed, bool))[axes].prod(axis=1)
        exact = values % denom == 0
        total = int(((values[exact] // denom[exact]) * kept[exact]).sum())
        for v, k, d in zip(values[~exact].tolist(), kept[~exact].tolist(),
                           denom[~exact].tolist(), strict=True):
            total += v * k // d  # a counter not proportional to its weight's size
        return total

    def macs_after(self, removed: np.ndarray) -> int:
        """MACs of the model without the components flagged in ``removed``."""
        return self._after(self._macs, removed)

    def params_after(self, removed: np.ndarray) -> int:
        """Parameters of the model without the components flagged in ``removed``."""
        return self._after(self._params, removed)

    # marginal costs at the dense model

    def _saved(self, terms: tuple[np.ndarray, ...]) -> np.ndarray:
        values, axes, _ = terms
        # each slot of axis a carries value / size_a of every term over a
        per_axis = np.zeros(self.n_axes + 1)
        np.add.at(per_axis, axes, values[:, None] / self.sizes[axes])
        per_axis[-1] = 0.0
        return np.bincount(self._components, weights=per_axis[self._axis_of_slot],
                           minlength=self.analysis.n_components)

    def unit_macs(self) -> np.ndarray:
        """Per component: the MACs saved by removing it alone from the dense model."""
        return self._saved(self._macs)

    def unit_params(self) -> np.ndarray:
        """Per component: the parameters saved by removing it alone from the dense model."""
        return self._saved(self._params)


__all__ = ["PruneCost", "count_node_macs"]
