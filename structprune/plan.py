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

from .analyse import Analysis
from .errors import PlanError

FORMAT = "structprune.plan/1"


def check_ratio(ratio: Any, what: str = "ratio") -> None:
    """Raise :class:`PlanError` unless ``ratio`` is a fraction of channels to remove."""
    if not (isinstance(ratio, (int, float)) and not isinstance(ratio, bool) and 0 <= ratio < 1):
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
    """

    ratio: float = 0.5
    global_ranking: bool = False
    round_to: int = 1
    min_width: int = 1
    ignore: list[str] = field(default_factory=list)
    exact_only: bool = False
    ratios: dict[str, float] = field(default_factory=dict)
    max_group_ratio: float = 0.9

    def validate(self) -> None:
        for r in [self.ratio, *self.ratios.values()]:
            check_ratio(r)
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


def make_plan(analysis: Analysis, scores: Mapping[int, np.ndarray],
              settings: PlanSettings | None = None) -> Plan:
    """Choose the units each group keeps and list the resulting tensor slices."""
    settings = settings or PlanSettings()
    settings.validate()
    check_names(analysis, settings.ignore, "ignored name")
    check_names(analysis, settings.ratios, "ratio override")
    n_comp = int(analysis.component.max()) + 1 if analysis.component.size else 0
    removed = np.zeros(n_comp, bool)
    decisions: list[dict[str, Any]] = []

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

    wanted: dict[int, int] = {}
    if settings.global_ranking and candidates:
        pool = np.concatenate([scores[g][c] for g, c in candidates.items()])
        k = int(len(pool) * settings.ratio)
        threshold = np.partition(pool, k - 1)[k - 1] if k > 0 else -np.inf
        for g, c in candidates.items():
            below = int((scores[g][c] <= threshold).sum())
            wanted[g] = min(below, int(len(c) * settings.max_group_ratio))
    else:
        for g, c in candidates.items():
            wanted[g] = int(len(c) * group_ratio[g])

    for group in analysis.groups:
        prunable = candidates.get(group.index)
        entry: dict[str, Any] = {
            "index": group.index, "units": group.size, "width": group.width,
            "members": [f"{n}:{d}" for n, d in group.members],
            "status": "blocked" if group.blocked.all() else
                      "approximate" if group.approximate.any() else "exact",
        }
        if group.reasons:
            entry["reasons"] = {k: sorted(set(v))[:5] for k, v in group.reasons.items()}
        kept = group.size
        if prunable is not None:
            unprunable = int((~prunable).sum())
            min_units = math.ceil(settings.min_width / group.width)
            keep = _rounded_keep(group.size, wanted[group.index],
                                 _step(settings.round_to, group.width), unprunable, min_units)
            n_remove = group.size - keep
            if n_remove > 0:
                order = np.flatnonzero(prunable)
                ranked = order[np.argsort(scores[group.index][order], kind="stable")]
                drop = ranked[:n_remove]
                removed[group.units[drop]] = True
                kept = keep
        entry["kept"] = kept
        decisions.append(entry)

    return Plan(sliced_params(analysis, removed), decisions, asdict(settings),
                attributes=sized_attributes(analysis, removed))
