"""The importance criteria: each one scores every unit of a group over all of its members.

A criterion is a callable ``(analysis, group) -> one raw score per unit`` (:data:`Importance`).
Every built-in one scores a unit over *every* member of its group (each conv, norm and linear
slice that loses the unit, or every place its channel is consumed), not over one layer as
per-layer tools do:

- :class:`Magnitude`: L1 or L2 weight magnitude; needs no data;
- :class:`Taylor`, :class:`Gradient`: first-order Taylor and mean gradient magnitude, from the
  gradients of the cross-entropy loss on calibration batches; without targets, of a loss
  against the dense model's own outputs (pseudo-labels for classifiers, squared random
  projections for any other output);
- :class:`NormScale`: the scale (gamma) of the unit's normalisation layers;
- :class:`FPGM`: distance from the other filters, FPGM's geometric median;
- :class:`LAMP`: layer-adaptive magnitude;
- :class:`Activation`: mean absolute activation where the channel is consumed;
- :class:`Random`: seeded uniform scores, the control any comparison needs.

The reconstruction criterion ``obs`` (structured Optimal Brain Surgeon) is in
:mod:`structprune.core.obs`.

Calibration batches take any form of :mod:`structprune.batches`. The names, the registry and
the scoring engine that normalises the raw scores are in :mod:`structprune.core.score`.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from structprune.batches import (
    Batch,
    Inputs,
    device_of,
    first_tensor,
    flatten_outputs,
    labelled,
    split,
)
from structprune.core.analyse import Analysis, Consumption, Group
from structprune.core.capture import Capture, graph_parameters
from structprune.errors import PlanError
from structprune.tree import evaluation

Importance = Callable[[Analysis, Group], np.ndarray]


_BLOCK = 1 << 20  # elements in a block of rows: a few MB, in cache


def slice_norms(tensor: torch.Tensor, dim: int, p: int) -> np.ndarray:
    """The L``p`` norm of every slice ``tensor.select(dim, i)``, in float64.

    For ``dim`` > 0 the powered tensor is summed over its leading rows first (a ``[rows,
    size * rest]`` view, contiguous, a block of rows at a time), then over ``rest``: torch
    reduces a strided middle axis slowly (ResNet-50's input-axis norms took 33 ms that way
    and take 9 ms this way), and powering VGG16's classifier whole took 0.39 s.
    """
    t = tensor.detach()
    size = t.shape[dim]
    if t.numel() == size:  # one value a slice (a norm's weight): its magnitude
        return t.abs().double().cpu().numpy().reshape(-1)
    if dim == 0:
        return torch.linalg.vector_norm(t.reshape(size, -1).float(), ord=p, dim=1) \
            .double().cpu().numpy()
    rows = t.reshape(-1, t[(0,) * dim].numel())
    columns = torch.zeros(rows.shape[1], device=t.device)
    for block in rows.split(max(1, _BLOCK // rows.shape[1])):  # never the whole tensor powered
        block = block.float()
        columns += (block.square() if p == 2 else block.abs().pow(p)).sum(dim=0)
    return columns.reshape(size, -1).sum(dim=1).double().pow(1 / p).cpu().numpy()


def slices(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    """``tensor``'s slices along ``dim`` as the rows of a ``[size, rest]`` float64 matrix."""
    t = tensor.detach()
    return t.movedim(dim, 0).reshape(t.shape[dim], -1).double()


Key = tuple[str, int]  # a member: (tensor name, axis)


class Criterion:
    """Base of the built-in criteria: ``criterion(analysis, group)`` is one raw score per unit
    of ``group`` (in ``group.units`` order), and :meth:`scores` scores many groups at once;
    subclasses implement :meth:`measure` (and may batch :meth:`scores`).

    ``fallbacks`` lists the indices of the groups a criterion could not score by its own rule
    and scored by ``l2`` magnitude instead (``bn`` for a group without a norm, ...), and
    ``notes`` what else the report should say about how it scored (the loss of a gradient
    criterion without labels, the consumers ``obs`` skipped, ...); both are filled while
    scoring, so a caller can report them.
    """

    def __init__(self, analysis: Analysis):
        self.analysis = analysis
        self.params = graph_parameters(analysis.capture)  # parameters count, buffers do not
        self.fallbacks: list[int] = []
        self.notes: dict[str, Any] = {}  # what the report says about how it scored
        self.components = analysis.n_components
        self._per_slot: dict[Key, np.ndarray] = {}  # a tensor read once
        self._magnitude: Magnitude | None = None

    def __call__(self, analysis: Analysis, group: Group) -> np.ndarray:
        return self.measure(group)

    def measure(self, group: Group) -> np.ndarray:
        raise NotImplementedError

    def scores(self, groups: list[Group]) -> dict[int, np.ndarray]:
        """Raw scores of each group, by group index, in order."""
        return {group.index: self(self.analysis, group) for group in groups}

    def is_parameter(self, key: Key) -> bool:
        return key[0] in self.params

    def per_slot(self, key: Key, compute: Callable[[str, int], np.ndarray]) -> np.ndarray:
        """``compute(name, dim)``, one value per slot of member ``key``, cached: a tensor
        in several groups is read once."""
        if key not in self._per_slot:
            self._per_slot[key] = compute(*key)
        return self._per_slot[key]

    def member_sums(self, groups: list[Group], include: Callable[[Key], bool],
                    values: Callable[[Key], np.ndarray]) -> list[tuple[np.ndarray, int]]:
        """For each group: ``values(key)`` (one value per slot of member ``key``) summed into
        its units over the members that ``include`` accepts, and how many those are.

        Every slot adds to the unit that owns it, in slot order (the analysis' tensor order,
        then position), all groups in one bincount: a unit's sum is the same whichever
        groups are scored with it, and DenseNet-201's 6,000 (group, member) pairs cost one
        pass over the slots instead of one each."""
        position = np.full(self.components, -1, np.int64)  # component -> place among units
        starts = [0]
        counts, wanted = [], set()
        for group in groups:
            position[group.units] = np.arange(starts[-1], starts[-1] + group.size)
            starts.append(starts[-1] + group.size)
            keys = [key for key in group.members if include(key)]
            counts.append(len(keys))
            wanted.update(keys)
        keys = [key for key in self.analysis.slots if key in wanted]
        total = np.zeros(starts[-1])
        if keys:
            slots = self.analysis.slots
            where = position[self.analysis.component[np.concatenate([slots[k] for k in keys])]]
            inside = where >= 0
            flat = np.concatenate([values(k) for k in keys])
            total = np.bincount(where[inside], flat[inside], minlength=starts[-1])
        return [(total[a:b], n)
                for (a, b), n in zip(itertools.pairwise(starts), counts, strict=True)]

    def component_sums(self, keys: Iterable[Key],
                       values: Callable[[Key], np.ndarray]) -> np.ndarray:
        """``values(key)`` (one value per slot of member ``key``) summed into the component
        of each slot, over ``keys``: one sum per component."""
        keys = list(keys)
        if not keys:
            return np.zeros(self.components)
        where = self.analysis.component[np.concatenate([self.analysis.slots[k] for k in keys])]
        return np.bincount(where, np.concatenate([values(k) for k in keys]),
                           minlength=self.components)

    def fall_back(self, group: Group) -> np.ndarray:
        """``l2`` magnitude for a group this criterion cannot score; recorded in fallbacks."""
        if group.index not in self.fallbacks:
            self.fallbacks.append(group.index)
        if self._magnitude is None:
            self._magnitude = Magnitude(self.analysis, 2)
        return self._magnitude(self.analysis, group)


class Magnitude(Criterion):
    """Per-unit L1 (``p=1``) or L2 (``p=2``) magnitude, averaged over a group's parameter
    members (Li et al. 2017, "Pruning Filters for Efficient ConvNets", lifted to groups):

        score(u) = 1/|M| * sum_{m in M} sum_{s in slots_m(u)} ||W_m[s]||_p

    with M the group's parameter members (buffers do not count) and ``W_m[s]`` the slice of
    member m at slot s. One instance scores many groups: a tensor in several is read once."""

    def __init__(self, analysis: Analysis, p: int):
        super().__init__(analysis)
        self.p = p

    def norms(self, key: Key) -> np.ndarray:
        return self.per_slot(key, lambda name, dim: slice_norms(self.params[name], dim, self.p))

    def scores(self, groups: list[Group]) -> dict[int, np.ndarray]:
        sums = self.member_sums(groups, self.is_parameter, self.norms)
        return {group.index: total / max(n, 1)
                for group, (total, n) in zip(groups, sums, strict=True)}

    def measure(self, group: Group) -> np.ndarray:
        return self.scores([group])[group.index]


class NormScale(Criterion):
    """Network slimming (Liu et al. 2017, "Learning Efficient Convolutional Networks through
    Network Slimming"): the scale factors of the unit's normalisation layers,

        score(u) = sum_{m in N} sum_{s in slots_m(u)} sum |gamma_m[s]|

    over N, *every* norm weight among the group's members (two BatchNorms joined by a residual
    add both count). Norms are torch.nn's batch, instance, group, layer and RMS norms and
    torchvision's FrozenBatchNorm2d. A group with no norm weight falls back to ``l2``
    magnitude (listed in ``fallbacks``)."""

    def __init__(self, analysis: Analysis):
        super().__init__(analysis)
        self.tensors = analysis.capture.model.state_dict(keep_vars=True)  # weights or buffers

    def is_norm_weight(self, key: Key) -> bool:
        return key[0] in self.tensors and is_norm_weight(self.analysis.capture.model, key[0])

    def gammas(self, key: Key) -> np.ndarray:
        return self.per_slot(key, lambda name, dim: slices(self.tensors[name], dim).abs()
                             .sum(dim=1).cpu().numpy())

    def measure(self, group: Group) -> np.ndarray:
        [(total, found)] = self.member_sums([group], self.is_norm_weight, self.gammas)
        return total if found else self.fall_back(group)


NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.RMSNorm)


def is_norm_weight(model: nn.Module, name: str) -> bool:
    """Whether ``name`` (a state_dict name of ``model``) is a normalisation layer's weight."""
    owner, _, attr = name.rpartition(".")
    if attr != "weight":
        return False
    try:
        module = model.get_submodule(owner)
    except AttributeError:
        return False
    # FrozenBatchNorm2d by name: its weight is a buffer, and torchvision is not imported here
    return isinstance(module, NORM_TYPES) or type(module).__name__ == "FrozenBatchNorm2d"


def _distance_sums(tensor: torch.Tensor, dim: int) -> np.ndarray:
    """For each slice v_i along ``dim``: sum_j ||v_i - v_j||_2, in blocks of rows."""
    v = slices(tensor, dim)
    step = max(1, (1 << 22) // max(1, v.shape[0]))
    return torch.cat([torch.cdist(block, v).sum(dim=1) for block in v.split(step)]) \
        .cpu().numpy()


class FPGM(Criterion):
    """Filter pruning via geometric median (He et al. 2019, CVPR): a filter close to all
    the others is replaceable. For each filter member m of the group (a weight of two or
    more axes sliced on axis 0: every conv or linear map producing the unit), with v_i the
    flattened filter i,

        d_m(i) = sum_j ||v_i - v_j||_2        (over every filter j of m)
        score(u) = 1/|M_f| * sum_{m in M_f} sum_{i in slots_m(u)} d_m(i)

    the approximation of the distance from the geometric median that the paper's code and
    Torch-Pruning compute with cdist. Input columns of consumers are not filters (and a
    flatten into a large linear map would make tens of thousands of them); a group without
    filters falls back to ``l2`` (listed in ``fallbacks``)."""

    def is_filter(self, key: Key) -> bool:
        return self.is_parameter(key) and self.params[key[0]].ndim >= 2 and key[1] == 0

    def distances(self, key: Key) -> np.ndarray:
        return self.per_slot(key, lambda name, dim: _distance_sums(self.params[name], dim))

    def measure(self, group: Group) -> np.ndarray:
        [(total, counted)] = self.member_sums([group], self.is_filter, self.distances)
        return total / counted if counted else self.fall_back(group)


class LAMP(Criterion):
    """Layer-adaptive magnitude-based pruning (Lee et al. 2021, ICLR), lifted from weights
    to units: with m_u the squared ``l2`` magnitude of unit u (as :class:`Magnitude`) and
    units ranked by m ascending (ties in stable-sort order),

        score(u) = m_u / sum_{v: rank(v) >= rank(u)} m_v

    (0 where that sum is 0)."""

    def __init__(self, analysis: Analysis):
        super().__init__(analysis)
        self.magnitude = Magnitude(analysis, 2)

    def measure(self, group: Group) -> np.ndarray:
        return self.scores([group])[group.index]

    def scores(self, groups: list[Group]) -> dict[int, np.ndarray]:
        return {index: _lamp(np.square(m)) for index, m in self.magnitude.scores(groups).items()}


def _lamp(m: np.ndarray) -> np.ndarray:
    """LAMP's score of squared magnitudes ``m``."""
    order = np.argsort(m, kind="stable")
    tail = np.cumsum(m[order][::-1])[::-1]  # sum over this rank and every higher one
    out = np.zeros(m.size)
    out[order] = np.divide(m[order], tail, out=np.zeros(m.size), where=tail > 0)
    return out


class Random(Criterion):
    """Uniform scores in [0, 1) from ``np.random.default_rng(seed)``, one draw per group in
    scoring order: the control every criterion must beat."""

    def __init__(self, analysis: Analysis, seed: int = 0):
        super().__init__(analysis)
        self.rng = np.random.default_rng(seed)

    def measure(self, group: Group) -> np.ndarray:
        return self.rng.random(group.size)


# ----------------------------------------------------------------------- data-driven criteria


LABELS = "cross-entropy against the batches' targets"
PSEUDO_LABELS = "cross-entropy against the dense model's argmax (pseudo-labels)"
PROJECTION = ("random projections of the outputs, squared per sample (Gauss-Newton estimate "
              "of the squared error to the dense model)")


class _Gradients(Criterion):
    """Base of the gradient criteria: on first use, the gradients of a loss of the model (in
    eval mode, so BN statistics stay) with respect to the graph's parameters, on the
    calibration batches. The user's ``.grad`` and ``requires_grad`` are restored afterwards.

    **With labels** (every batch has targets): the summed per-batch cross-entropy losses,
    accumulated into ``.grad`` as ``backward()`` does (``loss`` is :data:`LABELS`).

    **Without labels** (a batch has no targets; ``label_free`` is then True and the
    targets of any other batch are not used): a loss against the dense model's own
    outputs. The natural one, ``D(w) = 1/2 sum_n ||f(x_n; w) - f(x_n; w_dense)||^2``, has a
    zero gradient at the dense weights, where it is evaluated, so a surrogate stands in:

    - *classifier-shaped output* (the model returns one 2-D floating tensor of two or more
      columns, logits): cross-entropy against the dense model's own argmax, pseudo-labels
      (:data:`PSEUDO_LABELS`); the labelled loss where the model is right, accumulated as
      with labels.
    - *any other output* (detectors, segmenters, several tensors): random projections
      (:data:`PROJECTION`). Each sample n gets a seeded Gaussian ``r_nk`` shaped like each
      floating output ``f_k`` and the loss ``l_n = sum_k <f_k(x_n), r_nk> / s_k`` (``s_k``
      the RMS of output k on the first batch, so each output counts on its own scale), one
      forward and backward per sample. Its gradient is ``g_n = J_n^T r_n`` (``J_n`` the
      Jacobian of the scaled outputs), and for any weight change ``d``,
      ``E_r[(d . g_n)^2] = d^T J_n^T J_n d = ||J_n d||^2``: the square of the per-sample
      first-order term is an unbiased estimate of the Gauss-Newton (second-order) change of
      the squared error to the dense model, ``D(w + d) ~ 1/2 sum_n ||J_n d||^2``. So in this
      mode the subclasses accumulate *squares* of per-sample terms (Fisher-style), see
      :class:`Taylor` and :class:`Gradient`. A batch splits into samples when all its
      inputs are tensors of one batch size; otherwise it counts as one sample (still
      unbiased: the cross terms of independent projections vanish in expectation).

    ``notes`` says which loss was used, for the report.
    """

    def __init__(self, analysis: Analysis, batches: list[Batch], seed: int = 0):
        super().__init__(analysis)
        pairs = [split(batch, error=PlanError) for batch in batches]
        self.label_free = any(targets is None for _, targets in pairs)
        self.batches: list[tuple[Inputs, torch.Tensor | None]] = \
            [(inputs, None) for inputs, _ in pairs] if self.label_free else \
            [labelled(batch, "a gradient criterion (taylor, gradient)", error=PlanError)
             for batch in batches]
        self.seed = seed
        self.loss: str | None = None if self.label_free else LABELS
        self.notes = {"label_free": self.label_free, "loss": self.loss}  # loss: once run
        self._grads: dict[str, torch.Tensor] | None = None

    @property
    def grads(self) -> dict[str, torch.Tensor]:
        if self._grads is None:
            self._grads = self._accumulate()
        return self._grads

    @property
    def projected(self) -> bool:
        """Whether the scores come from squared random projections (after scoring)."""
        self.grads  # noqa: B018 - the mode is known once the gradients are
        return self.loss == PROJECTION

    def _accumulate(self) -> dict[str, torch.Tensor]:
        model = self.analysis.capture.model
        device = device_of(model)
        tensors = {id(t): t for t in [*model.parameters(), *self.params.values()]}.values()
        saved = [(t, t.grad, t.requires_grad) for t in tensors]
        try:
            for t in tensors:
                t.grad = None
            for t in self.params.values():
                t.requires_grad_(True)
            with evaluation(model), torch.enable_grad():
                if self.label_free:
                    self._label_free(model, device)
                else:
                    for inputs, targets in self.batches:
                        output = first_tensor(run_batch(model, inputs.to(device)), error=PlanError)
                        F.cross_entropy(output, targets.to(output.device)).backward()
            self.notes["loss"] = self.loss
            if self.loss == PROJECTION:
                return self._projected_grads()
            return {name: torch.zeros_like(t) if t.grad is None else t.grad.detach().clone()
                    for name, t in self.params.items()}
        finally:
            for t, grad, flag in saved:
                t.grad = grad
                t.requires_grad_(flag)

    def _label_free(self, model: nn.Module, device: torch.device | None) -> None:
        """Backward passes of the label-free surrogate (see the class docstring)."""
        first = run_batch(model, self.batches[0][0].to(device))
        outputs = flatten_outputs(first)
        if len(outputs) == 1 and outputs[0].ndim == 2 and outputs[0].is_floating_point() \
                and outputs[0].shape[1] > 1 and outputs[0].requires_grad:
            self.loss = PSEUDO_LABELS
            for k, (inputs, _) in enumerate(self.batches):
                logits = outputs[0] if k == 0 else first_tensor(
                    run_batch(model, inputs.to(device)), error=PlanError)
                F.cross_entropy(logits, logits.detach().argmax(dim=1)).backward()
            return
        self.loss = PROJECTION
        scales = [float(t.detach().double().square().mean().sqrt())
                  if t.is_floating_point() and t.requires_grad and t.numel() else 0.0
                  for t in outputs]
        del first, outputs
        if not any(scales):
            raise PlanError("the model's outputs do not depend on its parameters on the "
                            "calibration batches: score it with l2 or activation instead")
        generator = torch.Generator().manual_seed(self.seed)
        samples = [s for inputs, _ in self.batches for s in _samples(inputs.to(device))]
        for sample in tqdm(samples, desc="label-free gradients", unit="sample", leave=False,
                           file=sys.stderr, disable=not sys.stderr.isatty()):
            outputs = flatten_outputs(run_batch(model, sample))
            loss = sum((t * torch.randn(t.shape, generator=generator).to(t)).sum() / scale
                       for t, scale in zip(outputs, scales, strict=False) if scale)
            loss.backward()
            self._take({name: t.grad for name, t in self.params.items()})
            for t in self.params.values():
                t.grad = None

    def _take(self, grads: dict[str, torch.Tensor | None]) -> None:
        """Add one sample's projected gradients (see the class docstring)."""
        raise NotImplementedError

    def _projected_grads(self) -> dict[str, torch.Tensor]:
        """The gradients the subclass reads after projected passes."""
        return {}


def run_batch(model: nn.Module, inputs: Inputs) -> Any:
    """``model`` on a calibration batch's ``inputs``; a failure is the data's (one
    :class:`PlanError` line)."""
    try:
        return inputs.call(model)
    except Exception as exc:  # noqa: BLE001 - the batch does not fit the model
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise PlanError(f"the model fails on a calibration batch ({type(exc).__name__}: "
                        f"{first}): give batches of the model's inputs") from exc


def _samples(inputs: Inputs) -> list[Inputs]:
    """``inputs`` one sample at a time when every input is a tensor with the same leading
    (batch) size; else the batch whole."""
    values = [*inputs.args, *inputs.kwargs.values()]
    sizes = {v.shape[0] if isinstance(v, torch.Tensor) and v.ndim else None for v in values}
    if len(sizes) != 1 or None in sizes:
        return [inputs]
    return [Inputs(tuple(v[i:i + 1] for v in inputs.args),
                   {k: v[i:i + 1] for k, v in inputs.kwargs.items()})
            for i in range(sizes.pop())]


def _slot_products(weight: torch.Tensor, grad: torch.Tensor, dim: int,
                   dtype: torch.dtype = torch.float64) -> np.ndarray:
    """sum(W[s] * G[s]) for every slice s along ``dim``, computed in ``dtype`` (float32 per
    sample: the weights are not copied to float64 once a sample), returned as float64."""
    if dtype == torch.float64:
        return (slices(weight, dim) * slices(grad, dim)).sum(dim=1).cpu().numpy()
    product = weight.detach().to(dtype) * grad.detach().to(dtype)
    return product.movedim(dim, 0).reshape(product.shape[dim], -1).sum(dim=1) \
        .double().cpu().numpy()


class Taylor(_Gradients):
    """First-order Taylor importance (Molchanov et al. 2019, "Importance Estimation for
    Neural Network Pruning", CVPR): the loss change from removing the unit, estimated as

        score(u) = | sum_{m in M} sum_{s in slots_m(u)} sum (W_m[s] * G_m[s]) |

    with G the gradient of the loss summed over the calibration batches (with labels
    sum_b CE(model(x_b), y_b); without, against pseudo-labels, see :class:`_Gradients`) and
    M the group's parameter members (buffers do not count): the whole group, one Taylor
    term. Without labels on a model whose output is not classifier-shaped, the per-sample
    terms of the random projections are squared and summed,

        score(u) = 1/2 sum_n ( sum_{m in M} sum_{s in slots_m(u)} sum (W_m[s] * g_n,m[s]) )^2

    an unbiased estimate of the second-order increase of 1/2 sum_n ||f(x_n) - f_dense(x_n)||^2
    (outputs scaled) when the unit's weights are zeroed."""

    def __init__(self, analysis: Analysis, batches: list[Batch], seed: int = 0):
        super().__init__(analysis, batches, seed)
        self._squares = np.zeros(self.components)  # per component, projected mode

    def products(self, key: Key) -> np.ndarray:
        return self.per_slot(key, lambda name, dim: _slot_products(
            self.params[name], self.grads[name], dim))

    def _take(self, grads: dict[str, torch.Tensor | None]) -> None:
        keys = [key for key in self.analysis.slots
                if self.is_parameter(key) and grads.get(key[0]) is not None]
        sums = self.component_sums(keys, lambda key: _slot_products(
            self.params[key[0]], grads[key[0]], key[1], torch.float32))
        self._squares += 0.5 * np.square(sums)

    def measure(self, group: Group) -> np.ndarray:
        if self.projected:
            return self._squares[group.units].copy()
        [(total, _)] = self.member_sums([group], self.is_parameter, self.products)
        return np.abs(total)


class Gradient(_Gradients):
    """Mean gradient magnitude: with G as for :class:`Taylor` and |s| the elements of a slice,

        score(u) = 1/|M| * sum_{m in M} sum_{s in slots_m(u)} mean |G_m[s]|

    averaged over the group's parameter members as :class:`Magnitude` averages. Without
    labels on a model whose output is not classifier-shaped, |G| is the root of the summed
    squares of the per-sample projected gradients, ``sqrt(sum_n g_n^2)`` elementwise: the
    root of an unbiased estimate of the Gauss-Newton diagonal (see :class:`_Gradients`)."""

    def __init__(self, analysis: Analysis, batches: list[Batch], seed: int = 0):
        super().__init__(analysis, batches, seed)
        self._squares: dict[str, torch.Tensor] = {}

    def _take(self, grads: dict[str, torch.Tensor | None]) -> None:
        for name, g in grads.items():
            if g is not None:
                square = g.detach().float().square()
                if name in self._squares:
                    self._squares[name] += square
                else:
                    self._squares[name] = square

    def _projected_grads(self) -> dict[str, torch.Tensor]:
        return {name: self._squares[name].sqrt() if name in self._squares
                else torch.zeros_like(t) for name, t in self.params.items()}

    def means(self, key: Key) -> np.ndarray:
        return self.per_slot(key, lambda name, dim: slices(self.grads[name], dim)
                             .abs().mean(dim=1).cpu().numpy())

    def measure(self, group: Group) -> np.ndarray:
        [(total, counted)] = self.member_sums([group], self.is_parameter, self.means)
        return total / max(counted, 1)


class _ConsumedActivations(fx.Interpreter):
    """Runs a graph and adds, for every consumption, sum |x| over all axes but its channel
    axes (``sums[k]``, shaped like those axes) and the number of elements summed
    (``counts[k]``)."""

    def __init__(self, module: fx.GraphModule, consumptions: list[Consumption]):
        super().__init__(module)
        self.at: dict[str, list[tuple[int, Consumption]]] = {}
        for k, c in enumerate(consumptions):
            self.at.setdefault(c.node, []).append((k, c))
        self.sums: list[np.ndarray] = [np.zeros(c.ids.shape) for c in consumptions]
        self.counts = np.zeros(len(consumptions))

    def run_node(self, n: fx.Node) -> Any:
        if n.name in self.at:
            args, kwargs = self.fetch_args_kwargs_from_env(n)
            for k, c in self.at[n.name]:
                x = args[c.arg] if isinstance(c.arg, int) else kwargs.get(c.arg)
                if not isinstance(x, torch.Tensor) or x.ndim != c.ndim \
                        or tuple(x.shape[d] for d in c.dims) != c.ids.shape:
                    continue
                rest = [d for d in range(x.ndim) if d not in c.dims]
                flat = x.detach().abs().permute(*c.dims, *rest).reshape(*c.ids.shape, -1)
                self.sums[k] += flat.double().sum(dim=-1).cpu().numpy()
                self.counts[k] += flat.shape[-1]
        return super().run_node(n)


def _fixed_batches(capture: Capture, inputs: tuple[Any, ...]) -> list[tuple[Any, ...]]:
    """``inputs`` as the graph takes them: whole for fx; for torch.export, whose graph holds
    the example inputs' batch size, cut into pieces of that size (a rest is left out)."""
    size = capture.example_inputs[0].shape[0] \
        if capture.method == "export" and isinstance(capture.example_inputs[0], torch.Tensor) \
        and capture.example_inputs[0].ndim else None
    if size is None or not isinstance(inputs[0], torch.Tensor) or inputs[0].shape[0] == size:
        return [inputs]
    pieces = [tuple(x[i:i + size] if isinstance(x, torch.Tensor) else x for x in inputs)
              for i in range(0, inputs[0].shape[0] - size + 1, size)]
    if not pieces:
        raise PlanError(f"the torch.export graph takes batches of {size}: pass calibration "
                        f"batches of {size} or more samples")
    return pieces


class Activation(Criterion):
    """Mean absolute activation of the unit's channel on the calibration batches, measured
    where the channel is consumed (the inputs the verifier zeroes: the next convs, linears,
    ...), with no gradients and the model in eval mode:

        a_e = mean over the batches' samples and the other axes of |x_e|
        score(u) = mean over e in E(u) of a_e

    with E(u) every consumption entry (a consumed input and a position along its channel
    axes) carrying u. A group with a unit consumed nowhere falls back to ``l2`` (listed in
    ``fallbacks``). The graph run is the captured one (``analysis.capture.graph_module``); a
    torch.export graph, fixed to the example batch size, takes the batches in pieces of it."""

    def __init__(self, analysis: Analysis, batches: list[Batch]):
        super().__init__(analysis)
        self.batches: list[Inputs] = [split(batch, error=PlanError)[0] for batch in batches]
        self._by_component: tuple[np.ndarray, np.ndarray] | None = None

    def _measure_all(self) -> tuple[np.ndarray, np.ndarray]:
        """Per component: the sum of its entries' mean |x|, and its number of entries."""
        capture, component = self.analysis.capture, self.analysis.component
        runner = _ConsumedActivations(capture.graph_module, self.analysis.consumptions)
        device = device_of(capture.model)
        with torch.no_grad(), evaluation(capture.model):  # fx: the same modules
            for batch in self.batches:
                # the graph takes positional inputs only: keyword ones go by forward()'s names
                args = batch.to(device).positional(capture.model.forward, error=PlanError)
                for inputs in _fixed_batches(capture, args):
                    runner.run(*inputs)
        n = self.components
        total, entries = np.zeros(n), np.zeros(n)
        for c, sums, count in zip(self.analysis.consumptions, runner.sums, runner.counts,
                                  strict=True):
            if count == 0:
                continue
            comps = component[c.ids.ravel()]
            total += np.bincount(comps, sums.ravel() / count, minlength=n)
            entries += np.bincount(comps, minlength=n)
        return total, entries

    def measure(self, group: Group) -> np.ndarray:
        if self._by_component is None:
            self._by_component = self._measure_all()
        total, entries = (a[group.units] for a in self._by_component)
        if (entries == 0).any():
            return self.fall_back(group)
        return total / entries


__all__ = ["FPGM", "LABELS", "LAMP", "PROJECTION", "PSEUDO_LABELS", "Activation", "Criterion",
           "Gradient", "Importance", "Magnitude", "NormScale", "Random", "Taylor",
           "is_norm_weight", "run_batch", "slice_norms", "slices"]
