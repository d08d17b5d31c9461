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


def _slice_norms(tensor: torch.Tensor, dim: int, p: int) -> np.ndarray:
    """Norm of every slice ``tensor.select(dim, i)``, reduced in place (no transposed copy)."""
    others = [d for d in range(tensor.ndim) if d != dim]
    with torch.no_grad():
        t = tensor.detach()
        norms = torch.linalg.vector_norm(t, ord=p, dim=others) if others else t.abs()
    return norms.float().cpu().numpy().astype(np.float64)


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
