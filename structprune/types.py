"""The types rules and stages share: what a node produced, and the analysis' view of a tensor.

A leaf module: it imports nothing of structprune, so every stage and every rule can use it.

- :class:`TensorSpec`: shape and dtype of a tensor a node produced in capture.
- :class:`ChannelMap` and :class:`TensorInfo`: which channel *atom* each index of a tensor's
  channel axes belongs to (see :mod:`structprune.core.analyse`).
- :class:`RuleContext`: what a rule may ask of the analysis engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

# ``node.meta`` key of a node whose literals do not follow channel counts (the reason): the
# analysis keeps whole every channel axis such a node reads (see structprune.core.literals)
PINNED = "structprune_pinned"


@dataclass(frozen=True)
class TensorSpec:
    """Shape and dtype of a tensor a node produced."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def to_spec(value: Any) -> Any:
    """``value`` with every tensor replaced by its :class:`TensorSpec` (sizes as tuples)."""
    def leaf(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            return TensorSpec(tuple(v.shape), v.dtype)
        if isinstance(v, torch.Size):
            return tuple(v)
        return v
    return fx.node.map_aggregate(value, leaf)


@dataclass(frozen=True, eq=False)
class ChannelMap:
    """Which atom each index of the dims ``dims`` of a tensor belongs to."""

    dims: tuple[int, ...]
    ids: np.ndarray  # shape == tuple(tensor.shape[d] for d in dims)


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """The analysis' view of a tensor: its shape and its channel maps."""

    shape: tuple[int, ...]
    maps: tuple[ChannelMap, ...] = ()
    param: str | None = None  # set when the tensor is a parameter or buffer itself

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def map_on(self, dim: int) -> ChannelMap | None:
        dim = dim % self.ndim if self.ndim else dim
        for m in self.maps:
            if dim in m.dims:
                return m
        return None


def spec_to_info(spec: Any) -> Any:
    """A captured value with every :class:`TensorSpec` turned into a map-less TensorInfo."""
    return fx.node.map_aggregate(
        spec, lambda v: TensorInfo(v.shape) if isinstance(v, TensorSpec) else v)


def tensor_infos(value: Any) -> list[TensorInfo]:
    """All TensorInfos inside a (nested) argument value."""
    found: list[TensorInfo] = []
    fx.node.map_aggregate(value, lambda v: found.append(v) if isinstance(v, TensorInfo) else v)
    return found


Atoms = TensorInfo | ChannelMap | np.ndarray | Iterable | None


class RuleContext(Protocol):
    """What a rule sees of the analysis engine: the node, its module, and atom operations.

    ``unify(a, b)``: removing atom ``a`` requires removing ``b``. ``consume``: the op's
    result with those channels deleted equals its result with them zeroed at its input.
    ``approx``: removing them changes the result. ``block``: they must stay.
    """

    node: fx.Node
    module: nn.Module | None

    @property
    def output(self) -> Any: ...  # what the node produced in capture (TensorSpecs)

    @property
    def out_shape(self) -> tuple[int, ...]: ...

    def result(self, maps: Iterable[ChannelMap] = (), spec: Any = None) -> TensorInfo: ...

    def fresh(self, shape: tuple[int, ...]) -> np.ndarray: ...

    def unify(self, a: np.ndarray, b: np.ndarray) -> None: ...

    def unify_along(self, ids: np.ndarray, axes: Iterable[int]) -> np.ndarray: ...

    def block(self, what: Atoms, reason: str) -> None: ...

    def approx(self, what: Atoms, reason: str) -> None: ...

    def kernel_taps(self, what: Atoms) -> None: ...

    def consume(self, arg: int | str, info: TensorInfo, cmap: ChannelMap | None) -> None: ...

    def sized_attribute(self, attr: str, ids: np.ndarray | None) -> None: ...

    def param(self, name: str) -> TensorInfo: ...

    def module_param(self, attr: str, same_as: dict[int, np.ndarray] | None = None,
                     ) -> TensorInfo | None: ...

    def owner(self, info: Any) -> nn.Module | None: ...

    def maintained_sizes(self, sizes: Any) -> str | None: ...

    def info_of(self, node: fx.Node) -> Any: ...

    def is_literal(self, position: int | str) -> bool: ...

    def raw_arg(self, position: int | str, default: Any = None) -> Any: ...
