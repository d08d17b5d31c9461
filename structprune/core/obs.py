"""The reconstruction criterion ``obs``: channels chosen by the error their removal leaves once
the remaining weights compensate (structured Optimal Brain Surgeon, ThiNet-style greedy).

A *consumer* of a group is a layer that reads the group's channels as input: an ``nn.Linear``
or an ``nn.Conv1d/2d/3d`` with ``groups == 1`` whose weight's input axis (dim 1) is a member
of the group. With ``X`` the consumer's inputs on the calibration batches (convs unfolded into
patches: one row per output position, one column per input channel and kernel tap, in the
order of ``W.reshape(out, -1)``) and ``H = X^T X``, removing the columns ``S`` of the
channels that go and refitting the remaining weights ``K`` by least squares,

    min_D ||X W^T - X_K (W_K + D)^T||^2 = tr(W_S ((H^-1)_SS)^-1 W_S^T)          (1)

(Hassibi and Stork's Optimal Brain Surgeon, for blocks of columns; ``(H^-1)_SS``'s inverse is
the Schur complement ``H_SS - H_SK H_KK^-1 H_KS``), and the compensating update is
``D = -W_S ((H^-1)_SS)^-1 (H^-1)_SK``. ``H`` is damped by a ridge ``damp * mean(diag(H))`` on
the weight columns (the ridge-regularised least squares recovery's ``lsq`` solves); a
consumer with a bias also refits it (a ones column in ``X``, never removed, not damped).

Units are removed greedily, one at a time, the one whose removal adds the least error
(summed over the group's consumers) first, ``H^-1`` and ``W`` updated after each removal by
the block-inverse formula (``G <- G - G_:S G_SS^-1 G_S:``, ``W <- W - W_S G_SS^-1 G_S:``), so
the error after removing a set is exactly (1) for that set. A group of more than
``max_steps`` units removes ``ceil(units / max_steps)`` a step (the cheapest by their own
errors; each update costs about a pass over ``H^-1``, so a 512-channel 3x3 consumer takes
32 updates of a 4608-square matrix, not 512). A unit's score is the
cumulative error at the moment it is removed: lower goes first, and any prefix of the
greedy order is what ratio, threshold, budgets and global ranking remove. Each consumer's
error is relative to its output energy ``tr(W H W^T)`` (undamped), and a group's error is the
mean over its consumers: the scores compare across groups and consumers whatever the scale
of a layer's weights (a BatchNorm after a consumer undoes that scale anyway). They already
compare across groups, so ``normalize="none"`` ranks by them directly.

Hessians come from one pass of the dense model over the calibration batches with forward
pre-hooks on the consumers (at most ``max_rows`` rows a consumer, drawn with a seeded
generator, unfolded a chunk at a time), accumulated in float32 on the model's device; each
is inverted once in float64 on the CPU, where the greedy runs. Memory is planned before
anything is allocated: a consumer whose full Hessian does not fit ``memory_budget`` bytes
(every consumer's float64 inverse together, and three float64 copies for its own
inversion) gets per-channel blocks instead (block-diagonal ``H``: no compensation across
channels, the error of a set is the sum of its channels' output energies), and one whose
blocks do not fit either is skipped; ``notes`` says which and why. A group with a unit that no
consumer with data reads (a functional conv, a transposed conv, a layer never called on the
batches, ...) falls back to ``l2`` (listed in ``fallbacks``).

Sequential selection (``sequential=True``, :meth:`OBS.rescore`): the scores above measure
every consumer on the dense model's inputs, so a group is chosen as if nothing upstream had
been removed. Once the widths are chosen, ``rescore`` goes through the groups in the order
the model first calls their consumers; for each it runs the dense model and a working copy
in which every group before it has lost its units (its consumers' removed columns zero, the
others refitted by the OBS update), takes the same rows of both, and fits the consumer's
weights on the pruned inputs ``X`` to the dense output ``X_dense A^T`` (ridge toward the
dense weights ``A``: ``B = A (X^T X_dense + damp)^T (X^T X + damp)^-1``, so ``B = A``
while nothing upstream is removed); the greedy then starts from ``B`` with ``X``'s Hessian,
and the group's units go from the working copy (every member's slices zero, the consumers
refitted) before the next group is measured. Columns an earlier group removed (a consumer
reading a concatenation of groups) are cut out of the Hessian. A group is placed by its
first consumer: the later consumers of a group read at several depths (a residual stream)
are measured on the removals made so far, not on those of the groups between, an
approximation. The widths do not change; which channels go may. It costs one forward of the
copy over the batches per group, stopped once the group's consumers have been called, and a
copy of the model (on its device); one group's Hessians are held at a time, beside the dense
pass's. The dense rows are the ones the dense pass drew: told that ``rescore`` will follow
(:meth:`OBS.expect_rescore`), that pass keeps them (on the model's device) for each
consumer that fits a second ``memory_budget`` (about ``max_rows`` rows each, one call a
batch) and is called equally often in every batch, and the dense model runs again only for
the others; the peak is at most twice ``memory_budget`` on the CPU (Hessians) and once on
the model's device (kept rows). The rows and so the scores are the same either way; it
saves 43-47% of the sequential selection's time on ResNet-20, YOLOv8n and a
MobileNetV2-style network (``benchmarks/sequential_cost.py``).
"""

from __future__ import annotations

import copy
import math
import sys
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from structprune.batches import Batch, Inputs, device_of, split
from structprune.core.analyse import Analysis, Group, module_of
from structprune.core.criteria import Criterion, run_batch
from structprune.errors import PlanError
from structprune.tree import evaluation

DAMP = 0.01  # ridge, relative to the mean diagonal of H
MAX_ROWS = 4096  # rows of X a consumer, over all batches
MAX_STEPS = 32  # greedy updates a group at most (more units than that: several a step)
MEMORY_BUDGET = 2 << 30  # bytes for all consumers' Hessians (their inverses) together
_PATCH_ELEMENTS = 1 << 24  # rows x columns of X unfolded at a time (64 MiB of float32)

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


def is_consumer(module: nn.Module) -> bool:
    """Whether ``module`` is a layer whose input Hessian ``obs`` measures: ``nn.Linear``, or
    ``nn.Conv1d/2d/3d`` with ``groups == 1``."""
    return isinstance(module, nn.Linear) or (isinstance(module, _CONVS) and module.groups == 1)


def _conv_padding(conv: nn.Module) -> list[int]:
    """``conv``'s padding as F.pad takes it (last spatial axis first, left then right)."""
    pads: list[int] = []
    for i in reversed(range(len(conv.kernel_size))):
        if conv.padding == "valid":
            left = right = 0
        elif conv.padding == "same":
            total = conv.dilation[i] * (conv.kernel_size[i] - 1)
            left, right = total // 2, total - total // 2  # as torch pads for "same"
        else:
            left = right = conv.padding[i]
        pads += [left, right]
    return pads


def _windows(conv: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """A view ``[N, L_1..L_d, C, k_1..k_d]`` of ``x``'s conv windows (no copy but the
    padding), and its leading shape ``[N, L_1..L_d]``."""
    d = len(conv.kernel_size)
    if x.ndim == d + 1:  # unbatched
        x = x.unsqueeze(0)
    pads = _conv_padding(conv)
    if any(pads):
        mode = "constant" if conv.padding_mode == "zeros" else conv.padding_mode
        x = F.pad(x, pads, mode=mode)
    view = x
    for i in range(d):
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        view = view.unfold(2 + i, span, conv.stride[i])[..., ::conv.dilation[i]]
    view = view.permute(0, *range(2, 2 + d), 1, *range(2 + d, 2 + 2 * d))
    return view, list(view.shape[:1 + d])


def _source(module: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """What :func:`patches` picks rows from, and its leading shape: a linear layer's input
    as ``[rows, features]``, a conv's windows (:func:`_windows`)."""
    if isinstance(module, nn.Linear):
        flat = x.reshape(-1, x.shape[-1])
        return flat, [flat.shape[0]]
    return _windows(module, x)


def _pick(source: torch.Tensor, lead: list[int], rows: torch.Tensor | None) -> torch.Tensor:
    width = math.prod(source.shape[len(lead):])
    if rows is None:
        return source.reshape(-1, width)
    index = torch.unravel_index(rows.to(source.device), tuple(lead))
    return source[index].reshape(len(rows), width)


def patches(module: nn.Module, x: torch.Tensor, rows: torch.Tensor | None = None,
            ) -> torch.Tensor:
    """The rows of ``X`` for a consumer's input ``x``: ``X @ W.reshape(out, -1).T`` is the
    layer's output without bias, one row per sample and output position (for a conv: its
    receptive field, channel-major then kernel taps, padded as the conv pads; for a linear
    layer: the input's last axis). ``rows`` (flat indices in sample, then position order)
    picks some rows without unfolding the others."""
    return _pick(*_source(module, x), rows)


# ------------------------------------------------------------------------ the greedy itself


class Reconstruction:
    """One consumer's least-squares state for the greedy: ``G = (H^-1)_TT`` and the
    (compensated) weights ``W_T`` of the candidate columns ``T``, with the columns of each
    candidate unit; removing units updates both by the block-inverse formula and drops
    their columns.

    ``inverse`` is ``(H^-1)_TT`` (float64), ``weight`` is ``W_T`` (out x |T|), ``columns[u]``
    the positions in ``T`` of unit u's columns."""

    def __init__(self, inverse: torch.Tensor, weight: torch.Tensor,
                 columns: list[np.ndarray]):
        self.G = inverse.detach().double().clone()
        self.W = weight.detach().double().clone()
        self.original = [np.asarray(c, np.int64) for c in columns]
        self.position = np.arange(self.G.shape[0])  # original T column -> its row of G
        self.dead = np.zeros(self.G.shape[0], bool)  # per row of G: removed
        self.alive = np.ones(len(columns), bool)  # per unit
        sizes = np.array([len(c) for c in self.original])
        # units of equal column count, with their columns as a matrix: batched each step
        self.buckets = [(np.flatnonzero(sizes == k),
                         np.stack([self.original[u] for u in np.flatnonzero(sizes == k)]))
                        for k in np.unique(sizes[sizes > 0])]

    def _columns(self, units: Any) -> torch.Tensor:
        return torch.from_numpy(np.concatenate([self.position[self.original[u]]
                                                for u in units]))

    def increments(self) -> np.ndarray:
        """The error each remaining unit's removal alone would add now (0 for removed
        units)."""
        out = np.zeros(len(self.original))
        for units, columns in self.buckets:
            alive = self.alive[units]
            units, idx = units[alive], torch.from_numpy(self.position[columns[alive]])
            if not len(units):
                continue
            w = self.W[:, idx]  # [out, m, k]
            if idx.shape[1] == 1:
                out[units] = (w[:, :, 0].square().sum(dim=0)
                              / self.G[idx[:, 0], idx[:, 0]]).numpy()
                continue
            # tr(W_u G_uu^-1 W_u^T) = tr(G_uu^-1 W_u^T W_u): k right-hand sides, not out
            gram = torch.einsum("omk,oml->mkl", w, w)
            blocks = self.G[idx[:, :, None], idx[:, None, :]]  # [m, k, k]
            out[units] = torch.linalg.solve(blocks, gram).diagonal(dim1=1, dim2=2) \
                .sum(dim=1).numpy()
        return out

    def error(self, units: Any) -> float:
        """The error removing ``units`` together would add now: ``tr(W_S G_SS^-1 W_S^T)``."""
        c = self._columns(units)
        if not len(c):
            return 0.0
        w = self.W[:, c]
        return float(torch.linalg.solve(self.G[c[:, None], c[None, :]], w.T @ w)
                     .diagonal().sum())

    def remove(self, units: Any) -> None:
        """Remove ``units``' columns; the other columns compensate
        (``W <- W - W_S G_SS^-1 G_S:``) and G becomes the inverse of the remaining columns'
        Hessian (``G <- G - G_:S G_SS^-1 G_S:``). The removed rows and columns become zero
        and are dropped once they are half of G (one in-place update a step, copies rare)."""
        c = self._columns(units)
        if len(c):
            rows = self.G[c]  # G_S: (G is symmetric)
            update = torch.linalg.inv(rows[:, c]) @ rows  # G_SS^-1 G_S: (G_SS is small)
            self.W.addmm_(self.W[:, c], update, alpha=-1)
            self.G.addmm_(rows.T, update, alpha=-1)
        for u in units:
            self.dead[self.position[self.original[u]]] = True
            self.alive[u] = False
        if 2 * int(self.dead.sum()) > len(self.dead):
            keep = torch.from_numpy(np.flatnonzero(~self.dead))
            self.G = self.G.index_select(0, keep).index_select(1, keep)
            self.W = self.W.index_select(1, keep)
            new = np.full(len(self.dead), -1)
            new[~self.dead] = np.arange(len(keep))
            self.position = np.where(self.position >= 0, new[self.position], -1)
            self.dead = np.zeros(len(keep), bool)


State = tuple["Reconstruction | np.ndarray", float]  # a consumer and its output energy


def greedy_order(states: list[State], candidates: int, max_steps: int | None = None,
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The greedy removal of ``candidates`` units over consumers ``states``: each a
    :class:`Reconstruction` or fixed per-unit errors (a block-diagonal consumer: no
    compensation, errors add up), with the energy its errors are divided by. Returns the
    order of removal and, per unit, the cumulative error (relative, summed over the
    consumers) once it is removed. Ties go to the lowest unit index.

    With ``max_steps`` (None: one unit a step), the ``ceil(candidates / max_steps)`` units
    adding the least error each are removed together in one step, so a wide group costs
    at most that many updates: the cumulative error after each step is exact for the set
    removed; within a step the units' scores rise in proportion to their own errors."""
    per_step = 1 if not max_steps else max(1, math.ceil(candidates / max_steps))
    order: list[int] = []
    cumulative = np.zeros(candidates)
    removed = np.zeros(candidates, bool)
    total = 0.0
    while len(order) < candidates:
        added = np.zeros(candidates)
        for state, energy in states:
            added += (state.increments() if isinstance(state, Reconstruction) else state) \
                / energy
        added[removed] = np.inf
        chosen = np.argsort(added, kind="stable")[:min(per_step, candidates - len(order))]
        own = added[chosen]
        if len(chosen) == 1:
            joint = float(own[0])
        else:
            joint = sum((state.error(chosen) if isinstance(state, Reconstruction)
                         else float(state[chosen].sum())) / energy for state, energy in states)
        shares = np.cumsum(own) / own.sum() if own.sum() > 0 else \
            np.arange(1, len(chosen) + 1) / len(chosen)
        cumulative[chosen] = total + joint * shares
        total += joint
        removed[chosen] = True
        order += chosen.tolist()
        for state, _ in states:
            if isinstance(state, Reconstruction):
                state.remove(chosen)
    return np.array(order, np.int64), cumulative


def removal_error(hessian: torch.Tensor, weight: torch.Tensor, removed: np.ndarray) -> float:
    """Formula (1): ``tr(W_S ((H^-1)_SS)^-1 W_S^T)`` for the removed columns ``removed``,
    in float64 (``hessian`` damped as wanted)."""
    s = torch.from_numpy(np.asarray(removed, np.int64))
    inverse = torch.linalg.inv(hessian.detach().double())[s][:, s]
    w = weight.detach().double()[:, s]
    return float((w * torch.linalg.solve(inverse, w.T).T).sum())


def compensated(hessian: torch.Tensor, weight: torch.Tensor, removed: np.ndarray,
                ) -> torch.Tensor:
    """``W`` after removing the columns ``removed`` with the compensating update
    ``W - W_S ((H^-1)_SS)^-1 (H^-1)_S:`` (the removed columns become 0)."""
    return _compensated(torch.linalg.inv(hessian.detach().double()),
                        weight.detach().double(), removed)


def _decouple(c: _Consumer, dead: np.ndarray) -> None:
    """Cut the columns ``dead`` (removed by an earlier group; their weights are zero) out of
    ``c``'s Hessian: no coupling to the other columns and a typical diagonal, so the inverse
    neither uses them to compensate nor lets them change the error."""
    c.dead = dead.copy()
    d = torch.from_numpy(np.flatnonzero(dead)).to(c.gram.device)
    alive = torch.from_numpy(np.flatnonzero(~dead)).to(c.gram.device)
    typical = c.gram.diagonal()[alive].mean() if len(alive) else 1.0
    c.gram[d] = 0
    c.gram[:, d] = 0
    c.gram[d, d] = typical
    if c.sums is not None:
        c.sums[d] = 0
    if c.cross is not None:  # nor do they fit the dense output
        c.cross[d] = 0


def _remove_columns(c: _Consumer, columns: np.ndarray) -> None:
    """Remove ``columns`` of consumer ``c``'s module in place: with its refit (a full
    Hessian), the other columns and the bias take the refit and the OBS update; otherwise the
    columns are zeroed."""
    module = c.module
    weight = _flat_weight(module)
    if c.target is not None:  # the refit to the dense output (and its bias), compensated
        weight = _compensated(c.inverse, c.target, columns)
    weight[:, torch.from_numpy(columns)] = 0
    with torch.no_grad():
        module.weight.copy_(weight[:, :c.width].reshape(module.weight.shape))
        if c.target is not None and c.bias:
            module.bias.copy_(weight[:, c.width])


def _compensated(inverse: torch.Tensor, weight: torch.Tensor, removed: np.ndarray,
                 ) -> torch.Tensor:
    """``W - W_S ((H^-1)_SS)^-1 (H^-1)_S:`` given ``H^-1`` (float64)."""
    s = torch.from_numpy(np.asarray(removed, np.int64))
    return weight - weight[:, s] @ torch.linalg.solve(inverse[s][:, s], inverse[s])


# ---------------------------------------------------------------------- the criterion


def _flat_weight(module: nn.Module) -> torch.Tensor:
    """``W.reshape(out, -1)`` in float64 on the CPU."""
    return module.weight.detach().reshape(module.weight.shape[0], -1).double().cpu()


class _Enough(BaseException):
    """A hook's signal that every consumer wanted has seen its batch (a BaseException, so
    that the handlers for a model's own failures let it through)."""


@dataclass
class _Consumer:
    """A layer reading some group's channels, and what was gathered of its inputs."""

    name: str
    module: nn.Module
    components: np.ndarray  # per column of W.reshape(out, -1): its component
    bias: bool
    mode: str = "full"  # "full", "blocks" or "skipped"
    reason: str = ""
    rows: int = 0
    gram: torch.Tensor | None = None  # full: n x n; blocks: [m, k, k]
    sums: torch.Tensor | None = None  # column sums (the bias' ones column)
    blocks: list[np.ndarray] = field(default_factory=list)  # blocks: columns of each
    energy: float | None = None  # tr(W H W^T), once prepared
    inverse: torch.Tensor | None = None  # full: H^-1 (damped, float64), once prepared
    block_energy: np.ndarray | None = None  # blocks: tr(W_b H_b W_b^T) of each
    cross: torch.Tensor | None = None  # sequential: X^T X_dense (full mode)
    dense_sums: torch.Tensor | None = None  # sequential: X_dense's column sums
    target: torch.Tensor | None = None  # sequential: the weights (and bias) refitted to dense
    dead: np.ndarray | None = None  # sequential: columns an earlier group removed
    first_call: int = -1  # when the model first called it in the pass over the batches
    calls: int = 0  # how often it was called in that pass

    @property
    def width(self) -> int:
        return len(self.components)


class OBS(Criterion):
    """Structured Optimal Brain Surgeon with a greedy removal order (see the module
    docstring): ``score(u)`` is the mean over the group's consumers of the relative
    reconstruction error left, after least-squares compensation, once the greedy has removed
    u (and every unit before it). Blocked units score the error of removing every unit that
    may go. ``damp``, ``max_rows``, ``max_steps`` and ``memory_budget`` are as in the module
    docstring; ``seed`` seeds the rows drawn."""

    def __init__(self, analysis: Analysis, batches: list[Batch], seed: int = 0, *,
                 damp: float = DAMP, max_rows: int = MAX_ROWS, max_steps: int | None = MAX_STEPS,
                 memory_budget: int = MEMORY_BUDGET):
        super().__init__(analysis)
        self.batches: list[Inputs] = [split(batch, error=PlanError)[0] for batch in batches]
        self.seed, self.damp, self.max_rows, self.max_steps, self.memory_budget = \
            seed, damp, max_rows, max_steps, memory_budget
        self.model = analysis.capture.model
        self._consumers: dict[str, _Consumer] = {}
        self._used = 0  # bytes of the memory budget planned
        # sequential: the dense pass's rows of each consumer, by batch and call (see
        # expect_rescore); None: not kept
        self._dense_rows: dict[str, list[list[torch.Tensor]]] | None = None
        self._rows_used = 0  # bytes of the memory budget planned for them
        self.notes = {"consumers": 0, "block_diagonal": {}, "skipped": {}, "fallback_reasons": {}}

    # -------------------------------------------------------------------- who reads a group

    def consumers_of(self, group: Group) -> tuple[list[str], list[str]]:
        """The names of the group's consumer modules (input axis a member), and of the
        members that read its channels but are no consumer obs can measure."""
        found, others = [], []
        for name, dim in group.members:
            owner, _, attr = name.rpartition(".")
            if attr != "weight" or name not in self.params:
                continue
            try:
                module = self.model.get_submodule(owner)
            except AttributeError:
                module = None
            transposed = getattr(module, "transposed", False)
            if dim == 1 and module is not None and is_consumer(module) \
                    and module.weight is self.params[name]:
                found.append(owner)
            elif (dim == 1 and not transposed and self.params[name].ndim >= 2) \
                    or (dim == 0 and transposed):
                others.append(module_of(name))
        return sorted(set(found)), sorted(set(others))

    def _describe(self, name: str) -> _Consumer:
        module = self.model.get_submodule(name)
        weight = module.weight
        per_channel = self.analysis.component[self.analysis.slots[(f"{name}.weight", 1)]]
        taps = weight[0, 0].numel()
        return _Consumer(name, module, np.repeat(per_channel, taps),
                         module.bias is not None)

    def _plan_memory(self, consumers: list[_Consumer]) -> None:
        """Full Hessians for the smallest consumers while they fit the budget, then
        per-channel blocks, then none (see the module docstring)."""
        for c in sorted(consumers, key=lambda c: (c.width, c.name)):
            n = c.width + c.bias
            full = 8 * n * n  # its inverse, kept in float64 (float32 sums before)
            if self._used + full <= self.memory_budget \
                    and 3 * 8 * n * n <= self.memory_budget:
                self._used += full
                continue
            comps = c.components
            c.blocks = [np.flatnonzero(comps == k) for k in np.unique(comps)]
            blocks = sum(4 * len(b) ** 2 for b in c.blocks)
            gib = 3 * 8 * n * n / 2 ** 30
            if self._used + blocks <= self.memory_budget:
                self._used += blocks
                c.mode = "blocks"
                c.reason = (f"{n} input columns: a full Hessian needs {gib:.2f} GiB, over the "
                            f"memory budget; per-channel blocks (no compensation across "
                            f"channels)")
                self.notes["block_diagonal"][c.name] = c.reason
            else:
                c.mode, c.reason = "skipped", (f"{n} input columns: its Hessian ({gib:.2f} "
                                               f"GiB, or its per-channel blocks) does not fit "
                                               f"the memory budget")
                self.notes["skipped"][c.name] = c.reason

    def expect_rescore(self) -> None:
        """Say, before scoring, that :meth:`rescore` will follow: the dense pass then keeps
        the rows it draws of each consumer whose rows fit what is left of a second
        ``memory_budget`` (by name) and that is called equally often in every batch, so
        that ``rescore`` takes them from there instead of running the dense model again for
        every group. The rows are the same either way (the same seeded draws); they are let
        go when ``rescore`` returns or fails. The module docstring says what it saves."""
        if self._dense_rows is None:
            self._dense_rows = {}

    def _per_batch(self) -> int:
        """Rows drawn of a consumer per call, so that the batches give about ``max_rows``."""
        return max(1, math.ceil(self.max_rows / len(self.batches)))

    def _row_bytes(self, c: _Consumer) -> int:
        """The bytes of the rows one call a batch draws of ``c`` (float32)."""
        return 4 * self._per_batch() * len(self.batches) * c.width

    def _plan_rows(self, consumers: list[_Consumer]) -> list[str]:
        """The consumers whose dense rows the pass keeps (full Hessians only: blocks refit
        nothing), each planned at one call a batch against the second budget."""
        if self._dense_rows is None:
            return []
        kept = []
        for c in consumers:
            need = self._row_bytes(c)
            if c.mode == "full" and self._rows_used + need <= self.memory_budget:
                self._rows_used += need
                self._dense_rows[c.name] = [[] for _ in self.batches]
                kept.append(c.name)
        return kept

    def _settle_rows(self, consumers: list[_Consumer]) -> None:
        """Let go of the kept rows of a consumer not called equally often in every batch:
        the sequential pass stops each batch at ``calls // batches`` calls, so its draws
        would fall out of step with the kept ones (its dense rows are drawn anew instead)."""
        if self._dense_rows is None:
            return
        for c in consumers:
            rows = self._dense_rows.get(c.name)
            if rows is not None and len({len(calls) for calls in rows}) > 1:
                del self._dense_rows[c.name]
                self._rows_used -= self._row_bytes(c)

    def _collect(self, groups: list[Group]) -> None:
        """One pass of the model over the batches, accumulating ``X^T X`` for every consumer
        of ``groups`` not gathered yet."""
        names = sorted({n for g in groups for n in self.consumers_of(g)[0]}
                       - set(self._consumers))
        if not names:
            return
        new = [self._describe(name) for name in names]
        self._plan_memory(new)
        kept = self._plan_rows(new)
        self._gather(self.model, [c for c in new if c.mode != "skipped"], "obs: input Hessians",
                     keep=kept)
        self._settle_rows([c for c in new if c.name in kept])
        for c in new:
            if c.mode != "skipped" and c.rows == 0:
                c.mode, c.reason = "skipped", "not called on the calibration batches"
                self.notes["skipped"][c.name] = c.reason
            self._consumers[c.name] = c
        self.notes["consumers"] = sum(c.mode != "skipped" for c in self._consumers.values())

    def _gather(self, model: nn.Module, consumers: list[_Consumer], desc: str,
                reference: nn.Module | None = None, keep: list[str] = ()) -> None:
        """Run ``model`` over the batches with forward pre-hooks on ``consumers`` (their
        modules are ``model``'s), adding their input rows to their accumulators and counting
        their calls; the rows drawn of the consumers named in ``keep`` are kept too (by batch
        and call). With a ``reference`` (the dense model; sequential scoring), the same rows
        of the same consumers are taken from the dense model, from the kept rows or else by
        running each batch through it first, and ``X^T X_dense`` accumulates too; both
        forwards stop once every consumer has been called as often as in the first pass
        (the rest of the model is not needed)."""
        per_batch = self._per_batch()
        device = device_of(model)
        clock = 0
        wanted = {c.name: max(1, c.calls // len(self.batches)) for c in consumers}
        until: dict[str, int] = {}  # the calls after which a forward may stop (none: never)
        seen: dict[str, int] = {}
        dense_rows: dict[str, list[torch.Tensor]] = {}
        kept = self._dense_rows if self._dense_rows is not None else {}
        keeping = {name: 0 for name in keep}  # bytes kept so far
        batch_index = 0

        def hook_for(c: _Consumer, dense: bool) -> Any:
            generator = torch.Generator().manual_seed(
                self.seed * 1_000_003 + zlib.crc32(c.name.encode()))

            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                nonlocal clock
                x = args[0] if args else kwargs.get("input")
                if not isinstance(x, torch.Tensor):
                    return
                if dense and c.name in kept:  # its rows are kept: counted, for the stop
                    seen[c.name] = seen.get(c.name, 0) + 1
                    stop_when_done()
                    return
                source, lead = _source(module, x.detach())
                total = math.prod(lead)
                rows = torch.randperm(total, generator=generator)[:per_batch].sort().values \
                    if total > per_batch else torch.arange(total)
                call = seen.get(c.name, 0)
                seen[c.name] = call + 1
                if dense:
                    dense_rows.setdefault(c.name, []).append(_pick(source, lead, rows).float())
                else:
                    if c.name in keeping:
                        keep_rows(c, _pick(source, lead, rows).float())
                    if c.first_call < 0:
                        c.first_call = clock
                    clock += 1
                    if reference is None:
                        c.calls += 1
                    step = max(1, _PATCH_ELEMENTS // c.width)  # never all rows at once
                    paired = dense_rows[c.name][call] if c.name in dense_rows else None
                    for i, chunk in enumerate(rows.split(step)):
                        self._add(c, _pick(source, lead, chunk).float(),
                                  None if paired is None else paired[i * step:(i + 1) * step])
                stop_when_done()
            return hook

        def stop_when_done() -> None:
            if until and all(seen.get(k, 0) >= n for k, n in until.items()):
                raise _Enough

        def keep_rows(c: _Consumer, rows: torch.Tensor) -> None:
            keeping[c.name] += rows.numel() * 4
            if keeping[c.name] > self._row_bytes(c):  # called more often than planned
                del keeping[c.name], kept[c.name]
                self._rows_used -= self._row_bytes(c)
                return
            kept[c.name][batch_index].append(rows)

        def forward(on: nn.Module, inputs: Inputs, stop: dict[str, int]) -> None:
            nonlocal until
            seen.clear()
            until = stop
            try:
                run_batch(on, inputs)
            except _Enough:
                pass

        # the refitted consumers (blocks refit nothing): the dense model runs when the rows
        # of one of them are not kept, as far as the working copy will (the kept ones are
        # counted there, not drawn again)
        full = {c.name: wanted[c.name] for c in consumers if c.mode == "full"}
        if all(name in kept for name in full):
            full = {}
        handles = []
        try:
            for c in consumers:
                handles.append(c.module.register_forward_pre_hook(hook_for(c, False),
                                                                   with_kwargs=True))
                if reference is not None and c.name in full:
                    handles.append(reference.get_submodule(c.name).register_forward_pre_hook(
                        hook_for(c, True), with_kwargs=True))
            with torch.no_grad(), evaluation(model):
                for batch_index, inputs in enumerate(tqdm(
                        self.batches, desc=desc, unit="batch", leave=False, file=sys.stderr,
                        disable=not sys.stderr.isatty())):
                    inputs = inputs.to(device)
                    dense_rows.clear()
                    if reference is not None:
                        dense_rows.update({c.name: kept[c.name][batch_index] for c in consumers
                                           if c.mode == "full" and c.name in kept})
                        if full:
                            with evaluation(reference):
                                forward(reference, inputs, full)
                    forward(model, inputs, wanted if reference is not None else {})
        finally:
            for handle in handles:
                handle.remove()

    def _add(self, c: _Consumer, p: torch.Tensor, dense: torch.Tensor | None = None) -> None:
        """Add the rows ``p`` to ``c``'s accumulators (and with ``dense``, the same rows of
        the dense model's input, ``X^T X_dense``)."""
        if c.mode == "full":
            c.gram = p.T @ p if c.gram is None else c.gram.addmm_(p.T, p)
            if dense is not None:
                c.cross = p.T @ dense if c.cross is None else c.cross.addmm_(p.T, dense)
                if c.bias:
                    sums = dense.sum(dim=0)
                    c.dense_sums = sums if c.dense_sums is None else c.dense_sums + sums
        else:
            sizes = {len(b) for b in c.blocks}
            if len(sizes) == 1:  # equal blocks (a channel's taps): one batched product
                x = p[:, torch.from_numpy(np.concatenate(c.blocks)).to(p.device)] \
                    .reshape(p.shape[0], len(c.blocks), -1).transpose(0, 1)
                grams = x.transpose(1, 2) @ x
            else:
                grams = [p[:, torch.from_numpy(b).to(p.device)] for b in c.blocks]
                grams = [b.T @ b for b in grams]
            c.gram = grams if c.gram is None else [a + b for a, b in zip(c.gram, grams,
                                                                          strict=True)]
        if c.bias:
            sums = p.sum(dim=0)
            c.sums = sums if c.sums is None else c.sums + sums
        c.rows += p.shape[0]

    # ------------------------------------------------------------------------------ scores

    def _prepare(self, c: _Consumer) -> None:
        """Once per consumer: its output energy, and ``H^-1`` (full: damped, float64, the
        ones column last with a bias) or each block's energy (blocks); the sums go."""
        if c.energy is not None:
            return
        weight = _flat_weight(c.module)
        if c.mode == "blocks":
            c.block_energy = np.array([
                float((weight[:, torch.from_numpy(b)] @ gram.double().cpu()
                       * weight[:, torch.from_numpy(b)]).sum())
                for b, gram in zip(c.blocks, c.gram, strict=True)])
            c.energy, c.gram = float(c.block_energy.sum()), None
            return
        gram = c.gram.double().cpu()
        c.gram = None
        c.energy = float(((weight @ gram) * weight).sum())
        scale = float(gram.diagonal().mean())
        if c.energy <= 0 or scale <= 0:  # all-zero input: nothing to measure
            c.energy = 0.0
            return
        n = c.width
        ridge = self.damp * scale
        gram.diagonal().add_(ridge)
        if c.bias:  # the ones column: the bias refits too
            s = c.sums.double().cpu()
            gram = torch.cat([torch.cat([gram, s[:, None]], 1),
                              torch.cat([s, torch.tensor([float(c.rows)],
                                                         dtype=torch.float64)])[None]], 0)
        factor, info = torch.linalg.cholesky_ex(gram)
        for _ in range(6):  # float32 sums can leave H barely indefinite: damp more
            if not info:
                break
            gram.diagonal()[:n] += 9 * self.damp * scale
            ridge += 9 * self.damp * scale
            factor, info = torch.linalg.cholesky_ex(gram)
        del gram
        # H^-1 = L^-T L^-1: a triangular solve and a product (torch's cholesky_inverse is
        # twice as slow)
        inverse = torch.linalg.solve_triangular(
            factor, torch.eye(len(factor), dtype=torch.float64), upper=False)
        del factor
        c.inverse = inverse.T @ inverse
        if c.cross is not None:  # sequential: refit to the dense model's output first
            # ridge toward the dense weights: min ||X B^T - X_dense A^T||^2 + damp ||B - A||^2
            # (so with unpruned inputs B = A); the columns removed before stay zero
            dense = self.model.get_submodule(c.name)
            cross, c.cross = c.cross.double().cpu(), None
            pull = torch.full((n,), ridge, dtype=torch.float64)
            if c.dead is not None:
                pull[torch.from_numpy(c.dead)] = 0
            cross.diagonal().add_(pull)
            target = _flat_weight(dense)
            if c.bias:
                cross = torch.cat([torch.cat([cross, c.sums.double().cpu()[:, None]], 1),
                                   torch.cat([c.dense_sums.double().cpu(),
                                              torch.tensor([float(c.rows)],
                                                           dtype=torch.float64)])[None]], 0)
                target = torch.cat([target, dense.bias.detach().double().cpu()[:, None]], 1)
            c.target = target @ cross.T @ c.inverse

    def _state(self, c: _Consumer, group: Group, candidates: np.ndarray,
               ) -> tuple[Reconstruction | np.ndarray, float] | None:
        """The greedy's state of consumer ``c`` for the ``candidates`` units of ``group``
        (None when it reads none of them or its input is all zero)."""
        position = np.full(self.components, -1)
        position[group.units[candidates]] = np.arange(len(candidates))
        unit_of_column = position[c.components]
        if (unit_of_column < 0).all():
            return None
        self._prepare(c)
        if not c.energy:
            return None
        if c.mode == "blocks":
            errors = np.zeros(len(candidates))
            units = np.array([unit_of_column[b[0]] for b in c.blocks])
            np.add.at(errors, units[units >= 0], c.block_energy[units >= 0])
            return errors, c.energy
        columns = np.flatnonzero(unit_of_column >= 0)
        t = torch.from_numpy(columns)
        local = unit_of_column[columns]
        weight = _flat_weight(c.module) if c.target is None else c.target
        return Reconstruction(c.inverse[t][:, t], weight[:, t],
                              [np.flatnonzero(local == u) for u in range(len(candidates))]), \
            c.energy

    def _measure(self, group: Group, consumers: Mapping[str, _Consumer] | None = None,
                 ) -> np.ndarray:
        """The group's scores over ``consumers`` (default: the dense pass's)."""
        consumers = self._consumers if consumers is None else consumers
        names, others = self.consumers_of(group)
        usable = [consumers[n] for n in names if n in consumers and consumers[n].mode != "skipped"]
        candidates = np.flatnonzero(~group.blocked)
        if not candidates.size:
            return np.zeros(group.size)
        states = [s for s in (self._state(c, group, candidates) for c in usable) if s]
        read = np.unique(np.concatenate([c.components for c in usable])) if usable else []
        if not states or not np.isin(group.units[candidates], read).all():
            missing = ", ".join(others) or "none"
            self.notes["fallback_reasons"][group.index] = (
                f"a unit is read by no consumer with data (linear or ungrouped conv layers "
                f"called on the batches; other readers: {missing})")
            return self.fall_back(group)
        _, cumulative = greedy_order(states, len(candidates), self.max_steps)
        out = np.full(group.size, cumulative.max() / len(states))
        out[candidates] = cumulative / len(states)
        return out

    def rescore(self, removals: Mapping[int, int], exact_only: bool = False,
                ) -> dict[int, np.ndarray]:
        """Scores again, sequentially (see the module docstring): group by group in the
        order the model first calls their consumers, each measured on a working copy of the
        model from which every group before it has removed its ``removals[g]`` lowest-scored
        units (among those that may go, ``exact_only`` as selection has it). Returns the raw
        scores of the groups that remove something and have a consumer with data; the others
        keep their scores, and their units go from the working copy first."""
        groups = [g for g in self.analysis.prunable_groups() if removals.get(g.index, 0) > 0]
        self._collect(groups)
        work = copy.deepcopy(self.model)
        modules = dict(work.named_modules())
        parameters = dict(work.named_parameters())
        dead: dict[str, np.ndarray] = {}  # per consumer: columns removed so far

        usable = {g.index: [self._consumers[n] for n in self.consumers_of(g)[0]
                            if self._consumers[n].mode != "skipped"] for g in groups}

        def remove(group: Group, scores: np.ndarray, consumers: dict[str, _Consumer]) -> None:
            may_go = np.flatnonzero(group.prunable(exact_only))
            order = may_go[np.argsort(scores[may_go], kind="stable")]
            gone = group.units[order[:removals[group.index]]]
            # every member's slices go to zero (the channel reads as zero everywhere,
            # functional readers too), then the measured consumers take their refits
            with torch.no_grad():
                for name, dim in group.members:
                    if name in parameters and (name, dim) in self.analysis.slots:
                        slot = self.analysis.component[self.analysis.slots[(name, dim)]]
                        index = torch.from_numpy(np.flatnonzero(np.isin(slot, gone)))
                        parameters[name].index_fill_(dim, index.to(parameters[name].device), 0)
            for c in consumers.values():
                columns = np.flatnonzero(np.isin(c.components, gone))
                if columns.size:
                    _remove_columns(c, columns)
                    dead.setdefault(c.name, np.zeros(c.width, bool))[columns] = True

        for group in groups:  # no consumer with data: chosen as before, removed first
            if not usable[group.index]:
                remove(group, self._measure(group), {})
        out: dict[int, np.ndarray] = {}
        ordered = sorted((g for g in groups if usable[g.index]),
                         key=lambda g: (min(c.first_call for c in usable[g.index]), g.index))
        try:
            for group in tqdm(ordered, desc="obs: sequential", unit="group", leave=False,
                              file=sys.stderr, disable=not sys.stderr.isatty()):
                fresh = {c.name: replace(c, module=modules[c.name], rows=0, gram=None,
                                         sums=None, energy=None, inverse=None,
                                         block_energy=None)
                         for c in usable[group.index]}
                self._gather(work, list(fresh.values()), "obs: pruned inputs", self.model)
                for c in fresh.values():
                    if c.name in dead and c.mode == "full":
                        _decouple(c, dead[c.name])
                out[group.index] = self._measure(group, fresh)
                remove(group, out[group.index], fresh)
        finally:
            # the kept rows are spent: their memory goes back before pruning and recovery
            # (a second rescore runs the dense model again)
            self._dense_rows, self._rows_used = None, 0
        return out

    def scores(self, groups: list[Group]) -> dict[int, np.ndarray]:
        # every prunable group's consumers at once: one pass over the data, one memory plan
        self._collect([*self.analysis.prunable_groups(), *groups])
        return {group.index: self._measure(group)
                for group in tqdm(groups, desc="obs: greedy", unit="group", leave=False,
                                  file=sys.stderr, disable=not sys.stderr.isatty())}

    def measure(self, group: Group) -> np.ndarray:
        return self.scores([group])[group.index]


__all__ = ["DAMP", "MAX_ROWS", "MAX_STEPS", "MEMORY_BUDGET", "OBS", "Reconstruction",
           "compensated", "greedy_order", "is_consumer", "patches", "removal_error"]
