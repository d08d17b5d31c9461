"""Per-group widths chosen by importance against measured latency saved.

Each group may keep one of a few candidate widths: multiples of the target's channel step
that the latency table says are fast (a width stays a candidate only if it is predicted
faster than every wider one; the rest cost time for nothing). From the dense model, a greedy
search repeatedly takes the move, one group narrowed by one to ``lookahead`` candidate
steps, that loses the least importance per millisecond saved, so that a step which saves
nothing on its own (an odd width off the fast kernels) is taken only together with the step
after it. Once the predicted latency meets the goal, widths are given back where the goal
still holds, most importance per millisecond first (a knapsack repair).

The search sees latency only through an :class:`Evaluator`; :class:`ModelEvaluator` is the
one over a :class:`structprune.deploy.latency.LatencyModel`, and tests use a fake table.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from structprune.core.selection import removed_units
from structprune.deploy.latency import LatencyModel

Keep = dict[int, int]  # group index -> units kept


@dataclass
class Choice:
    """What one group may keep: ``keeps`` in descending order (``keeps[0]`` where the
    search starts) and ``lost[i]``, the importance removed when keeping ``keeps[i]``."""

    group: int
    keeps: list[int]
    lost: list[float]

    def index(self, keep: int) -> int:
        return self.keeps.index(keep)


class Evaluator(Protocol):
    def total(self, keep: Keep) -> float:
        """Predicted milliseconds at ``keep``."""

    def delta(self, keep: Keep, group: int, new: int) -> float:
        """Change in predicted milliseconds when ``group`` alone goes to ``new`` units."""

    def prepare(self, keep: Keep, moves: Sequence[tuple[int, int]]) -> None:
        """Called before ``delta`` is asked about ``moves``: measure what they need."""


@dataclass
class Point:
    keep: Keep
    ms: float
    lost: float


@dataclass
class WidthPath:
    """The greedy trajectory from the starting widths: one :class:`Point` per move, extended
    on demand (``until``) and shared by every goal asked of it."""

    choices: Sequence[Choice]
    evaluator: Evaluator
    lookahead: int = 3
    start: Keep | None = None
    points: list[Point] = field(default_factory=list)
    done: bool = False

    def __post_init__(self) -> None:
        self._choice = {c.group: c for c in self.choices}
        keep = dict(self.start) if self.start else {c.group: c.keeps[0] for c in self.choices}
        lost = sum(c.lost[c.index(keep[c.group])] for c in self.choices)
        self.points.append(Point(keep, self.evaluator.total(keep), lost))

    def _moves(self, keep: Keep) -> list[tuple[int, int, float]]:
        """(group, new keep, importance lost on top) for every move within the lookahead."""
        moves = []
        for c in self.choices:
            i = c.index(keep[c.group])
            for j in range(i + 1, min(i + 1 + self.lookahead, len(c.keeps))):
                moves.append((c.group, c.keeps[j], c.lost[j] - c.lost[i]))
        return moves

    def step(self) -> bool:
        """Take the best move; False when no move saves time."""
        last = self.points[-1]
        moves = self._moves(last.keep)
        self.evaluator.prepare(last.keep, [(g, k) for g, k, _ in moves])
        best, best_value = None, 0.0
        for g, k, lost in moves:
            saved = -self.evaluator.delta(last.keep, g, k)
            if saved <= 1e-12:
                continue
            value = saved / max(lost, 1e-12)  # ms saved per importance lost
            if best is None or value > best_value * (1 + 1e-9):
                best, best_value = (g, k, lost, saved), value
        if best is None:
            self.done = True
            return False
        g, k, lost, saved = best
        self.points.append(Point({**last.keep, g: k}, last.ms - saved, last.lost + lost))
        return True

    def until(self, goal_ms: float) -> Point | None:
        """The first point predicted at or under ``goal_ms`` (None if the path ends above).
        The last move is the one of least importance that reaches the goal from the point
        before, which need not be the path's own next move (the knapsack's last item)."""
        i = 0
        while True:
            if i == len(self.points) and (self.done or not self.step()):
                return None
            if self.points[i].ms <= goal_ms:
                return self.points[i]
            finish = self._finish(self.points[i], goal_ms)
            if finish is not None:
                return finish
            i += 1

    def _finish(self, point: Point, goal_ms: float) -> Point | None:
        """The single move from ``point`` that meets ``goal_ms`` losing least, if any."""
        moves = self._moves(point.keep)
        self.evaluator.prepare(point.keep, [(g, k) for g, k, _ in moves])
        best = None
        for g, k, lost in moves:
            ms = point.ms + self.evaluator.delta(point.keep, g, k)
            if ms <= goal_ms and (best is None or lost < best[2]):
                best = (g, k, lost, ms)
        if best is None:
            return None
        g, k, lost, ms = best
        return Point({**point.keep, g: k}, ms, point.lost + lost)

    def fastest(self) -> Point:
        while not self.done and self.step():
            pass
        return min(self.points, key=lambda p: p.ms)

    def give_back(self, point: Point, goal_ms: float) -> Point:
        """Widen groups again while the prediction stays at or under ``goal_ms``: each time
        the one step that restores the most importance per millisecond it costs."""
        keep, ms, lost = dict(point.keep), point.ms, point.lost
        while True:
            moves = []
            for c in self.choices:
                i = c.index(keep[c.group])
                if i > 0 and (self.start is None or c.keeps[i - 1] <= self.start[c.group]):
                    moves.append((c.group, c.keeps[i - 1], c.lost[i] - c.lost[i - 1]))
            self.evaluator.prepare(keep, [(g, k) for g, k, _ in moves])
            best, best_value = None, -1.0
            for g, k, restored in moves:
                added = self.evaluator.delta(keep, g, k)
                if ms + added > goal_ms or restored <= 0:
                    continue
                value = restored / max(added, 1e-12)
                if value > best_value:
                    best, best_value = (g, k, restored, added), value
            if best is None:
                return Point(keep, ms, lost)
            g, k, restored, added = best
            keep[g], ms, lost = k, ms + added, lost - restored


def search(path: WidthPath, goal_ms: float) -> Point | None:
    """The widths losing little importance whose predicted latency meets ``goal_ms``, or
    None when even the narrowest widths the path reaches are predicted slower."""
    point = path.until(goal_ms)
    return None if point is None else path.give_back(point, goal_ms)


def grid(size: int, width: int, fewest: int, step: int, most: int = 16) -> list[int]:
    """Candidate kept units of a group of ``size`` units of ``width`` channels each: the dense
    size, then multiples of ``step`` channels (coarsened to at most ``most`` candidates)
    down to ``fewest`` units, descending."""
    units = max(1, step // math.gcd(step, width))
    while (size - fewest) / units > most:
        units *= 2
    keeps = [size] + [k for k in range(size // units * units, fewest - 1, -units)
                      if 0 < k < size]
    return keeps


def fast_keeps(keeps: Sequence[int], ms_at: Mapping[int, float], margin: float) -> list[int]:
    """The candidates predicted faster (by more than ``margin`` ms) than every wider one;
    ``ms_at[k]`` is the predicted time at ``k`` units kept. The first is always kept."""
    chosen = [keeps[0]]
    best = ms_at[keeps[0]]
    for k in keeps[1:]:
        if ms_at[k] < best - margin:
            chosen.append(k)
            best = ms_at[k]
    return chosen


def snap(keep: int, fast: Sequence[int], down: bool = False) -> int:
    """The fast candidate nearest ``keep`` (ties to the wider), or with ``down`` the widest
    one not above it (else the narrowest)."""
    if down:
        below = [k for k in fast if k <= keep]
        return max(below) if below else min(fast)
    return min(fast, key=lambda k: (abs(k - keep), -k))


class ModelEvaluator:
    """An :class:`Evaluator` over a model's :class:`LatencyModel`: each group removes its
    units in the order ``ranked[g]`` (local indices, first to go first)."""

    def __init__(self, model: LatencyModel, ranked: Mapping[int, np.ndarray]):
        self.model = model
        self.units = {g.index: g.units for g in model.analysis.groups}
        self.ranked = ranked
        self._state: tuple | None = None
        self._removed = np.zeros(model.analysis.n_components, bool)
        self._kept = model.kept(self._removed)

    def removed(self, keep: Keep) -> np.ndarray:
        return removed_units(self.model.analysis, keep, self.ranked)

    def at(self, keep: Keep) -> tuple[np.ndarray, np.ndarray]:
        state = tuple(sorted(keep.items()))
        if state != self._state:
            self._state = state
            self._removed = self.removed(keep)
            self._kept = self.model.kept(self._removed)
        return self._removed, self._kept

    def _moved(self, keep: Keep, group: int, new: int) -> np.ndarray:
        removed, _ = self.at(keep)
        moved = removed.copy()
        units, order = self.units[group], self.ranked[group]
        moved[units] = False
        moved[units[order[:len(units) - new]]] = True
        return self.model.kept(moved)

    def total(self, keep: Keep) -> float:
        return self.model.predict(self.at(keep)[0])

    def _layers(self, keep: Keep, group: int, new: int) -> tuple[list, list]:
        which = self.model.layers_of_group.get(group, [])
        _, kept = self.at(keep)
        return (self.model.shapes(kept, which),
                self.model.shapes(self._moved(keep, group, new), which))

    def prepare(self, keep: Keep, moves: Sequence[tuple[int, int]]) -> None:
        needed = []
        for g, k in moves:
            before, after = self._layers(keep, g, k)
            needed += before + after
        self.model.table.ensure(needed)

    def delta(self, keep: Keep, group: int, new: int) -> float:
        before, after = self._layers(keep, group, new)
        table = self.model.table
        return sum(table.ms(p, s) for p, s in after) - sum(table.ms(p, s) for p, s in before)
