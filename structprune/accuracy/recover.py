"""Recover: make a pruned model closer to the dense one without training.

:func:`recover` changes a pruned model in place, on a few calibration batches, so that its
outputs move back toward the dense model's. It only writes kept weights, biases and
BatchNorm statistics: no parameter is added, no shape changes, and the plan stays valid
(``apply_plan(dense, plan)`` and the recovered model have the same state_dict shapes).

Methods (one, or a list applied in order):

- ``"none"``: nothing (the report still gives the output error).
- ``"bn"``: BatchNorm recalibration (Li et al. 2020, "EagleEye"; "adaptive BN"). Pruning
  changes the distribution every BatchNorm after a pruned consumer sees, while its running
  statistics still describe the dense model. Every BatchNorm that tracks running statistics
  is reset and re-estimated on the batches: the model runs in eval mode except the BatchNorm
  layers, which run in train mode (normalising by batch statistics, as in training; dropout
  stays off), with ``momentum=None``. The running mean and variance written are the exact
  mean and unbiased variance of the layer's input pooled over all batches (each sample
  weighted alike, accumulated in float64), which is what torch's cumulative average gives for
  the mean; for the variance torch would average per-batch variances and miss the spread of
  the batch means. Flags and momenta are restored afterwards.
- ``"bias"``: bias compensation. A consumer (``nn.Conv1d/2d/3d`` with ``groups == 1``, or
  ``nn.Linear``) that lost input channels ``c`` misses, on average,
  ``shift[o] = sum_c mean_c * sum_taps W_dense[o, c, taps]``, where ``mean_c`` is the mean of
  input channel ``c`` of the *dense* model over the batches (over batch and space for a
  conv). The shift is added to the pruned layer's bias (its kept outputs). A layer without a
  bias whose only user in the dense graph is a BatchNorm gets it folded into that
  BatchNorm's ``running_mean`` (subtracted) instead; other layers without a bias are skipped.
  For a conv the shift is exact only away from the borders: with zero padding, the taps that
  fall on the padding contribute nothing there.
- ``"lsq"``: least-squares reconstruction (He et al. 2017, "Channel pruning"; ThiNet, Luo et
  al. 2017). Consumers are refitted one by one in the order the dense graph first calls
  them: the pruned model's input to the layer (with the earlier layers already refitted) is
  regressed on the dense model's output of the same layer (its kept outputs). Conv inputs
  are unfolded into patches (``F.unfold`` with the layer's kernel, dilation, padding and
  stride; only ``padding_mode="zeros"``), at most ``max_rows`` rows are drawn with a seeded
  generator, and ``[X, 1] [W, b]^T = Y`` is solved in float64 by ridge-regularised normal
  equations (ridge ``ridge * mean(diag(X^T X))`` on the weights, not on the bias; without a
  bias, no ones column). New weights are written only when they fit the rows better. Grouped
  convs, ``Conv1d/3d`` and other padding modes are skipped.

Sensible combinations are ``["bias", "bn"]`` (BN recalibration re-centres the layers followed
by a BatchNorm, bias compensation fixes those that are not, such as the classifier) and
``["lsq", "bn"]`` (reconstruct the consumers, then re-estimate the statistics of what they
now produce).

The returned report::

    {"method": [...],
     "layers": [{"module", "method", "rows", "mse_before", "mse_after", ...}, ...],
     "output_mse_before": x, "output_mse_after": y}

A layer's errors are mean squared errors against the dense model on the batches: for
``bn`` of the BatchNorm's output, for ``bias`` of the output of the tensor changed (the layer,
or the BatchNorm it was folded into), for ``lsq`` of the layer's output on the fitted rows;
skipped layers have ``"skipped"`` (the reason) and ``None`` errors. The output errors are of
the model's (floating) outputs, before and after all methods.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from structprune.batches import Batch, Inputs, call, flatten_outputs, split
from structprune.core.analyse import Analysis
from structprune.core.plan import Plan
from structprune.errors import StructPruneError
from structprune.tree import evaluation, resolve_target, tensor_index, training_mode

METHODS = ("none", "bn", "bias", "lsq")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_UNFOLD_ELEMENTS = 1 << 23  # patches unfolded at once, at most (32 MiB of float32)


@dataclass
class _Consumer:
    """A Conv/Linear of the dense model whose weight lost input channels in the plan."""

    name: str  # the module's name, the same in the dense and the pruned model
    dense: nn.Module
    pruned: nn.Module | None
    keep_in: torch.Tensor  # dense input channels kept
    drop_in: torch.Tensor  # dense input channels removed
    keep_out: torch.Tensor | None  # dense output channels kept; None: all
    skip: str | None = None  # why no method can touch it

    @property
    def channel_dim(self) -> int:
        return -1 if isinstance(self.dense, nn.Linear) else 1


def recover(pruned: nn.Module, dense: nn.Module, plan: Plan, analysis: Analysis,
            batches: Sequence[Batch], method: str | Sequence[str] = "bn", *,
            max_rows: int = 20_000, ridge: float = 1e-4, seed: int = 0) -> dict[str, Any]:
    """Bring ``pruned`` (changed in place) closer to ``dense`` on ``batches``; see the module
    docstring for the methods and the report returned.

    ``pruned`` is ``apply_plan(dense, plan)`` (e.g. ``prune(...).model``), ``analysis`` the
    analysis the plan was made from, ``batches`` a list of batches in any form of
    :mod:`structprune.batches` (targets, if any, are not used). ``method`` is one of
    ``"none"``, ``"bn"``, ``"bias"``, ``"lsq"`` or a list of them applied in order.
    ``max_rows``, ``ridge`` and ``seed`` tune ``lsq``. ``dense`` is never changed.
    """
    methods = [method] if isinstance(method, str) else list(method)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise StructPruneError(f"unknown recovery method {unknown[0]!r}: use one of "
                               f"{', '.join(METHODS)} or a list of them, e.g. ['bias', 'bn']")
    # each batch's inputs, taken out (and checked) once
    batches = [split(batch)[0] for batch in batches]
    if not batches:
        raise StructPruneError("recovery needs at least one calibration batch")
    if pruned is dense:
        raise StructPruneError("recover() changes the pruned model and compares it with the "
                               "dense one: pass two different models")
    if max_rows < 1 or ridge < 0:
        raise StructPruneError(f"max_rows ({max_rows}) must be 1 or more and ridge ({ridge}) "
                               "0 or more")
    report: dict[str, Any] = {"method": methods, "layers": []}
    with torch.no_grad():
        report["output_mse_before"] = output_mse(pruned, dense, batches)
        consumers = _consumers(pruned, dense, plan)
        graph = _Graph(analysis, dense)
        for name in methods:
            if name == "bn":
                layers = _recalibrate(pruned, dense, plan, batches)
            elif name == "bias":
                layers = _compensate(pruned, dense, plan, graph, consumers, batches)
            elif name == "lsq":
                layers = _reconstruct(pruned, dense, graph, consumers, batches, max_rows,
                                      ridge, seed)
            else:
                layers = []
            report["layers"].extend(layers)
        report["output_mse_after"] = output_mse(pruned, dense, batches)
    return report


# ------------------------------------------------------------------------- running models


def _module_input(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The input of a layer's call (its first argument), when it is a tensor."""
    value = args[0] if args else kwargs.get("input", next(iter(kwargs.values()), None))
    return value if isinstance(value, torch.Tensor) else None


class _Hooks:
    """Forward hooks and pre-hooks removed on exit."""

    def __init__(self) -> None:
        self.handles: list[Any] = []

    def pre(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        def hook(_module: nn.Module, args: tuple, kwargs: dict) -> None:
            x = _module_input(args, kwargs)
            if x is not None:
                fn(x.detach())
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def post(self, module: nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        def hook(_module: nn.Module, _args: tuple, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                fn(output.detach())
        self.handles.append(module.register_forward_hook(hook))

    def __enter__(self) -> _Hooks:
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()


def output_mse(pruned: nn.Module, dense: nn.Module, batches: Iterable[Batch]) -> float:
    """Mean squared error of ``pruned``'s floating outputs against ``dense``'s (eval mode),
    over all their elements and ``batches``; NaN when no output pair has equal shapes."""
    total, count = 0.0, 0
    with torch.no_grad(), evaluation(pruned, dense):
        for batch in batches:
            want, got = flatten_outputs(call(dense, batch)), flatten_outputs(call(pruned, batch))
            for w, g in zip(want, got, strict=False):
                if w.shape == g.shape and w.is_floating_point() and g.is_floating_point():
                    total += float((g.double() - w.to(g.device).double()).square().sum())
                    count += g.numel()
    return total / count if count else math.nan


def _site_mse(pruned: nn.Module, dense: nn.Module, batches: Sequence[Inputs],
              sites: dict[str, tuple[int, torch.Tensor | None]]) -> dict[str, float]:
    """Per module name: the mean squared error of the pruned module's output against the
    dense one's (along ``dim``, only the channels ``keep``), eval mode, over ``batches``."""
    dense_modules, pruned_modules = dict(dense.named_modules()), dict(pruned.named_modules())
    errors = {name: [0.0, 0] for name in sites}
    wanted: dict[str, list[torch.Tensor]] = {name: [] for name in sites}

    def store(name: str) -> Callable[[torch.Tensor], None]:
        dim, keep = sites[name]

        def fn(y: torch.Tensor) -> None:
            wanted[name].append(y if keep is None else y.index_select(dim, keep.to(y.device)))
        return fn

    def measure(name: str) -> Callable[[torch.Tensor], None]:
        def fn(y: torch.Tensor) -> None:
            if wanted[name]:
                w = wanted[name].pop(0)
                if w.shape == y.shape:
                    errors[name][0] += float((y.double() - w.to(y.device).double())
                                             .square().sum())
                    errors[name][1] += y.numel()
        return fn

    with torch.no_grad(), evaluation(pruned, dense), _Hooks() as hooks:
        for name in sites:
            hooks.post(dense_modules[name], store(name))
            hooks.post(pruned_modules[name], measure(name))
        for batch in batches:
            call(dense, batch)
            call(pruned, batch)
            for stored in wanted.values():
                stored.clear()
    return {name: (s / n if n else math.nan) for name, (s, n) in errors.items()}


# ------------------------------------------------------------------------- what to recover


def _plan_entries(plan: Plan) -> dict[tuple[str, int], dict]:
    return {(entry["name"], entry["dim"]): entry for entry in plan.params}


def _kept(entry: dict | None) -> torch.Tensor | None:
    return None if entry is None else torch.tensor(entry["keep"], dtype=torch.long)


def _consumers(pruned: nn.Module, dense: nn.Module, plan: Plan) -> list[_Consumer]:
    """The dense model's Conv/Linear layers whose weight's input axis the plan slices."""
    entries = _plan_entries(plan)
    canonical = tensor_index(dense).canonical
    pruned_modules = dict(pruned.named_modules())
    found = []
    for name, module in dense.named_modules():
        weight = getattr(module, "weight", None)
        if not isinstance(module, (nn.Linear, *CONVS, *TRANSPOSED)) \
                or not isinstance(weight, torch.Tensor):
            continue
        weight_name = canonical.get(id(weight))
        # a transposed conv's weight holds its input channels on axis 0
        entry = entries.get((weight_name, 0 if isinstance(module, TRANSPOSED) else 1))
        if entry is None:
            continue
        keep_in = _kept(entry)
        drop = torch.ones(entry["size"], dtype=torch.bool)
        drop[keep_in] = False
        keep_out = None if isinstance(module, TRANSPOSED) else \
            _kept(entries.get((weight_name, 0)))
        consumer = _Consumer(name, module, pruned_modules.get(name), keep_in,
                             torch.nonzero(drop).flatten(), keep_out)
        consumer.skip = _why_not(consumer)
        found.append(consumer)
    return found


def _why_not(c: _Consumer) -> str | None:
    if isinstance(c.dense, TRANSPOSED):
        return "transposed convolution (not handled)"
    if isinstance(c.dense, CONVS) and c.dense.groups != 1:
        return f"grouped convolution (groups={c.dense.groups})"
    if c.pruned is None or type(c.pruned) is not type(c.dense):
        return "not found in the pruned model under the same name"
    dense_shape = list(c.dense.weight.shape)
    dense_shape[1] = len(c.keep_in)
    if c.keep_out is not None:
        dense_shape[0] = len(c.keep_out)
    if list(c.pruned.weight.shape) != dense_shape:
        return (f"pruned weight shape {tuple(c.pruned.weight.shape)} does not follow the plan "
                f"({tuple(dense_shape)})")
    return None


class _Graph:
    """The dense fx graph's call_module nodes, by module name in ``dense``."""

    def __init__(self, analysis: Analysis, dense: nn.Module):
        gm = analysis.capture.graph_module
        names = {id(m): n for n, m in dense.named_modules()}
        self.calls: dict[str, list[Any]] = {}  # module name -> its call nodes, graph order
        self.name_of: dict[Any, str] = {}
        for node in analysis.capture.graph.nodes:
            if node.op != "call_module":
                continue
            try:
                target = resolve_target(gm, node.target)
            except AttributeError:
                continue
            name = names.get(id(target), node.target)
            self.name_of[node] = name
            self.calls.setdefault(name, []).append(node)
        self.order = {name: i for i, name in enumerate(self.calls)}

    def only_user(self, name: str) -> str | None:
        """The module that alone uses ``name``'s only call, if a module does."""
        nodes = self.calls.get(name, [])
        if len(nodes) != 1 or len(nodes[0].users) != 1:
            return None
        user = next(iter(nodes[0].users))
        return self.name_of.get(user)


def _skipped(c: _Consumer, method: str, reason: str) -> dict[str, Any]:
    return {"module": c.name, "method": method, "rows": 0, "mse_before": None,
            "mse_after": None, "skipped": reason}


# ------------------------------------------------------------------------------------- bn


class _Moments:
    """Count, mean and sum of squared deviations per channel, merged batch by batch (Chan
    et al.) in float64."""

    def __init__(self) -> None:
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def add(self, x: torch.Tensor) -> None:
        rows = x.movedim(1, -1).reshape(-1, x.shape[1]).double() if x.ndim > 1 else \
            x.double().reshape(-1, 1)
        n = rows.shape[0]
        if n == 0:
            return
        mean = rows.mean(0)
        m2 = (rows - mean).square().sum(0)
        if self.mean is None:
            self.count, self.mean, self.m2 = n, mean, m2
            return
        total = self.count + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.count * n / total)
        self.count = total


def _recalibrate(pruned: nn.Module, dense: nn.Module, plan: Plan, batches: Sequence[Inputs],
                 ) -> list[dict[str, Any]]:
    norms = {name: m for name, m in pruned.named_modules()
             if isinstance(m, BATCH_NORMS) and m.track_running_stats
             and m.running_mean is not None and m.running_var is not None}
    if not norms:
        return []
    entries = _plan_entries(plan)
    canonical = tensor_index(dense).canonical
    dense_modules = dict(dense.named_modules())
    sites = {}
    for name in norms:
        other = dense_modules.get(name)
        if isinstance(other, BATCH_NORMS) and other.running_mean is not None:
            sites[name] = (1, _kept(entries.get((canonical.get(id(other.running_mean)), 0))))
    before = _site_mse(pruned, dense, batches, sites)
    moments = {name: _Moments() for name in norms}
    momenta = {name: m.momentum for name, m in norms.items()}
    try:
        with training_mode(pruned, training=False), _Hooks() as hooks:
            for name, m in norms.items():
                m.train()
                m.reset_running_stats()
                m.momentum = None  # cumulative average, overwritten by the pooled moments
                hooks.pre(m, moments[name].add)
            for batch in batches:
                call(pruned, batch)
    finally:
        for name, m in norms.items():
            m.momentum = momenta[name]
    for name, m in norms.items():
        stats = moments[name]
        if stats.mean is None or stats.mean.numel() != m.running_mean.numel():
            continue
        m.running_mean.copy_(stats.mean.to(m.running_mean))
        if stats.count > 1:
            m.running_var.copy_((stats.m2 / (stats.count - 1)).to(m.running_var))
    after = _site_mse(pruned, dense, batches, sites)
    return [{"module": name, "method": "bn", "rows": moments[name].count,
             "mse_before": before.get(name), "mse_after": after.get(name)} for name in norms]


# ----------------------------------------------------------------------------------- bias


def _compensate(pruned: nn.Module, dense: nn.Module, plan: Plan, graph: _Graph,
                consumers: list[_Consumer], batches: Sequence[Inputs]) -> list[dict[str, Any]]:
    entries = _plan_entries(plan)
    canonical = tensor_index(dense).canonical
    dense_modules, pruned_modules = dict(dense.named_modules()), dict(pruned.named_modules())
    layers: list[dict[str, Any]] = []
    todo: list[tuple[_Consumer, str, torch.Tensor, int, torch.Tensor | None]] = []
    for c in consumers:
        if c.skip:
            layers.append(_skipped(c, "bias", c.skip))
            continue
        if c.pruned.bias is not None:
            todo.append((c, c.name, c.pruned.bias, c.channel_dim, c.keep_out))
            continue
        user = graph.only_user(c.name)
        norm, dense_norm = pruned_modules.get(user), dense_modules.get(user)
        size = len(c.keep_out) if c.keep_out is not None else c.dense.weight.shape[0]
        if isinstance(norm, BATCH_NORMS) and isinstance(dense_norm, BATCH_NORMS) \
                and norm.track_running_stats and norm.running_mean is not None \
                and norm.running_mean.numel() == size:
            keep = _kept(entries.get((canonical.get(id(dense_norm.running_mean)), 0)))
            todo.append((c, user, norm.running_mean, 1, keep))
            continue
        layers.append(_skipped(c, "bias", "no bias, and its output does not go to a "
                               "BatchNorm alone"))
    if not todo:
        return layers
    sums: dict[str, list[Any]] = {c.name: [0.0, 0] for c, *_ in todo}

    def accumulate(c: _Consumer) -> Callable[[torch.Tensor], None]:
        def fn(x: torch.Tensor) -> None:
            removed = x.index_select(c.channel_dim, c.drop_in.to(x.device))
            rows = removed.movedim(c.channel_dim, -1).reshape(-1, len(c.drop_in)).double()
            sums[c.name][0] = sums[c.name][0] + rows.sum(0).cpu()
            sums[c.name][1] += rows.shape[0]
        return fn

    with evaluation(dense), _Hooks() as hooks:
        for c, *_ in todo:
            hooks.pre(c.dense, accumulate(c))
        for batch in batches:
            call(dense, batch)
    sites = {site: (dim, keep) for _, site, _, dim, keep in todo}
    before = _site_mse(pruned, dense, batches, sites)
    for c, site, target, _, _ in todo:
        total, count = sums[c.name]
        if not count:
            continue
        weight = c.dense.weight.detach().double().cpu().index_select(1, c.drop_in)
        shift = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(-1) @ (total / count)
        if c.keep_out is not None:
            shift = shift.index_select(0, c.keep_out)
        shift = shift.to(target)
        if site == c.name:
            target.add_(shift)
        else:
            target.sub_(shift)
    after = _site_mse(pruned, dense, batches, sites)
    for c, site, _, _, _ in todo:
        how = "bias" if site == c.name else f"folded into {site}.running_mean"
        layers.append({"module": c.name, "method": "bias", "rows": sums[c.name][1],
                       "mse_before": before[site], "mse_after": after[site], "target": how,
                       "measured_at": site})
    return layers


# ------------------------------------------------------------------------------------ lsq


def _padding(conv: nn.Conv2d) -> tuple[int, int] | None:
    """The conv's padding as numbers for F.unfold, or None when it is asymmetric."""
    if not isinstance(conv.padding, str):
        return tuple(conv.padding)
    if conv.padding == "valid":
        return (0, 0)
    totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size, strict=True)]
    if any(t % 2 for t in totals):
        return None
    return tuple(t // 2 for t in totals)


def _lsq_skip(c: _Consumer) -> str | None:
    if c.skip:
        return c.skip
    if not isinstance(c.dense, (nn.Conv2d, nn.Linear)):
        return f"lsq handles Conv2d and Linear, not {type(c.dense).__name__}"
    if isinstance(c.dense, nn.Conv2d):
        if c.dense.padding_mode != "zeros":
            return f"padding_mode {c.dense.padding_mode!r} (lsq unfolds with zero padding)"
        if _padding(c.dense) is None:
            return "asymmetric 'same' padding"
    return None


def _rows(module: nn.Module, x: torch.Tensor, y: torch.Tensor, budget: int,
          gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``budget`` random rows of (input patches, dense output), float64 on the CPU."""
    if isinstance(module, nn.Linear):
        xs, ys = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        pick = torch.randperm(xs.shape[0], generator=gen)[:budget].sort().values
        return xs[pick.to(xs.device)].double().cpu(), ys[pick.to(ys.device)].double().cpu()
    n, outs = y.shape[0], y.shape[1]
    length = y[0, 0].numel()
    ys = y.reshape(n, outs, length).transpose(1, 2).reshape(-1, outs)
    pick = torch.randperm(n * length, generator=gen)[:budget].sort().values
    width = x.shape[1] * math.prod(module.kernel_size)
    per = max(1, _UNFOLD_ELEMENTS // max(1, width * length))
    parts = []
    for start in range(0, n, per):
        lo, hi = start * length, min(n, start + per) * length
        sel = pick[(pick >= lo) & (pick < hi)] - lo
        if sel.numel():
            chunk = x[start:start + per]
            # the samples side by side as channels of one image: the same patches, in one
            # parallel region instead of one per sample
            cols = F.unfold(chunk.reshape(1, -1, *chunk.shape[2:]), module.kernel_size,
                            module.dilation, _padding(module), module.stride)
            cols = cols.reshape(chunk.shape[0], width, -1)
            if cols.shape[-1] != length:
                raise RuntimeError(f"unfold gave {cols.shape[-1]} positions, the conv {length}")
            parts.append(cols.transpose(1, 2).reshape(-1, width)[sel.to(cols.device)]
                         .double().cpu())
    return torch.cat(parts), ys[pick.to(ys.device)].double().cpu()


def _solve(x: torch.Tensor, y: torch.Tensor, with_bias: bool, ridge: float,
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Ridge least squares ``[x, 1] [w, b]^T ~ y`` by the normal equations, in float64."""
    width = x.shape[1]
    a = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], 1) if with_bias else x
    gram = a.T @ a
    diag = gram.diagonal()[:width]
    lam = ridge * float(diag.mean()) if width else 0.0
    if lam <= 0 and ridge > 0:
        lam = ridge
    idx = torch.arange(width)
    gram[idx, idx] += lam
    solution = torch.linalg.lstsq(gram, a.T @ y).solution if lam == 0 else \
        torch.linalg.solve(gram, a.T @ y)
    return solution[:width].T, (solution[width] if with_bias else None)


def _mse(x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> float:
    pred = x @ w.T
    if b is not None:
        pred = pred + b
    return float((pred - y).square().mean())


def _reconstruct(pruned: nn.Module, dense: nn.Module, graph: _Graph,
                 consumers: list[_Consumer], batches: Sequence[Inputs], max_rows: int,
                 ridge: float, seed: int) -> list[dict[str, Any]]:
    layers = []
    order = sorted(consumers, key=lambda c: graph.order.get(c.name, len(graph.order)))
    budget = max(1, -(-max_rows // len(batches)))  # rows per batch
    for c in order:
        reason = _lsq_skip(c)
        if reason:
            layers.append(_skipped(c, "lsq", reason))
            continue
        gen = torch.Generator().manual_seed(seed)
        xs, ys = [], []
        inputs: list[torch.Tensor] = []
        outputs: list[torch.Tensor] = []
        with evaluation(pruned, dense), _Hooks() as hooks:
            hooks.pre(c.pruned, inputs.append)
            hooks.post(c.dense, outputs.append)
            for batch in batches:
                call(dense, batch)
                call(pruned, batch)
                for x, y in zip(inputs, outputs, strict=False):
                    if c.keep_out is not None:
                        y = y.index_select(c.channel_dim, c.keep_out.to(y.device))
                    rx, ry = _rows(c.dense, x, y, budget, gen)
                    xs.append(rx)
                    ys.append(ry)
                inputs.clear()
                outputs.clear()
        if not xs:
            layers.append(_skipped(c, "lsq", "not called on the batches"))
            continue
        x, y = torch.cat(xs), torch.cat(ys)
        weight, bias = c.pruned.weight, c.pruned.bias
        old_w = weight.detach().double().cpu().reshape(weight.shape[0], -1)
        old_b = None if bias is None else bias.detach().double().cpu()
        new_w, new_b = _solve(x, y, bias is not None, ridge)
        before, after = _mse(x, y, old_w, old_b), _mse(x, y, new_w, new_b)
        entry = {"module": c.name, "method": "lsq", "rows": int(x.shape[0]),
                 "mse_before": before, "mse_after": after}
        if after < before:
            weight.copy_(new_w.reshape(weight.shape).to(weight))
            if bias is not None:
                bias.copy_(new_b.to(bias))
        else:
            entry["mse_after"] = before
            entry["kept"] = "the fit was no better than the pruned weights"
        layers.append(entry)
    return layers
