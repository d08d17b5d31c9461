"""Stage 5, apply: slice the tensors a plan names, physically, on the user's own module.

The result has the same classes and a smaller state: parameters and buffers are replaced by
their kept slices, and each affected module's attributes (``out_channels``, ``groups``,
``num_features``, ``in_features``, ...) are updated by the resizer registered for its type,
so the model prints, trains, saves and traces like any other.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import numpy as np
import torch
import torch.nn as nn

from .errors import PlanError
from .plan import Plan
from .registry import RuleRegistry
from .rules import DEFAULT_REGISTRY
from .tree import tensor_index


def check_plan(model: nn.Module, plan: Plan) -> None:
    """Raise :class:`PlanError` unless every entry names a tensor of this model and size."""
    _check_plan(model, tensor_index(model).named, plan)


def _check_plan(model: nn.Module, named: dict[str, torch.Tensor], plan: Plan) -> None:
    modules = dict(model.named_modules()) if plan.attributes else {}
    for entry in plan.attributes:
        module = modules.get(entry["module"])
        if module is None or not isinstance(getattr(module, entry["attr"], None), int):
            raise PlanError(f"the plan sets {entry['module']}.{entry['attr']}, which this model "
                            "does not have: it was made for a different model")
    for entry in plan.params:
        tensor = named.get(entry["name"])
        if tensor is None:
            raise PlanError(f"the plan slices {entry['name']!r}, which this model does not have: "
                            "it was made for a different model")
        dim = entry["dim"]
        if not 0 <= dim < tensor.ndim or tensor.shape[dim] != entry["size"]:
            shape = tuple(tensor.shape)
            raise PlanError(f"the plan expects {entry['name']} to have size {entry['size']} on "
                            f"axis {dim}, but it has shape {shape}: it was made for a different "
                            "model or the model is already pruned")


def apply_plan(model: nn.Module, plan: Plan, inplace: bool = False,
               registry: RuleRegistry | None = None) -> nn.Module:
    """Return ``model`` (a copy unless ``inplace``) with the plan's slices removed."""
    registry = registry or DEFAULT_REGISTRY
    named = tensor_index(model).named
    _check_plan(model, named, plan)
    cuts: dict[str, list[tuple[int, list[int]]]] = defaultdict(list)
    for entry in plan.params:
        cuts[entry["name"]].append((entry["dim"], entry["keep"]))
    if not inplace:  # the tensors about to be replaced are shared, not copied
        model = copy.deepcopy(model, {id(named[name]): named[name] for name in cuts})
    named, holders, _ = tensor_index(model)
    touched: dict[int, nn.Module] = {}
    with torch.no_grad():
        for name, dims in cuts.items():
            old = named[name]
            new = old.detach()
            for dim, keep in sorted(dims):  # numpy builds an index from a list 3x faster
                index = torch.from_numpy(np.asarray(keep, dtype=np.int64)).to(new.device)
                new = new.index_select(dim, index)
            new = new.contiguous()
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            for module, attr in holders[id(old)]:
                setattr(module, attr, new)  # re-registers the parameter or buffer
                touched[id(module)] = module
    for module in _with_ancestors(model, touched):
        resize = registry.resizer_for(module)
        if resize is not None:
            resize(module)
    for entry in plan.attributes:
        setattr(model.get_submodule(entry["module"]), entry["attr"], entry["value"])
    return model


def _with_ancestors(model: nn.Module, touched: dict[int, nn.Module]) -> list[nn.Module]:
    """The touched modules, then every module containing one, innermost first: a container
    with a resizer (a mixed conv's split sizes) reads its children's new sizes."""
    modules = dict(model.named_modules(remove_duplicate=False))
    paths = {id(m): name for name, m in modules.items()}
    ancestors: dict[str, nn.Module] = {}
    for key in touched:
        parts = paths.get(key, "").split(".")
        for depth in range(len(parts) - 1, -1, -1):
            path = ".".join(parts[:depth])
            if path in modules and id(modules[path]) not in touched:
                ancestors.setdefault(path, modules[path])
    inner_first = sorted(ancestors, key=lambda p: -(p.count(".") + 1 if p else 0))
    return list(touched.values()) + [ancestors[p] for p in inner_first]
