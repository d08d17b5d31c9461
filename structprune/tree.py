"""Helpers over a model's module tree and inputs, shared by every stage.

A leaf module: it imports nothing of structprune.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import torch
import torch.nn as nn

Holders = dict[int, list[tuple[nn.Module, str]]]


class TensorIndex(NamedTuple):
    """Every parameter and buffer of a model, from one walk of its module tree."""

    # by each of its names, in the order of ``state_dict()`` (which leaves out
    # non-persistent buffers)
    named: dict[str, torch.Tensor]
    # every (module, attribute) holding each tensor (tied weights have several)
    holders: Holders
    # each tensor's canonical name: its first as a parameter (a state_dict key, and scored),
    # else its first at all
    canonical: dict[int, str]


def tensor_index(model: nn.Module) -> TensorIndex:
    """Index ``model``'s parameters and buffers (see :class:`TensorIndex`)."""
    named: dict[str, torch.Tensor] = {}
    holders: Holders = defaultdict(list)
    first_param: dict[int, str] = {}
    first_any: dict[int, str] = {}
    seen: set[int] = set()
    for prefix, module in model.named_modules(remove_duplicate=False):
        first = id(module) not in seen
        seen.add(id(module))
        prefix = f"{prefix}." if prefix else ""
        own = [(True, module.named_parameters(recurse=False, remove_duplicate=False)),
               (False, module.named_buffers(recurse=False, remove_duplicate=False))]
        for is_param, table in own:
            for attr, t in table:
                name = prefix + attr
                named[name] = t
                first_any.setdefault(id(t), name)
                if is_param:
                    first_param.setdefault(id(t), name)
                if first:
                    holders[id(t)].append((module, attr))
    return TensorIndex(named, holders, {**first_any, **first_param})


def resolve_target(root: nn.Module, target: str) -> Any:
    """The object a ``get_attr`` or ``call_module`` target names, from ``root`` down."""
    value: Any = root
    for part in target.split("."):
        value = getattr(value, part)
    return value


@contextlib.contextmanager
def training_mode(*models: nn.Module, training: bool = False) -> Iterator[None]:
    """Put models in train or eval mode (through their own ``train()``, which a model may
    override) and restore each submodule's own flag afterwards."""
    saved = [(m, m.training) for model in models for m in model.modules()]
    try:
        for model in models:
            model.train(training)
        yield
    finally:
        for m, flag in saved:
            if m.training != flag:  # an nn.Module attribute write is slow: only the changed
                m.training = flag


def evaluation(*models: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Eval mode for the duration, each submodule's own flag restored afterwards."""
    return training_mode(*models, training=False)


def random_inputs(like: Sequence[Any], batch: int | None = None, seed: int = 0,
                  ) -> tuple[Any, ...]:
    """Fresh standard-normal tensors shaped like ``like`` (tensors, or shapes as sequences
    of ints), the batch axis set to ``batch`` when given; non-float values kept as they are."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in like:
        if isinstance(x, torch.Tensor) and x.is_floating_point():
            shape, dtype, device = tuple(x.shape), x.dtype, x.device
        elif isinstance(x, (tuple, list, torch.Size)) and all(isinstance(s, int) for s in x):
            shape, dtype, device = tuple(x), torch.float32, torch.device("cpu")
        else:
            out.append(x)
            continue
        if batch is not None and shape:
            shape = (batch, *shape[1:])
        out.append(torch.randn(shape, generator=gen, dtype=dtype).to(device))
    return tuple(out)
