"""Stage 3, score: importance of every unit of every group.

A unit's importance is the mean, over the group's parameter members, of the norm of the
slices it owns (L1 or L2; buffers such as BN statistics do not count). Scores are divided
by the group's mean so that groups compare on one scale when ranked globally.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch

from .analyse import Analysis, Group
from .capture import graph_parameters

Importance = Callable[[Analysis, Group], np.ndarray]


_TORCH_ROWS_FROM = 1 << 16  # elements: from here torch's threaded row norms beat numpy's


def _slice_norms(tensor: torch.Tensor, dim: int, p: int) -> np.ndarray:
    """Norm of every slice ``tensor.select(dim, i)``.

    L2 on the CPU (the default) reduces both layouts along contiguous memory, with no
    temporary the size of the tensor: a strided reduction over the leading axis of a large
    weight, or a squared copy of it, costs five to ten times more. A tensor with one value per
    slice (a norm's weight) is its absolute value. Other norms and devices reduce the view in
    place, strided but without a copy. The pass makes a few hundred of these calls, so small
    tensors stay in numpy, whose calls cost a tenth of torch's.
    """
    t = tensor.detach()
    if t.dtype != torch.float32 or t.device.type != "cpu":
        t = t.float()
    size = t.shape[dim]
    if t.numel() == size:
        return np.abs(t.cpu().numpy().reshape(size)).astype(np.float64)
    if t.device.type != "cpu" or p != 2:
        view = t.reshape(math.prod(t.shape[:dim]), size, -1)
        return torch.linalg.vector_norm(view, ord=p, dim=(0, 2)).double().cpu().numpy()
    if dim == 0:
        if t.numel() >= _TORCH_ROWS_FROM:
            return torch.linalg.vector_norm(t.reshape(size, -1), dim=1).numpy().astype(np.float64)
        rows = t.contiguous().numpy().reshape(size, -1)
        sums = np.einsum("ij,ij->i", rows, rows)
    else:
        columns = t.contiguous().numpy().reshape(math.prod(t.shape[:dim]), -1)
        sums = np.einsum("ij,ij->j", columns, columns).reshape(size, -1).sum(axis=1)
    return np.sqrt(sums.astype(np.float64))


class _Norms:
    """Slice norms per (parameter, axis, p), computed once per scoring pass."""

    def __init__(self, analysis: Analysis):
        self.params = graph_parameters(analysis.capture)
        self.cache: dict[tuple[str, int, int], np.ndarray] = {}
        self.components = int(analysis.component.max()) + 1 if analysis.component.size else 0
        self._vectors: dict[str, np.ndarray] | None = None

    def get(self, name: str, dim: int, p: int) -> np.ndarray | None:
        key = (name, dim, p)
        if key not in self.cache:
            tensor = self.params.get(name)
            if tensor is None:
                self.cache[key] = None
            elif tensor.ndim == 1:  # one value per slice: its absolute value, for any p
                self.cache[key] = self.vectors().get(name)
                if self.cache[key] is None:
                    self.cache[key] = _slice_norms(tensor, dim, p)
            else:
                self.cache[key] = _slice_norms(tensor, dim, p)
        return self.cache[key]

    def vectors(self) -> dict[str, np.ndarray]:
        """Absolute values of every 1-D float32 CPU parameter (norm weights and biases),
        in one pass over all of them: a hundred small calls cost more than their data."""
        if self._vectors is None:
            names = [n for n, t in self.params.items() if t.ndim == 1
                     and t.dtype == torch.float32 and t.device.type == "cpu"]
            self._vectors = {}
            if names:
                flat = torch.cat([self.params[n].detach() for n in names]).numpy()
                values = np.abs(flat).astype(np.float64)
                start = 0
                for n in names:
                    size = self.params[n].shape[0]
                    self._vectors[n] = values[start:start + size]
                    start += size
        return self._vectors


def magnitudes(analysis: Analysis, groups: list[Group], p: int = 2,
               norms: _Norms | None = None) -> dict[int, np.ndarray]:
    """Per-unit L1 (``p=1``) or L2 (``p=2``) magnitude of each group, averaged over the
    group's members; every slot of every member adds to its unit in one bincount."""
    norms = norms or _Norms(analysis)
    unit_of = np.full(norms.components, -1, np.int64)  # component -> unit, all groups
    starts, counted, slots, values = [], [], [], []
    listed: set[tuple[str, int]] = set()
    start = 0
    for group in groups:
        unit_of[group.units] = np.arange(start, start + group.size)
        starts.append(start)
        start += group.size
        counted.append(0)
        for member in group.members:
            norm = norms.get(*member, p)
            if norm is None:
                continue
            counted[-1] += 1
            if member not in listed:  # a member of several groups adds each slot once
                listed.add(member)
                slots.append(analysis.slots[member])
                values.append(norm)
    total = np.zeros(start)
    if slots:
        where = unit_of[analysis.component[np.concatenate(slots)]]
        inside = where >= 0
        total = np.bincount(where[inside], np.concatenate(values)[inside], minlength=start)
    return {group.index: total[s:s + group.size] / max(c, 1)
            for group, s, c in zip(groups, starts, counted, strict=True)}


def magnitude(analysis: Analysis, group: Group, p: int = 2, norms: _Norms | None = None,
              ) -> np.ndarray:
    """Per-unit L1 (``p=1``) or L2 (``p=2``) magnitude, averaged over the group's members."""
    return magnitudes(analysis, [group], p, norms)[group.index]


def l1(analysis: Analysis, group: Group, norms: _Norms | None = None) -> np.ndarray:
    return magnitude(analysis, group, 1, norms)


def l2(analysis: Analysis, group: Group, norms: _Norms | None = None) -> np.ndarray:
    return magnitude(analysis, group, 2, norms)


IMPORTANCE: dict[str, Importance] = {"l1": l1, "l2": l2}
_BATCHED = {l1: 1, l2: 2}  # the built-in importances score all groups in one pass


def score(analysis: Analysis, importance: str | Importance = "l2",
          groups: list[Group] | None = None) -> dict[int, np.ndarray]:
    """Normalised importance per unit, for each group (by group index)."""
    groups = analysis.groups if groups is None else groups
    norms = _Norms(analysis)  # a tensor feeds several groups: its norms are computed once
    if not isinstance(importance, str):
        raw = {group.index: importance(analysis, group) for group in groups}
    elif IMPORTANCE[importance] in _BATCHED:
        raw = magnitudes(analysis, groups, _BATCHED[IMPORTANCE[importance]], norms)
    else:
        raw = {group.index: IMPORTANCE[importance](analysis, group, norms) for group in groups}
    scores = {}
    for group in groups:
        s = np.asarray(raw[group.index], dtype=np.float64)
        mean = s.mean() if s.size else 0.0
        scores[group.index] = s / mean if mean > 0 else s
    return scores
