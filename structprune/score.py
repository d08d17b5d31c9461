"""Stage 3, score: importance of every unit of every group.

A unit's importance is the mean, over the group's parameter members, of the norm of the
slices it owns (L1 or L2; buffers such as BN statistics do not count). Scores are divided
by the group's mean so that groups compare on one scale when ranked globally.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .analyse import Analysis, Group
from .capture import graph_parameters

Importance = Callable[[Analysis, Group], np.ndarray]


# elements: tensors from this size are reduced in worker threads. Small ones count too: a
# ResNet-50's dozens of 1x1 convs of 4k-16k elements cost 2 ms when reduced one by one.
_THREADED_FROM = 1 << 8


def _slice_norms(tensor: torch.Tensor, dim: int, p: int) -> np.ndarray:
    """Norm of every slice ``tensor.select(dim, i)``.

    A tensor with one value per slice (a norm's weight) is its absolute value. L2 on the CPU
    (the default) goes through :func:`_l2_norms`, the one routine for every size and thread
    count, so the scores do not depend on either. Other norms and devices reduce the view in
    place, strided but without a copy.
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
    return _l2_norms(t, [dim])[0]


_BLOCK = 1 << 22  # elements: large tensors are reduced in row blocks of about this size


def _rows(tensor: torch.Tensor, dim: int) -> int:
    """Rows of the matrix reduced for ``dim``: the slices for dim 0, else the product of
    the leading axes (each row then adds to every column)."""
    return tensor.shape[0] if dim == 0 else math.prod(tensor.shape[:dim])


def _blocks(tensor: torch.Tensor, dim: int) -> list[tuple[int, int]]:
    """Row ranges of that matrix, fixed by the tensor's shape alone, so that every thread
    count sums in the same order."""
    rows = _rows(tensor, dim)
    step = max(1, _BLOCK // max(1, tensor.numel() // max(rows, 1)))
    return [(start, min(start + step, rows)) for start in range(0, rows, step)]


def _block_sums(tensor: torch.Tensor, dim: int, start: int, stop: int) -> np.ndarray:
    """Sums of squares along ``dim`` over rows ``start:stop`` of the reduced matrix: each
    row's own sum for dim 0 (rows are slices), partial sums per column otherwise.

    Both layouts reduce along contiguous memory with no temporary the size of the tensor (a
    strided reduction over the leading axis, or a squared copy, costs five to ten times
    more). It is numpy, whose calls cost a tenth of torch's and which releases the GIL inside
    its reductions, so blocks can be shared out between threads.
    """
    matrix = tensor.detach().numpy()
    size = matrix.shape[dim]
    if dim == 0:
        rows = matrix.reshape(size, -1)[start:stop]
        return np.einsum("ij,ij->i", rows, rows)
    columns = matrix.reshape(math.prod(matrix.shape[:dim]), -1)[start:stop]
    return np.einsum("ij,ij->j", columns, columns).reshape(size, -1).sum(axis=1)


def _combine(dim: int, parts: list[np.ndarray]) -> np.ndarray:
    """Norms from the block sums of :func:`_block_sums`, in block order."""
    if dim == 0:
        sums = np.concatenate([part.astype(np.float64) for part in parts])
    else:
        sums = parts[0].astype(np.float64)
        for part in parts[1:]:
            sums = sums + part
    return np.sqrt(sums)


def _l2_norms(tensor: torch.Tensor, dims: list[int]) -> list[np.ndarray]:
    """L2 slice norms of a float32 CPU tensor along each of ``dims``, block by block."""
    tensor = tensor.detach().contiguous()  # once, not once a block (channels_last weights)
    return [_combine(dim, [_block_sums(tensor, dim, a, b) for a, b in _blocks(tensor, dim)])
            for dim in dims]


def _unit_size(jobs: dict[str, tuple[torch.Tensor, list[int]]],
               unit: tuple[str, int, int, int]) -> int:
    """Elements a block reads."""
    tensor = jobs[unit[0]][0]
    return (unit[3] - unit[2]) * (tensor.numel() // max(_rows(tensor, unit[1]), 1))


def _in_threads(jobs: dict[str, tuple[torch.Tensor, list[int]]], threads: int,
                ) -> dict[tuple[str, int], np.ndarray]:
    """Slice norms of large tensors, their blocks shared out between ``threads`` threads by
    size; the same blocks, combined in the same order, as :func:`_l2_norms`. Reading the
    weights is most of the score stage, and one core cannot read memory as fast as two: on
    two cores the reductions take about three quarters of the time of one."""
    units = [(name, dim, a, b) for name, (tensor, dims) in jobs.items() for dim in dims
             for a, b in _blocks(tensor, dim)]
    sized = sorted(((_unit_size(jobs, unit), unit) for unit in units), reverse=True)

    shares: list[list[tuple[str, int, int, int]]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for size, unit in sized:
        lightest = loads.index(min(loads))
        shares[lightest].append(unit)
        loads[lightest] += size

    def run(share: list[tuple[str, int, int, int]]) -> list[tuple[tuple, np.ndarray]]:
        return [(unit, _block_sums(jobs[unit[0]][0], unit[1], unit[2], unit[3]))
                for unit in share]

    parts: dict[tuple[str, int], list[tuple[int, np.ndarray]]] = {}
    with ThreadPoolExecutor(threads) as pool:
        for done in pool.map(run, shares):
            for (name, dim, a, _), sums in done:
                parts.setdefault((name, dim), []).append((a, sums))
    return {key: _combine(key[1], [sums for _, sums in sorted(found, key=lambda x: x[0])])
            for key, found in parts.items()}


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

    def prefetch(self, members: Iterable[tuple[str, int]], p: int) -> None:
        """Compute the L2 norms of every float32 CPU tensor among ``members`` of
        ``_THREADED_FROM`` elements or more at once, in as many threads as torch may use."""
        threads = min(torch.get_num_threads(), os.cpu_count() or 1)
        if p != 2 or threads < 2:
            return
        jobs: dict[str, tuple[torch.Tensor, list[int]]] = {}
        for name, dim in members:
            tensor = self.params.get(name)
            if (tensor is None or tensor.numel() < _THREADED_FROM
                    or tensor.numel() == tensor.shape[dim]  # one value a slice: get() takes |x|
                    or tensor.dtype != torch.float32 or tensor.device.type != "cpu"
                    or (name, dim, p) in self.cache):
                continue
            if name not in jobs:
                jobs[name] = (tensor.detach().contiguous(), [])
            if dim not in jobs[name][1]:
                jobs[name][1].append(dim)
        if jobs:
            for (name, dim), norms in _in_threads(jobs, threads).items():
                self.cache[(name, dim, p)] = norms

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
    norms.prefetch((m for group in groups for m in group.members), p)
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
