"""Stage 5, apply: slice the tensors a plan names, physically, on the user's own module.

The result has the same classes and a smaller state: parameters and buffers are replaced by
their kept slices, and each affected module's attributes (``out_channels``, ``groups``,
``num_features``, ``in_features``, ...) are updated by the resizer registered for its type,
so the model prints, trains, saves and traces like any other.
"""

from __future__ import annotations

import copy
from collections import OrderedDict, defaultdict

import numpy as np
import torch
import torch.nn as nn

from structprune.core.plan import Plan
from structprune.core.registry import RuleRegistry
from structprune.core.rules import DEFAULT_REGISTRY
from structprune.errors import PlanError
from structprune.tree import tensor_index


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
    named, holders, _ = tensor_index(model)
    _check_plan(model, named, plan)
    cuts: dict[str, list[tuple[int, list[int]]]] = defaultdict(list)
    for entry in plan.params:
        cuts[entry["name"]].append((entry["dim"], entry["keep"]))
    with torch.no_grad():
        sliced = {name: _sliced(named[name], dims) for name, dims in cuts.items()}
    if not inplace:  # the copy takes the sliced tensors in place of the originals
        memo = _copy_memo(model, {id(named[name]): new for name, new in sliced.items()})
        model = copy.deepcopy(model, memo)
        named, holders, _ = tensor_index(model)  # a module may copy itself without the memo
    touched: dict[int, nn.Module] = {}
    for name, new in sliced.items():
        for module, attr in holders[id(named[name])]:
            if getattr(module, attr) is not new:
                setattr(module, attr, new)  # re-registers the parameter or buffer
            touched[id(module)] = module
    for module in _with_ancestors(model, touched):
        resize = registry.resizer_for(module)
        if resize is not None:
            resize(module)
    for entry in plan.attributes:
        setattr(model.get_submodule(entry["module"]), entry["attr"], entry["value"])
    return model


_EMPTY_CONTAINERS = (dict, OrderedDict, set, list)


def _copy_memo(model: nn.Module, sliced: dict[int, torch.Tensor]) -> dict[int, object]:
    """A ``copy.deepcopy`` memo that gives the copy the ``sliced`` tensors (by the original's
    id), and a fresh container for each empty dict, set or list a module holds (its dozen
    hook tables), which deepcopy would otherwise rebuild through ``__reduce_ex__`` one by
    one. deepcopy still copies everything else and keeps what is shared shared. This halves
    the copy: DenseNet-201 66 ms to 36 ms, EfficientNet-B0 30 to 12, ResNet-50 16 to 10."""
    memo: dict[int, object] = dict(sliced)
    for module in model.modules():
        for value in vars(module).values():
            if type(value) in _EMPTY_CONTAINERS and not value:
                memo.setdefault(id(value), type(value)())
    return memo


def _sliced(tensor: torch.Tensor, dims: list[tuple[int, list[int]]]) -> torch.Tensor:
    """``tensor`` keeping the listed indices along each listed axis (a new, contiguous tensor;
    a parameter stays a parameter)."""
    new = tensor.detach()
    for dim, keep in sorted(dims):  # numpy builds an index from a list 3x faster
        index = torch.from_numpy(np.asarray(keep, dtype=np.int64)).to(new.device)
        new = new.index_select(dim, index)
    new = new.contiguous()
    return nn.Parameter(new, requires_grad=tensor.requires_grad) \
        if isinstance(tensor, nn.Parameter) else new


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
