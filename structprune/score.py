"""Stage 3, score: importance of every unit of every group.

A unit's importance is the mean, over the group's parameter members, of the norm of the
slices it owns (L1 or L2; buffers such as BN statistics do not count). Scores are divided
by the group's mean so that groups compare on one scale when ranked globally.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from .analyse import Analysis, Group

Importance = Callable[[Analysis, Group], np.ndarray]


def _slice_norms(tensor: torch.Tensor, dim: int, p: int, rows: int = 64) -> np.ndarray:
    """Norm of every slice ``tensor.select(dim, i)``.

    Viewed as [before, size, after]; leading rows are reduced in cache-sized chunks, since a
    strided reduction over the leading axis of a large weight is ten times slower.
    """
    with torch.no_grad():
        t = tensor.detach().float()
        size = t.shape[dim]
        before = int(np.prod(t.shape[:dim], dtype=np.int64))
        if before == 1:
            return torch.linalg.vector_norm(t.reshape(size, -1), ord=p, dim=1).double().numpy()
        t = t.reshape(before, size, -1)
        acc = torch.zeros(size)
        for start in range(0, before, rows):
            chunk = t[start:start + rows]
            acc += (chunk.abs() if p == 1 else chunk * chunk).sum(dim=(0, 2))
        norms = acc if p == 1 else acc.sqrt()
    return norms.double().numpy()


def magnitude(analysis: Analysis, group: Group, p: int = 2) -> np.ndarray:
    """Per-unit L1 (``p=1``) or L2 (``p=2``) magnitude, averaged over the group's members."""
    params = dict(analysis.capture.graph_module.named_parameters())
    position = np.full(int(analysis.component.max()) + 1, -1, np.int64)
    position[group.units] = np.arange(group.size)
    total = np.zeros(group.size)
    counted = 0
    for name, dim in group.members:
        tensor = params.get(name)
        if tensor is None:
            continue
        ids = analysis.slots[(name, dim)]
        where = position[analysis.component[ids]]
        inside = where >= 0
        np.add.at(total, where[inside], _slice_norms(tensor, dim, p)[inside])
        counted += 1
    return total / max(counted, 1)


def l1(analysis: Analysis, group: Group) -> np.ndarray:
    return magnitude(analysis, group, 1)


def l2(analysis: Analysis, group: Group) -> np.ndarray:
    return magnitude(analysis, group, 2)


IMPORTANCE: dict[str, Importance] = {"l1": l1, "l2": l2}


def score(analysis: Analysis, importance: str | Importance = "l2",
          groups: list[Group] | None = None) -> dict[int, np.ndarray]:
    """Normalised importance per unit, for each group (by group index)."""
    fn = IMPORTANCE[importance] if isinstance(importance, str) else importance
    scores = {}
    for group in analysis.groups if groups is None else groups:
        s = np.asarray(fn(analysis, group), dtype=np.float64)
        mean = s.mean() if s.size else 0.0
        scores[group.index] = s / mean if mean > 0 else s
    return scores
