"""Stage 4, plan: which units each group keeps, as plain JSON data.

A plan is produced once from an analysis and scores, and can be saved, reviewed and applied
to any fresh copy of the dense model. Its ``params`` list is the contract (see PRODUCT.md):
every parameter and buffer to slice, by state_dict name, with the axis, the dense size and
the kept indices.
"""

from __future__ import annotations

import json
import math
import os
import re
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from structprune.core.analyse import Analysis, Group
from structprune.core.capture import Capture
from structprune.core.registry import RuleRegistry
from structprune.core.rules import DEFAULT_REGISTRY
from structprune.errors import PlanError
from structprune.tree import tensor_index
from structprune.types import TensorSpec

FORMAT = "structprune.plan/1"


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and not math.isnan(x)


def check_ratio(ratio: Any, what: str = "ratio") -> None:
    """Raise :class:`PlanError` unless ``ratio`` is a fraction of channels to remove."""
    if not (_is_number(ratio) and 0 <= ratio < 1):
        raise PlanError(f"{what} {ratio} is outside [0, 1): pass a fraction such as 0.5")


@dataclass
class PlanSettings:
    """How many channels to remove, and where.

    ratio: fraction of each group's units to remove (or of all units, with global_ranking).
    ratios: per-module overrides, ``{module name or glob: ratio}``.
    round_to: kept channel counts become multiples of this (hardware-friendly widths).
    min_width: fewest channels a group keeps.
    ignore: module names (or globs) whose parameters must stay untouched.
    exact_only: prune only groups whose removal equals masking (no approximate groups).
    max_group_ratio: most of a group's units that global ranking, a threshold or a budget
        removes.
    threshold: instead of a ratio, remove every unit whose normalised score is below this.
    macs_budget: instead of a ratio, keep at most this fraction of the dense model's MACs,
        removing the units of least importance per MAC saved first, over all groups.
    params_budget: the same for the parameter count.
    At most one of threshold, macs_budget and params_budget is set; with one, ``ratio`` and
    ``global_ranking`` play no part.
    """

    ratio: float = 0.5
    global_ranking: bool = False
    round_to: int = 1
    min_width: int = 1
    ignore: list[str] = field(default_factory=list)
    exact_only: bool = False
    ratios: dict[str, float] = field(default_factory=dict)
    max_group_ratio: float = 0.9
    threshold: float | None = None
    macs_budget: float | None = None
    params_budget: float | None = None

    @property
    def mode(self) -> str:
        """``ratio``, ``threshold``, ``macs_budget`` or ``params_budget``."""
        for name in ("threshold", "macs_budget", "params_budget"):
            if getattr(self, name) is not None:
                return name
        return "ratio"

    def validate(self) -> None:
        for r in [self.ratio, *self.ratios.values()]:
            check_ratio(r)
        chosen = [n for n in ("threshold", "macs_budget", "params_budget")
                  if getattr(self, n) is not None]
        if len(chosen) > 1:
            raise PlanError(f"{' and '.join(chosen)} are both set: pass only one of threshold, "
                            "macs_budget and params_budget")
        for name in ("macs_budget", "params_budget"):
            value = getattr(self, name)
            if value is not None and not (_is_number(value) and 0 < value <= 1):
                raise PlanError(f"{name} {value} is outside (0, 1]: pass the fraction to "
                                "keep, such as 0.4")
        if self.threshold is not None and not (_is_number(self.threshold)
                                               and self.threshold >= 0):
            raise PlanError(f"threshold {self.threshold} must be a number >= 0: units scoring "
                            "below it are removed")
        if chosen and self.ratios:
            raise PlanError(f"per-module ratios apply to ratio pruning, not to {chosen[0]}: "
                            "drop the ratio overrides or use --ignore")
        if int(self.round_to) != self.round_to or self.round_to < 1:
            raise PlanError(f"round_to {self.round_to} must be an integer >= 1")
        if self.min_width < 1:
            raise PlanError(f"min_width {self.min_width} must be >= 1")
        if self.global_ranking and self.ratios:
            raise PlanError("per-module ratios apply to per-group ranking: drop either the "
                            "ratio overrides or global ranking")


@dataclass
class Plan:
    """Kept indices per sliced tensor, plus what was decided per group."""

    params: list[dict[str, Any]]
    groups: list[dict[str, Any]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    # module attributes no sliced tensor determines: {"module", "attr", "value"}
    attributes: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = {"format": FORMAT, "params": self.params, "groups": self.groups,
                "settings": self.settings}
        if self.attributes:
            data["attributes"] = self.attributes
        return {**data, **self.extra}

    def dumps(self) -> str:
        return json.dumps(self.to_json(), indent=1, sort_keys=False) + "\n"

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(Path(path), self.dumps())

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Plan:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise PlanError(f"not a structprune plan: expected \"format\": \"{FORMAT}\"")
        params = data.get("params")
        if not isinstance(params, list):
            raise PlanError("plan has no \"params\" list")
        for entry in params:
            if not (isinstance(entry, Mapping) and isinstance(entry.get("name"), str)
                    and isinstance(entry.get("dim"), int) and isinstance(entry.get("size"), int)
                    and isinstance(entry.get("keep"), list)
                    and all(isinstance(k, int) for k in entry["keep"])):
                raise PlanError(f"malformed plan entry {str(entry)[:80]}: needs name, dim, size, keep")
            keep = entry["keep"]
            if not keep:
                raise PlanError(f"plan entry {entry['name']} keeps nothing: every axis keeps "
                                "at least one index")
            if keep != sorted(set(keep)) or (keep and (keep[0] < 0 or keep[-1] >= entry["size"])):
                raise PlanError(f"plan entry {entry['name']}: keep must be sorted unique indices "
                                f"below size {entry['size']}")
        attributes = data.get("attributes", [])
        if not isinstance(attributes, list) or not all(
                isinstance(a, Mapping) and isinstance(a.get("module"), str)
                and isinstance(a.get("attr"), str) and isinstance(a.get("value"), int)
                and not isinstance(a.get("value"), bool) and a["value"] >= 1
                for a in attributes):
            raise PlanError("plan \"attributes\" must be a list of {module, attr, value >= 1}")
        groups, settings = data.get("groups", []), data.get("settings", {})
        if not isinstance(groups, list) or not all(isinstance(g, Mapping) for g in groups):
            raise PlanError("plan \"groups\" must be a list of objects")
        if not isinstance(settings, Mapping):
            raise PlanError("plan \"settings\" must be an object")
        extra = {k: v for k, v in data.items()
                 if k not in ("format", "params", "groups", "settings", "attributes")}
        return cls([dict(p) for p in params], [dict(g) for g in groups], dict(settings), extra,
                   [dict(a) for a in attributes])

    @classmethod
    def load(cls, path: str | os.PathLike) -> Plan:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise PlanError(f"cannot read plan {path}: {exc.strerror}") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"plan {path} is not valid JSON (line {exc.lineno}): "
                            "it may be truncated; write it again with `structprune prune`") from exc
        return cls.from_json(data)


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _matches(pattern: str, module: str) -> bool:
    if any(c in pattern for c in "*?["):
        return re.fullmatch(_glob_to_regex(pattern), module) is not None
    return module == pattern or module.startswith(pattern + ".")


def _glob_to_regex(pattern: str) -> str:
    import fnmatch
    return fnmatch.translate(pattern)


def _module_of(param: str) -> str:
    return param.rsplit(".", 1)[0] if "." in param else ""


def check_names(analysis: Analysis, patterns: Iterable[str], what: str) -> None:
    if not patterns:
        return
    modules = {_module_of(name) for name in analysis.sizes}
    for pattern in patterns:
        if not any(_matches(pattern, m) for m in modules):
            raise PlanError(f"{what} {pattern!r} matches no module with parameters; "
                            "names look like 'features.0' or 'layer1.0.conv1'")


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


def compose(first: Plan, then: Plan) -> Plan:
    """One plan, in dense indices, doing ``first`` and then ``then`` (made on the model
    ``first`` produced, in its indices): applied to a fresh dense model it gives the model
    the two steps give in turn. Groups and settings are ``then``'s, with every step's
    settings listed under ``steps``."""
    kept = {(e["name"], e["dim"]): e for e in first.params}
    params = {key: dict(entry, keep=list(entry["keep"])) for key, entry in kept.items()}
    for entry in then.params:
        key = (entry["name"], entry["dim"])
        earlier = kept.get(key)
        if earlier is None:  # not sliced before: its indices are dense already
            params[key] = dict(entry, keep=list(entry["keep"]))
        else:
            if entry["size"] != len(earlier["keep"]):
                raise PlanError(f"the second plan expects {entry['name']} axis {entry['dim']} "
                                f"of size {entry['size']}, but the first keeps "
                                f"{len(earlier['keep'])}: it was made for another model")
            params[key] = dict(earlier, keep=[earlier["keep"][i] for i in entry["keep"]])
    order = {key: i for i, key in enumerate([*kept, *((e["name"], e["dim"])
                                                      for e in then.params)])}
    attributes = {(a["module"], a["attr"]): a for a in [*first.attributes, *then.attributes]}
    steps = [*first.settings.get("steps", [first.settings]), then.settings]
    return Plan(sorted(params.values(), key=lambda e: order[(e["name"], e["dim"])]),
                then.groups, {**then.settings, "steps": steps}, dict(then.extra),
                list(attributes.values()))


def sliced_params(analysis: Analysis, removed: np.ndarray) -> list[dict[str, Any]]:
    """The plan's ``params`` entries for removing the components flagged in ``removed``,
    in state_dict order."""
    params = []
    kept_of_array: dict[int, list[int] | None] = {}  # tensors sharing atoms keep the same
    for (name, dim), ids in analysis.slots.items():
        if id(ids) not in kept_of_array:
            kept = np.flatnonzero(~removed[analysis.component[ids]])
            kept_of_array[id(ids)] = kept.tolist() if len(kept) < len(ids) else None
        kept = kept_of_array[id(ids)]
        if kept is not None:  # each entry owns its list: plans are plain, unaliased data
            params.append({"name": name, "dim": dim, "size": len(ids), "keep": list(kept)})
    order = {name: i for i, name in enumerate(analysis.sizes)}
    params.sort(key=lambda p: (order[p["name"]], p["dim"]))
    return params


def sized_attributes(analysis: Analysis, removed: np.ndarray) -> list[dict[str, Any]]:
    """The plan's ``attributes`` entries: channel counts kept in module attributes that no
    sliced tensor determines (a norm without weights keeps its ``num_features``)."""
    entries = []
    for key, ids in analysis.attributes.items():
        kept = int((~removed[analysis.component[ids]]).sum())
        if kept < len(ids):
            module, attr = key.rsplit(".", 1)
            entries.append({"module": module, "attr": attr, "value": kept})
    return entries


# Cost model: MACs and parameters after removing units, counted from the graph


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
    rule :func:`sliced_params` follows, so the figures equal a recount of the pruned model
    (:func:`structprune.core.counts.count_macs`, ``count_params``) wherever every MAC-bearing node
    reads a weight; ``node_weight`` names each node's (None where the count stays dense).
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
        self.n_components = int(analysis.component.max()) + 1 if analysis.component.size else 0

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
                           minlength=self.n_components)

    def unit_macs(self) -> np.ndarray:
        """Per component: the MACs saved by removing it alone from the dense model."""
        return self._saved(self._macs)

    def unit_params(self) -> np.ndarray:
        """Per component: the parameters saved by removing it alone from the dense model."""
        return self._saved(self._params)


def make_plan(analysis: Analysis, scores: Mapping[int, np.ndarray],
              settings: PlanSettings | None = None, *, cost: PruneCost | None = None) -> Plan:
    """Choose the units each group keeps and list the resulting tensor slices.

    ``cost`` is the cost model for a MACs or parameter budget (built from ``analysis`` with
    the default registry when not given)."""
    settings = settings or PlanSettings()
    settings.validate()
    candidates, group_ratio = prunable_units(analysis, scores, settings)
    groups = {group.index: group for group in analysis.groups}
    ranked = removal_order(scores, candidates)
    extra: dict[str, Any] = {}
    mode = settings.mode
    if mode in ("macs_budget", "params_budget"):
        cost = cost or PruneCost(analysis)
        keep, ranked, extra["budget"] = _budget(groups, candidates, scores, settings, cost)
    else:
        wanted: dict[int, int] = {}
        if mode == "threshold":
            for g, c in candidates.items():
                below = int((scores[g][c] < settings.threshold).sum())
                wanted[g] = min(below, int(len(c) * settings.max_group_ratio))
        elif settings.global_ranking and candidates:
            pool = np.concatenate([scores[g][c] for g, c in candidates.items()])
            k = int(len(pool) * settings.ratio)
            threshold = np.partition(pool, k - 1)[k - 1] if k > 0 else -np.inf
            for g, c in candidates.items():
                below = int((scores[g][c] <= threshold).sum())
                wanted[g] = min(below, int(len(c) * settings.max_group_ratio))
        else:
            for g, c in candidates.items():
                wanted[g] = int(len(c) * group_ratio[g])
        keep = {g: _group_keep(groups[g], c, wanted[g], settings)
                for g, c in candidates.items()}
    return plan_from_keep(analysis, keep, ranked, settings, extra)


def prunable_units(analysis: Analysis, scores: Mapping[int, np.ndarray],
                   settings: PlanSettings) -> tuple[dict[int, np.ndarray], dict[int, float]]:
    """Per scored group with something to prune: which of its units may go (a mask), and
    the ratio that applies to it (``settings.ratio`` or a per-module override)."""
    check_names(analysis, settings.ignore, "ignored name")
    check_names(analysis, settings.ratios, "ratio override")
    candidates: dict[int, np.ndarray] = {}
    group_ratio: dict[int, float] = {}
    for group in analysis.groups:
        prunable = ~group.blocked
        if settings.exact_only:
            prunable &= ~group.approximate
        modules = {_module_of(name) for name, _ in group.members}
        if any(_matches(p, m) for p in settings.ignore for m in modules):
            prunable[:] = False
        ratio = settings.ratio
        for pattern, r in settings.ratios.items():
            if any(_matches(pattern, m) for m in modules):
                ratio = r
        group_ratio[group.index] = ratio
        if prunable.any() and group.index in scores:
            candidates[group.index] = prunable
    return candidates, group_ratio


def removal_order(scores: Mapping[int, np.ndarray], candidates: Mapping[int, np.ndarray],
                  ) -> dict[int, np.ndarray]:
    """Per group: its prunable units (local indices), least important first."""
    return {g: np.flatnonzero(c)[np.argsort(scores[g][c], kind="stable")]
            for g, c in candidates.items()}


def keep_bounds(group: Group, prunable: np.ndarray, settings: PlanSettings) -> int:
    """The fewest units ``group`` may keep: its unprunable units, ``min_width`` channels and
    what ``max_group_ratio`` leaves."""
    most_removed = int(int(prunable.sum()) * settings.max_group_ratio)
    return max(group.size - most_removed, int((~prunable).sum()),
               math.ceil(settings.min_width / group.width), 1)


def plan_from_keep(analysis: Analysis, keep: Mapping[int, int],
                   ranked: Mapping[int, np.ndarray], settings: PlanSettings,
                   extra: dict[str, Any] | None = None) -> Plan:
    """The plan keeping ``keep[g]`` units of each group ``g``, removing its units in the
    order ``ranked[g]`` (groups not in ``keep`` stay whole)."""
    n_comp = int(analysis.component.max()) + 1 if analysis.component.size else 0
    removed = np.zeros(n_comp, bool)
    decisions: list[dict[str, Any]] = []
    for group in analysis.groups:
        entry: dict[str, Any] = {
            "index": group.index, "units": group.size, "width": group.width,
            "members": [f"{n}:{d}" for n, d in group.members],
            "status": "blocked" if group.blocked.all() else
                      "approximate" if group.approximate.any() else "exact",
        }
        if group.reasons:
            entry["reasons"] = {k: sorted(set(v))[:5] for k, v in group.reasons.items()}
        kept = int(keep.get(group.index, group.size))
        if kept < group.size:
            removed[group.units[ranked[group.index][:group.size - kept]]] = True
        entry["kept"] = kept
        decisions.append(entry)

    return Plan(sliced_params(analysis, removed), decisions, asdict(settings), dict(extra or {}),
                attributes=sized_attributes(analysis, removed))


def _group_keep(group: Group, prunable: np.ndarray, wanted: int, settings: PlanSettings) -> int:
    """Units a group keeps when ``wanted`` of its prunable units should go: at least its
    unprunable units and ``min_width`` channels, a multiple of ``round_to`` channels."""
    return _rounded_keep(group.size, wanted, _step(settings.round_to, group.width),
                         int((~prunable).sum()), math.ceil(settings.min_width / group.width))


def _budget(groups: dict[int, Group], candidates: dict[int, np.ndarray],
            scores: Mapping[int, np.ndarray], settings: PlanSettings, cost: PruneCost,
            ) -> tuple[dict[int, int], dict[int, np.ndarray], dict[str, Any]]:
    """Kept units per group and each group's removal order for a MACs or parameter budget.

    All prunable units are ordered by score per unit of cost saved (MACs or parameters of
    the dense model, cheapest importance first, ties in group order). Removing the first k
    of them, within each group's constraints (max_group_ratio, min_width, round_to), leaves
    a cost that never grows with k; a bisection finds the smallest k within the budget."""
    kind = "macs" if settings.mode == "macs_budget" else "params"
    fraction = settings.macs_budget if kind == "macs" else settings.params_budget
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
    caps = np.array([int(groups[g].size * settings.max_group_ratio) for g in order_g], np.int64)

    def plan_of(k: int) -> tuple[dict[int, int], np.ndarray]:
        wanted = np.minimum(np.bincount(group_of[order[:k]], minlength=len(order_g)), caps)
        keep, removed = {}, np.zeros(cost.n_components, bool)
        for i, g in enumerate(order_g):
            keep[g] = _group_keep(groups[g], candidates[g], int(wanted[i]), settings)
            removed[groups[g].units[ranked[g][:groups[g].size - keep[g]]]] = True
        return keep, removed

    lo, hi = 0, len(order)  # the answer lies in [lo, hi]
    keep, removed = plan_of(hi)
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
        if after(plan_of(mid)[1]) <= limit:
            hi = mid
        else:
            lo = mid + 1
    keep, removed = plan_of(hi)
    info = {"kind": kind, "target": fraction, "units_ranked": int(hi),
            "macs_ratio_predicted": cost.macs_after(removed) / cost.dense_macs
            if cost.dense_macs else 1.0,
            "params_ratio_predicted": cost.params_after(removed) / cost.dense_params
            if cost.dense_params else 1.0}
    return keep, ranked, info
