"""Stage 4, plan: the plan format. Which units each group keeps, as plain JSON data.

A plan is produced once from an analysis and scores (:mod:`structprune.core.selection`), and
can be saved, reviewed and applied to any fresh copy of the dense model. Its ``params`` list
is the contract (see PRODUCT.md): every parameter and buffer to slice, by state_dict name,
with the axis, the dense size and the kept indices. The cost model is
:mod:`structprune.core.cost`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from structprune.core.analyse import Analysis
from structprune.errors import PlanError
from structprune.files import atomic_write_text

FORMAT = "structprune.plan/1"


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
    earlier = first.settings["steps"] if "steps" in first.settings else [first.settings]
    steps = [*earlier, then.settings]
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


__all__ = ["FORMAT", "Plan", "compose", "sized_attributes", "sliced_params"]
