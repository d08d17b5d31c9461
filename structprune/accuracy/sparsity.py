"""Sparsity training: regularisers that make channels removable before they are removed.

Both regularisers are plain callables, built once from an
:class:`~structprune.core.analyse.Analysis` and then called on the model every step::

    reg = GroupLasso(analysis, strength=1e-4)
    loss = task_loss + reg(model)              # a loop of one's own, or
    train.fit(model, batches, epochs, regularizer=reg)

They penalise the *units* the analysis found, so a residual stream or a concatenation is
regularised as ONE unit, with every parameter slice that loses it (each branch's conv and
norm, every consumer's input columns) together, which no per-layer penalty does. Only the
units of prunable groups count: blocked units (a model output, a hard-coded size, ...) cannot
be removed and are left alone; approximate ones are regularised.

A regulariser keeps parameter *names* and index tensors only, never the parameters: each call
reads the current ones from the model it is given (``model.named_parameters()``), so it stays
valid after ``load_state_dict``, ``.to(device)``, on a deep copy or inside a training loop
that replaces tensors. It raises :class:`~structprune.errors.StructPruneError` when a name is
missing or a dimension no longer has the size the analysis saw (the model was pruned since).

- :class:`BNL1`: network slimming (Liu et al. 2017), ``strength * sum |gamma|`` over the
  normalisation weights of the prunable units;
- :class:`GroupLasso`: the L2,1 norm over units,
  ``strength * sum_u w_u * ||concat of every slice of u||_2``.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn as nn

from structprune.batches import device_of
from structprune.core.analyse import Analysis
from structprune.core.criteria import is_norm_weight
from structprune.errors import StructPruneError

# (param name, dim, slot indices along dim, unit index of each of those slots)
Entry = tuple[str, int, torch.Tensor, torch.Tensor]


class _UnitRegularizer:
    """Base: the units of the analysis's prunable groups, numbered 0..n-1 in group order
    (``unit_group[i]``, ``unit_component[i]``), and one :data:`Entry` per sliced parameter
    axis holding the slots that belong to those units."""

    def __init__(self, analysis: Analysis, strength: float):
        strength = float(strength)
        if not strength >= 0:
            raise StructPruneError(f"regularisation strength {strength} must be >= 0")
        self.strength = strength
        n_comp = int(analysis.component.max()) + 1 if analysis.component.size else 0
        unit_of = np.full(n_comp, -1, np.int64)  # component -> regularised unit, or -1
        groups: list[int] = []
        components: list[int] = []
        keys: dict[tuple[str, int], None] = {}  # members of the prunable groups, in order
        for group in analysis.groups:
            free = group.units[~group.blocked]
            if not free.size:
                continue
            unit_of[free] = np.arange(len(components), len(components) + free.size)
            components.extend(free.tolist())
            groups.extend([group.index] * free.size)
            keys.update(dict.fromkeys(group.members))
        self.unit_group = np.asarray(groups, np.int64)
        self.unit_component = np.asarray(components, np.int64)
        self.sizes = dict(analysis.sizes)
        model = analysis.capture.model
        params = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        # a (param, dim) in several groups (the input columns after a concat) appears once:
        # its slots are split among the groups' units by their components
        self.entries: list[Entry] = []
        for name, dim in keys:
            if name not in params or not self.keep(model, name):
                continue
            units = unit_of[analysis.component[analysis.slots[(name, dim)]]]
            slots = np.flatnonzero(units >= 0)
            if slots.size:
                self.entries.append((name, dim, torch.from_numpy(slots),
                                     torch.from_numpy(units[slots])))
        self._on_device: dict[torch.device, list[Entry]] = {}

    def keep(self, model: nn.Module, name: str) -> bool:
        """Whether the parameter ``name`` of a prunable group's member enters the penalty."""
        return True

    @property
    def num_units(self) -> int:
        return len(self.unit_component)

    @property
    def parameter_names(self) -> list[str]:
        """The parameters the penalty reads, in order of first use."""
        return list(dict.fromkeys(name for name, *_ in self.entries))

    def _entries(self, device: torch.device) -> list[Entry]:
        cached = self._on_device.get(device)
        if cached is None:
            cached = [(name, dim, slots.to(device), units.to(device))
                      for name, dim, slots, units in self.entries]
            self._on_device[device] = cached
        return cached

    def _params(self, model: nn.Module) -> dict[str, torch.Tensor]:
        params = dict(model.named_parameters(remove_duplicate=False))
        for name, dim, *_ in self.entries:
            p = params.get(name)
            if p is None:
                raise StructPruneError(f"the model has no parameter {name!r}: a regulariser "
                                       "works on the model its analysis was made from")
            if p.ndim <= dim or p.shape[dim] != self.sizes[name][dim]:
                raise StructPruneError(
                    f"{name} has shape {tuple(p.shape)}, the analysis saw "
                    f"{self.sizes[name]}: build the regulariser again after pruning")
        return params

    def _reduce(self, p: torch.Tensor, dim: int, square: bool) -> torch.Tensor:
        """One value a slot along ``dim``: the sum of ``p**2`` (``square``) or ``|p|``."""
        v = p.pow(2) if square else p.abs()
        other = [d for d in range(p.ndim) if d != dim]
        return v.sum(dim=other) if other else v

    def __call__(self, model: nn.Module) -> torch.Tensor:
        return self.reg(model)

    def reg(self, model: nn.Module) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(strength={self.strength}, units={self.num_units}, "
                f"parameters={len(self.parameter_names)})")


class BNL1(_UnitRegularizer):
    """Network slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through
    Network Slimming"): the L1 norm of the normalisation scales of the prunable units,

        reg(model) = strength * sum_{(m, d)} sum_{s in slots_{m,d}(U)} sum |gamma_m[s]|

    over every normalisation weight m (BatchNorm, GroupNorm, LayerNorm, InstanceNorm, RMSNorm
    modules' ``weight``) that is a member of a prunable group, and U the group's non-blocked
    units: a channel that reaches a model output keeps its scale unpenalised. The gradient is
    ``strength * sign(gamma)`` on those entries and zero elsewhere. (For a 1-D norm weight
    ``sum |gamma_m[s]|`` is ``|gamma_m[s]|``; a multi-axis weight counts once per member axis.)
    """

    def keep(self, model: nn.Module, name: str) -> bool:
        return is_norm_weight(model, name)

    def reg(self, model: nn.Module) -> torch.Tensor:
        params = self._params(model)
        device = _penalty_device(model, self.entries)
        total = torch.zeros((), device=device)
        for name, dim, slots, _ in self._entries(device):
            per_slot = self._reduce(params[name], dim, square=False).to(device)
            total = total + per_slot.index_select(0, slots).sum()
        return total * self.strength


class GroupLasso(_UnitRegularizer):
    """Group lasso (the L2,1 norm) over the units of the prunable groups (Wen et al. 2016,
    "Learning Structured Sparsity in Deep Neural Networks", lifted to coupled units):

        n_u        = ||concat_{(m, d) in M_g} concat_{s in slots_{m,d}(u)} W_m.select(d, s)||_2
        reg(model) = strength * sum_{g prunable} sum_{u in g, not blocked} w_u * n_u

    with M_g every *parameter* member of u's group g (conv filters and biases, norm weights
    and biases, the input columns of every consumer; buffers such as running statistics do
    not count). An element in two slices of a unit (a conv whose input and output carry the
    same stream) counts once per slice, as in the concatenation.

    ``w_u = 1`` by default (``scaled=False``): the plain L2,1 norm, so ``strength`` means the
    same push on every unit whatever its width. With ``scaled=True``, ``w_u = sqrt(N_u)``,
    N_u the number of elements of u's concatenated slices (Yuan & Lin 2006's group-size
    weighting): wide units (a channel feeding a large linear layer) are pushed harder.

    At a unit whose slices are all exactly zero the norm's subgradient 0 is used (no NaN).
    :meth:`unit_norms` returns the n_u themselves (differentiable), for monitoring.
    """

    def __init__(self, analysis: Analysis, strength: float, scaled: bool = False):
        super().__init__(analysis, strength)
        self.scaled = bool(scaled)
        counts = np.zeros(self.num_units)
        for name, dim, _, units in self.entries:
            shape = self.sizes[name]
            np.add.at(counts, units.numpy(), int(np.prod(shape)) // shape[dim])
        self.unit_elements = counts.astype(np.int64)  # N_u
        self.weights = torch.from_numpy(np.sqrt(counts) if self.scaled else np.ones_like(counts))

    def unit_norms(self, model: nn.Module) -> torch.Tensor:
        """n_u for every regularised unit, in the order of ``unit_group``/``unit_component``."""
        params = self._params(model)
        device = _penalty_device(model, self.entries)
        entries = self._entries(device)
        dtype = _accumulate_dtype(params[name] for name, *_ in entries)
        squares = torch.zeros(self.num_units, dtype=dtype, device=device)
        for name, dim, slots, units in entries:
            per_slot = self._reduce(params[name].to(dtype), dim, square=True).to(device)
            squares = squares.index_add(0, units, per_slot.index_select(0, slots))
        positive = squares > 0  # sqrt'(0) is inf: zero units take the subgradient 0
        root = torch.where(positive, squares, torch.ones_like(squares)).sqrt()
        return torch.where(positive, root, torch.zeros_like(root))

    def group_norms(self, model: nn.Module) -> dict[int, torch.Tensor]:
        """:meth:`unit_norms` split by group index, each in its group's ``units`` order
        (blocked units left out)."""
        norms = self.unit_norms(model)
        return {int(g): norms[torch.from_numpy(np.flatnonzero(self.unit_group == g))
                              .to(norms.device)]
                for g in dict.fromkeys(self.unit_group.tolist())}

    def reg(self, model: nn.Module) -> torch.Tensor:
        norms = self.unit_norms(model)
        return (norms * self.weights.to(norms)).sum() * self.strength


def _penalty_device(model: nn.Module, entries: list[Entry]) -> torch.device:
    """Where the penalty is computed: the device of the first parameter it reads."""
    if entries:
        name = entries[0][0]
        for n, p in model.named_parameters(remove_duplicate=False):
            if n == name:
                return p.device
    return device_of(model) or torch.device("cpu")


def _accumulate_dtype(tensors: Iterable[torch.Tensor]) -> torch.dtype:
    """float32, or float64 when any parameter is: half-precision squares would overflow."""
    dtype = torch.float32
    for t in tensors:
        if t.is_floating_point():
            dtype = torch.promote_types(dtype, t.dtype)
    return dtype


__all__ = ["BNL1", "GroupLasso"]
