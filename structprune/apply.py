"""Stage 5, apply: slice the tensors a plan names, physically, on the user's own module.

The result has the same classes and a smaller state: parameters and buffers are replaced by
their kept slices, and each affected module's attributes (``out_channels``, ``groups``,
``num_features``, ``in_features``, ...) are updated by the resizer registered for its type,
so the model prints, trains, saves and traces like any other.
"""

from __future__ import annotations

import copy
from collections import defaultdict

import torch
import torch.nn as nn

from .errors import PlanError
from .plan import Plan


def _holders(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, bool]]]:
    """Every (module, attribute) that holds each tensor; tied weights have several."""
    holders: dict[int, list[tuple[nn.Module, str, bool]]] = defaultdict(list)
    for module in model.modules():
        for attr, t in module._parameters.items():
            if t is not None:
                holders[id(t)].append((module, attr, True))
        for attr, t in module._buffers.items():
            if t is not None:
                holders[id(t)].append((module, attr, False))
    return holders


def _named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_parameters(remove_duplicate=False))
    named.update(model.named_buffers(remove_duplicate=False))
    return named


def check_plan(model: nn.Module, plan: Plan) -> None:
    """Raise :class:`PlanError` unless every entry names a tensor of this model and size."""
    named = _named_tensors(model)
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


def apply_plan(model: nn.Module, plan: Plan, inplace: bool = False, registry=None) -> nn.Module:
    """Return ``model`` (a copy unless ``inplace``) with the plan's slices removed."""
    from .rules import DEFAULT_REGISTRY

    registry = registry or DEFAULT_REGISTRY
    check_plan(model, plan)
    named = _named_tensors(model)
    cuts: dict[str, list[tuple[int, list[int]]]] = defaultdict(list)
    for entry in plan.params:
        cuts[entry["name"]].append((entry["dim"], entry["keep"]))
    if not inplace:  # share the tensors about to be replaced instead of copying them
        memo = {id(named[name]): named[name] for name in cuts}
        model = copy.deepcopy(model, memo)
        named = _named_tensors(model)
    holders = _holders(model)
    touched: dict[int, nn.Module] = {}
    with torch.no_grad():
        for name, dims in cuts.items():
            old = named[name]
            new = old.detach()
            for dim, keep in sorted(dims):  # leading axis first: contiguous copies
                index = torch.as_tensor(keep, dtype=torch.long, device=old.device)
                new = new.index_select(dim, index)
            new = new.contiguous()
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            for module, attr, is_param in holders[id(old)]:
                (module._parameters if is_param else module._buffers)[attr] = new
                touched[id(module)] = module
    for module in touched.values():
        resize = registry.resizer_for(module)
        if resize is not None:
            resize(module)
    return model
