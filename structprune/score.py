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
        n_comp = int(analysis.component.max()) + 1 if analysis.component.size else 0
        self.position = np.full(n_comp, -1, np.int64)

    def get(self, name: str, dim: int, p: int) -> np.ndarray | None:
        key = (name, dim, p)
        if key not in self.cache:
            tensor = self.params.get(name)
            if tensor is None:
                self.cache[key] = None
            else:
                self.cache[key] = _slice_norms(tensor, dim, p)
        return self.cache[key]


def magnitude(analysis: Analysis, group: Group, p: int = 2, norms: _Norms | None = None,
              ) -> np.ndarray:
    """Per-unit L1 (``p=1``) or L2 (``p=2``) magnitude, averaged over the group's members."""
    norms = norms or _Norms(analysis)
    position = norms.position
    position[group.units] = np.arange(group.size)
    total = np.zeros(group.size)
    counted = 0
    for name, dim in group.members:
        values = norms.get(name, dim, p)
        if values is None:
            continue
        where = position[analysis.component[analysis.slots[(name, dim)]]]
        inside = where >= 0
        total += np.bincount(where[inside], values[inside], minlength=group.size)
        counted += 1
    position[group.units] = -1
    return total / max(counted, 1)


def l1(analysis: Analysis, group: Group, norms: _Norms | None = None) -> np.ndarray:
    return magnitude(analysis, group, 1, norms)


def l2(analysis: Analysis, group: Group, norms: _Norms | None = None) -> np.ndarray:
    return magnitude(analysis, group, 2, norms)


IMPORTANCE: dict[str, Importance] = {"l1": l1, "l2": l2}


def score(analysis: Analysis, importance: str | Importance = "l2",
          groups: list[Group] | None = None) -> dict[int, np.ndarray]:
    """Normalised importance per unit, for each group (by group index)."""
    builtin = isinstance(importance, str)
    fn = IMPORTANCE[importance] if builtin else importance
    norms = _Norms(analysis)  # a tensor feeds several groups: its norms are computed once
    scores = {}
    for group in analysis.groups if groups is None else groups:
        s = fn(analysis, group, norms) if builtin else fn(analysis, group)
        s = np.asarray(s, dtype=np.float64)
        mean = s.mean() if s.size else 0.0
        scores[group.index] = s / mean if mean > 0 else s
    return scores
