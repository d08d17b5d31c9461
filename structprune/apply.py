"""Stage 5, apply: slice the tensors a plan names, physically, on the user's own module.

The result has the same classes and a smaller state: parameters and buffers are replaced by
their kept slices, and each affected module's attributes (``out_channels``, ``groups``,
``num_features``, ``in_features``, ...) are updated by the resizer registered for its type,
so the model prints, trains, saves and traces like any other.
"""

from __future__ import annotations

import copy
import inspect
from collections import OrderedDict, defaultdict

import numpy as np
import torch
import torch.nn as nn

from .capture import tensor_index
from .errors import PlanError
from .plan import Plan


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


_FAST_COPY = (list, dict, set, OrderedDict)
_PLAIN = (int, float, str, bool, type(None), torch.dtype, torch.device, torch.memory_format)
_PLAIN_TYPES = frozenset(_PLAIN)


def _plain(value) -> bool:
    """Safe to share between the copy and the original: immutable data, classes, functions."""
    if type(value) in _PLAIN_TYPES:
        return True
    if isinstance(value, _PLAIN):
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return all(_plain(v) for v in value.values())
    # classes and plain functions (e.g. a block's norm_layer) are shared, as deepcopy does;
    # bound methods and partials may hold the original module, so they are not plain
    return inspect.isclass(value) or inspect.isfunction(value) or inspect.isbuiltin(value)


_COPIES_ITSELF: dict[type, bool] = {}
_TREE_SLOTS = frozenset(("_parameters", "_buffers", "_modules", "_compiled_call_impl"))


def _copies_itself(cls: type) -> bool:
    """Whether ``cls`` has its own way of being copied (a GraphModule, custom reduce/state)."""
    own = _COPIES_ITSELF.get(cls)
    if own is None:
        own = (hasattr(cls, "__deepcopy__") or hasattr(cls, "__copy__")
               or cls.__reduce_ex__ is not object.__reduce_ex__
               or cls.__reduce__ is not object.__reduce__
               or cls.__getstate__ is not nn.Module.__getstate__)
        _COPIES_ITSELF[cls] = own
    return own


def _copy_modules(model: nn.Module, shared: set[int]) -> tuple[nn.Module, dict] | None:
    """Copy the module tree, cloning every tensor except those in ``shared`` (about to be
    replaced); return the copy and the map from each original's id to its copy. Modules
    holding anything but plain attributes return None: deepcopy them."""
    memo: dict[int, object] = {}

    def tensor(t):
        if t is None or id(t) in shared:
            return t
        if id(t) not in memo:
            clone = t.detach().clone()
            memo[id(t)] = nn.Parameter(clone, t.requires_grad) if isinstance(t, nn.Parameter) \
                else clone
        return memo[id(t)]

    def module(m: nn.Module) -> nn.Module:
        if id(m) in memo:
            return memo[id(m)]
        cls = type(m)
        if _copies_itself(cls):
            raise _NotPlain
        new = cls.__new__(cls)  # what copy.copy does for a Module, without its overhead
        memo[id(m)] = new
        state = {}
        for key, value in m.__dict__.items():  # nn.Module.__getstate__, then the checks
            kind = type(value)
            if kind in _PLAIN_TYPES:
                state[key] = value
            elif key in _TREE_SLOTS:
                continue
            elif kind in _FAST_COPY:  # mostly the hook dicts, mostly empty
                if value and not _plain(value):
                    raise _NotPlain
                state[key] = value.copy()
            elif _plain(value):
                state[key] = copy.copy(value) if isinstance(value, (list, dict, set)) else value
            else:
                raise _NotPlain
        state["_parameters"] = {k: tensor(v) for k, v in m._parameters.items()}
        state["_buffers"] = {k: tensor(v) for k, v in m._buffers.items()}
        state["_modules"] = {k: module(v) if v is not None else None
                             for k, v in m._modules.items()}
        new.__setstate__(state)  # as copy.copy does
        return new

    try:
        return module(model), memo
    except _NotPlain:
        return None


class _NotPlain(Exception):
    pass


class _Indices:
    """Index tensors for keep lists, built through numpy (``torch.as_tensor`` of a list of
    ints costs more than the copy of a small tensor). The last few are kept: a norm's four
    vectors, in state_dict order after their conv, keep equal lists."""

    def __init__(self, recent: int = 4):
        self.recent = recent
        self.seen: list[tuple[list[int], torch.Tensor]] = []

    def __call__(self, keep: list[int]) -> torch.Tensor:
        for listed, index in self.seen:
            if listed is keep or listed == keep:
                return index
        index = torch.from_numpy(np.asarray(keep, dtype=np.int64))
        self.seen = [*self.seen, (keep, index)][-self.recent:]
        return index


_ONE_PASS_FROM = 1 << 24  # bytes of intermediate


def _sliced(tensor: torch.Tensor, dims: list[tuple[int, list[int]]], index: _Indices,
            ) -> torch.Tensor:
    """``tensor`` keeping the listed indices along each listed axis, leading axis first
    (contiguous copies). A weight cut on both leading axes whose first cut would leave a
    large intermediate (VGG16's first classifier layer: 205 MB) is gathered in one pass:
    the intermediate's fresh pages would cost more than the slower gather."""
    device = tensor.device
    both = len(dims) == 2 and (dims[0][0], dims[1][0]) == (0, 1)
    if both and len(dims[0][1]) * tensor[0].nbytes >= _ONE_PASS_FROM:
        rows, columns = index(dims[0][1]).to(device), index(dims[1][1]).to(device)
        return tensor[rows[:, None], columns].contiguous()
    for dim, keep in dims:
        tensor = tensor.index_select(dim, index(keep).to(device))
    return tensor.contiguous()


def apply_plan(model: nn.Module, plan: Plan, inplace: bool = False, registry=None) -> nn.Module:
    """Return ``model`` (a copy unless ``inplace``) with the plan's slices removed."""
    from .rules import DEFAULT_REGISTRY

    registry = registry or DEFAULT_REGISTRY
    named, holders, _ = tensor_index(model)
    _check_plan(model, named, plan)
    cuts: dict[str, list[tuple[int, list[int]]]] = defaultdict(list)
    for entry in plan.params:
        cuts[entry["name"]].append((entry["dim"], entry["keep"]))
    if not inplace:  # share the tensors about to be replaced instead of copying them
        replaced = {id(named[name]) for name in cuts}
        copied = _copy_modules(model, replaced)
        if copied is None:
            model = copy.deepcopy(model, {i: named[n] for n in cuts for i in [id(named[n])]})
            named, holders, _ = tensor_index(model)
        else:  # the replaced tensors are shared: only their holders move to the copy
            model, memo = copied
            holders = {key: [(memo[id(m)], attr, is_param) for m, attr, is_param in holders[key]]
                       for key in replaced}
    touched: dict[int, nn.Module] = {}
    index = _Indices()
    with torch.no_grad():
        for name, dims in cuts.items():
            old = named[name]
            new = _sliced(old.detach(), sorted(dims), index)
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            for module, attr, is_param in holders[id(old)]:
                (module._parameters if is_param else module._buffers)[attr] = new
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
