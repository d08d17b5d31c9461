"""Stage 3, score: importance of every unit of every group, on one scale across groups.

The criteria themselves are in :mod:`structprune.core.criteria`; :data:`IMPORTANCE` names
them:

- ``l1``, ``l2``: weight magnitude (:class:`~structprune.core.criteria.Magnitude`), the
  default; needs no data;
- ``taylor``, ``gradient``: first-order Taylor and mean gradient magnitude, from the gradients
  of the cross-entropy loss on calibration batches (``Taylor``, ``Gradient``); without targets,
  of a loss against the dense model's outputs (the criterion's ``notes`` say which);
- ``bn``: the scale (gamma) of the unit's normalisation layers (``NormScale``);
- ``fpgm``: distance from the other filters, FPGM's geometric median (``FPGM``);
- ``lamp``: layer-adaptive magnitude (``LAMP``);
- ``activation``: mean absolute activation where the channel is consumed (``Activation``);
- ``random``: seeded uniform scores, the control any comparison needs (``Random``);
- ``obs``: the reconstruction error a unit's removal leaves once the consumers' remaining
  weights compensate by least squares, greedy structured Optimal Brain Surgeon
  (:class:`~structprune.core.obs.OBS`).

:func:`score` then divides each group's scores by their mean (or max or sum) so that groups
compare on one scale when ranked globally. Criteria that need data are in :data:`NEEDS_DATA`;
their calibration batches take any form of :mod:`structprune.batches`, with or without
targets.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from structprune.batches import Batch, take
from structprune.core.analyse import Analysis, Group
from structprune.core.criteria import (
    FPGM,
    LAMP,
    Activation,
    Gradient,
    Importance,
    Magnitude,
    NormScale,
    Random,
    Taylor,
)
from structprune.core.obs import OBS
from structprune.errors import PlanError

IMPORTANCE: dict[str, Callable[[Analysis, list[Batch], int], Importance]] = {
    "l1": lambda analysis, batches, seed: Magnitude(analysis, 1),
    "l2": lambda analysis, batches, seed: Magnitude(analysis, 2),
    "taylor": lambda analysis, batches, seed: Taylor(analysis, batches, seed),
    "gradient": lambda analysis, batches, seed: Gradient(analysis, batches, seed),
    "bn": lambda analysis, batches, seed: NormScale(analysis),
    "fpgm": lambda analysis, batches, seed: FPGM(analysis),
    "lamp": lambda analysis, batches, seed: LAMP(analysis),
    "activation": lambda analysis, batches, seed: Activation(analysis, batches),
    "random": lambda analysis, batches, seed: Random(analysis, seed),
    "obs": lambda analysis, batches, seed: OBS(analysis, batches, seed),
}
"""Built-in criteria by name: ``factory(analysis, batches, seed) -> criterion``."""

NEEDS_DATA = ("taylor", "gradient", "activation", "obs")
"""Criteria that need calibration data (``data=...``; CLI ``--data``)."""

NORMALIZE = ("mean", "max", "sum", "none")
"""How :func:`score` scales a group's raw scores for global ranking."""

def calibration(data: Iterable[Batch], batches: int | None = None) -> list[Batch]:
    """The first ``batches`` batches of ``data`` (any form of :mod:`structprune.batches`): by
    default all of a list or tuple, or the first 8 of anything else (an iterator, a
    DataLoader). Raises :class:`PlanError` for no batches or something that is not one."""
    return take(data, batches, what="the calibration data", error=PlanError)


def make_criterion(name: str, analysis: Analysis, *, data: Iterable | None = None,
                   seed: int = 0, batches: int | None = None) -> Importance:
    """The built-in criterion ``name`` for ``analysis``; ``data`` (taken as
    :func:`calibration` takes it) only for the criteria in :data:`NEEDS_DATA`. Raises
    :class:`PlanError` for an unknown name or missing data."""
    if name not in IMPORTANCE:
        raise PlanError(f"unknown criterion {name!r}: use one of "
                        f"{', '.join(IMPORTANCE)}, or a callable (analysis, group) -> scores")
    if name in NEEDS_DATA and data is None:
        raise PlanError(f"criterion {name!r} needs calibration data: pass data=... "
                        "(CLI: --data digits|DIR|file.py:FACTORY)")
    taken = calibration(data, batches) if name in NEEDS_DATA else []
    return IMPORTANCE[name](analysis, taken, seed)


def criterion_report(criterion: Importance, name: str | None = None) -> dict[str, Any]:
    """What a report says about the criterion that scored: its ``name`` (default: the
    callable's own), the groups it scored by ``l2`` instead (``fallbacks``) and its
    ``notes`` (a gradient criterion's ``label_free`` and ``loss``, the consumers ``obs``
    measured or skipped, ...)."""
    name = name or getattr(criterion, "__name__", type(criterion).__name__)
    report: dict[str, Any] = {"name": name}
    if getattr(criterion, "fallbacks", None):
        report["fallbacks"] = sorted(int(g) for g in criterion.fallbacks)
    report.update(getattr(criterion, "notes", None) or {})
    return report


def normalise(s: np.ndarray, how: str = "mean") -> np.ndarray:
    """``s`` divided by its mean, max or sum (unchanged for ``none``, or when that is not
    positive)."""
    if how == "none" or not s.size:
        return s
    scale = {"mean": np.mean, "max": np.max, "sum": np.sum}[how](s)
    return s / scale if scale > 0 else s


_BATCHED = (Magnitude, LAMP, OBS)


def score(analysis: Analysis, criterion: str | Importance = "l2",
          groups: list[Group] | None = None, *, data: Iterable | None = None,
          normalize: str = "mean", seed: int = 0, batches: int | None = None,
          ) -> dict[int, np.ndarray]:
    """Normalised importance per unit, for each group (by group index).

    ``criterion`` names a built-in criterion (:data:`IMPORTANCE`) or is a callable
    ``(analysis, group) -> one score per unit``, e.g. one :func:`make_criterion` made (whose
    ``fallbacks`` then says which groups were scored by ``l2`` instead). ``data`` is an
    iterable of batches (:mod:`structprune.batches`) for the criteria in :data:`NEEDS_DATA`,
    of which the first ``batches`` are used (default: all of a list, 8 of anything else);
    ``seed`` seeds ``random`` (and the projections and rows drawn by the data-driven ones). ``normalize`` (:data:`NORMALIZE`) divides each group's scores
    by their ``mean`` (the default), ``max`` or ``sum``, or leaves them (``none``).
    """
    if normalize not in NORMALIZE:
        raise PlanError(f"unknown normalization {normalize!r}: use one of {', '.join(NORMALIZE)}")
    groups = analysis.groups if groups is None else groups
    measure = make_criterion(criterion, analysis, data=data, seed=seed, batches=batches) \
        if isinstance(criterion, str) else criterion
    # the built-in criteria score all groups at once; anything else (a subclass that
    # overrides how one group is measured, a plain callable) one group at a time
    raw = measure.scores(groups) if type(measure) in _BATCHED else \
        {group.index: measure(analysis, group) for group in groups}
    return {index: normalise(np.asarray(s, dtype=np.float64), normalize)
            for index, s in raw.items()}


__all__ = ["IMPORTANCE", "NEEDS_DATA", "NORMALIZE", "Importance", "calibration",
           "criterion_report", "make_criterion", "normalise", "score"]
