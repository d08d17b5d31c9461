"""Recover: make a pruned model closer to the dense one without training.

:func:`recover` changes a pruned model in place, on a few calibration batches, so that its
outputs move back toward the dense model's. It only writes kept weights, biases and
BatchNorm statistics: no parameter is added, no shape changes, and the plan stays valid
(``apply_plan(dense, plan)`` and the recovered model have the same state_dict shapes).

**Fit and check.** The batches are split before anything is fitted: every 4th batch checks
(or, with fewer than 4, the last one; with a single batch, its last quarter of samples;
with a single sample, that sample itself, and ``lsq`` checks each layer on rows it did not
fit), at most ``check_samples`` samples in all; the other batches fit. A method is kept only
if the model's output error against the dense model on the check samples goes down;
otherwise everything it wrote is put back and its step says ``"undone"`` with the reason.

Methods (one, or a list applied in order):

- ``"none"``: nothing (the report still gives the output error).
- ``"bn"``: BatchNorm recalibration (Li et al. 2020, "EagleEye"; "adaptive BN"). Pruning
  changes the distribution every BatchNorm after a pruned consumer sees, while its running
  statistics still describe the dense model. Every BatchNorm that tracks running statistics
  is reset and re-estimated on all the fit batches: the model runs in eval mode except the
  BatchNorm layers, which run in train mode (normalising by batch statistics, as in
  training; dropout stays off), with ``momentum=None``. The running mean and variance
  written are the exact mean and unbiased variance of the layer's input pooled over all fit
  batches (each sample weighted alike, accumulated in float64), which is what torch's
  cumulative average gives for the mean; for the variance torch would average per-batch
  variances and miss the spread of the batch means. Flags and momenta are restored
  afterwards.
- ``"bias"``: bias compensation. A consumer (``nn.Conv1d/2d/3d`` with ``groups == 1``, or
  ``nn.Linear``) that lost input channels ``c`` misses, on average,
  ``shift[o] = sum_c mean_c * sum_taps W_dense[o, c, taps]``, where ``mean_c`` is the mean of
  input channel ``c`` of the *dense* model over the fit batches (over batch and space for a
  conv). The shift is added to the pruned layer's bias (its kept outputs). A layer without a
  bias whose only user in the dense graph is a BatchNorm gets it folded into that
  BatchNorm's ``running_mean`` (subtracted) instead; other layers without a bias are skipped.
  For a conv the shift is exact only away from the borders: with zero padding, the taps that
  fall on the padding contribute nothing there.
- ``"lsq"``: least-squares reconstruction (He et al. 2017, "Channel pruning"; ThiNet, Luo et
  al. 2017). The layers refitted are the ``Conv1d/2d/3d`` and ``Linear`` layers that lost
  input channels, and the grouped and depthwise convs that lost groups; they are refitted one
  by one in the order the model calls them: the pruned model's input to the layer (with the
  earlier layers already refitted) is regressed on the dense model's output of the same
  layer (its kept outputs), each group of a grouped conv on its own. At most
  ``lsq_samples`` fit samples are used (by default every fit sample, up to a dense forward
  of 1e12 multiply-adds: a few hundred small images, 64 of VGG16 at 224); at most
  ``max_rows`` rows (output positions) are drawn from them with a seeded generator, and
  ``max_rows / 4`` from the check samples. A
  conv's rows are its receptive fields, gathered at the drawn positions with the layer's
  kernel, stride, dilation and zero padding (``padding_mode="zeros"`` only). The problem
  ``[X, 1] [W, b]^T = Y`` is ridge-regularised (``ridge * mean(diag(X^T X))`` on the
  weights, not on the bias) and solved in float64, the rows streamed in chunks, never all
  at once. A layer without a bias keeps none: when its output goes to a BatchNorm alone, the
  intercept ``b`` is subtracted from that BatchNorm's ``running_mean`` (the same function;
  ResNet-20 at 0.5: 80.1% -> 81.2%), otherwise there is no ones column. The memory each
  layer needs is planned before anything is allocated, against ``memory_budget``, and of
  the solvers that fit, the one with the fewest multiply-adds is chosen: the normal equations (``gram``: each chunk's
  ``X^T X`` and ``X^T Y`` multiplied in float32, summed in float64), their dual form for
  fewer rows than columns (``kernel``: ``X X^T``, from all the rows at once), or conjugate
  gradients on the normal equations (``cg``: Jacobi-preconditioned, from the pruned
  weights, ``X^T (X P)`` summed over streamed row chunks, only a few weight-sized matrices
  held); a layer none of them fits is skipped with the reason. New weights are written only
  when they bring the layer's output closer to the dense one on the check rows.

  The dense model runs once on the fit samples (keeping only the drawn rows of each layer's
  output); the pruned model then runs once on the fit and check samples joined into one
  batch, each layer refitted by a hook as the forward reaches it, so the layers after it see
  its new output. When the samples cannot be joined (inputs that differ beyond their batch
  axis) or a layer is called more than once per forward, the pruned model instead runs, for
  each layer, only as far as that layer.

Sensible combinations are ``["bias", "bn"]`` (BN recalibration re-centres the layers followed
by a BatchNorm, bias compensation fixes those that are not, such as the classifier) and
``["lsq", "bn"]`` (reconstruct the consumers, then re-estimate the statistics of what they
now produce).

The returned report::

    {"method": [...],
     "layers": [{"module", "method", "rows", "mse_before", "mse_after", ...}, ...],
     "steps": [{"method", "check_mse_before", "check_mse_after", ["undone"]}, ...],
     "output_mse_before": x, "output_mse_after": y,
     "check": {"how", "batches", "samples", "fit_batches"},
     "memory": {"budget_bytes", "budget_from", ...}}

``output_mse_before`` and ``output_mse_after`` are the mean squared errors of the model's
(floating) outputs against the dense model's on the check samples, before and after all
methods; each step gives the same figure before and after its method. A layer's errors are
mean squared errors against the dense model: for ``bn`` of the BatchNorm's output, for
``bias`` of the output of the tensor changed (the layer, or the BatchNorm it was folded into),
both on drawn rows of the check samples; for ``lsq`` of the layer's output on the fitted rows
(``mse_before``/``mse_after``) and on the check rows (``check_mse_before``/
``check_mse_after``), with the memory plan (``"plan": {"method", "bytes_needed",
"bytes_allowed", "gram_bytes", "kernel_bytes", "cg_bytes", ...}``, and for ``cg`` its
iterations and final relative residual); the fit rows' errors come from the normal
equations' quadratic form, exact to about 1e-6 of the targets' energy. Skipped layers have
``"skipped"`` (the reason) and ``None`` errors; an ``lsq`` layer or a whole method whose
change was put back has ``"undone"`` (the reason). ``memory`` gives the budget and, with
``lsq``, the samples it used, the rows drawn per layer, the bytes held across layers and how
the pruned model was run.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from tqdm import tqdm

from structprune.batches import Batch, Inputs, call, flatten_outputs, split
from structprune.config import memory_size
from structprune.core.analyse import Analysis
from structprune.core.counts import count_macs
from structprune.core.plan import Plan
from structprune.errors import StructPruneError
from structprune.tree import evaluation, resolve_target, tensor_index, training_mode

METHODS = ("none", "bn", "bias", "lsq")
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
CHECK_EVERY = 4  # every 4th calibration batch checks, the others fit
SITE_ROWS = 1024  # rows of a layer's output drawn from the check samples to report its error
CHUNK_BYTES = 1 << 26  # rows gathered at once: 64 MiB of float32
LIVE_ACTIVATIONS = 4  # a forward holds about this many of its largest activations at once
CG_ITERATIONS = 50  # from the pruned weights; the check rows judge where they stop
CG_TOLERANCE = 1e-5  # relative residual of the normal equations, per output
# lsq's default sample count: every fit sample, as long as one dense forward of them stays
# under this many multiply-adds (10-20 s on two CPU cores); more samples fit the layers fed
# one row per sample (a classifier) far better, 32 always
LSQ_FORWARD_MACS = 1e12
LSQ_MIN_SAMPLES = 32


@dataclass
class _Consumer:
    """A Conv/Linear of the dense model that lost input channels (``keep_in`` not None) or,
    for a grouped conv, whole groups (``keep_out`` then says which outputs stay)."""

    name: str  # the module's name, the same in the dense and the pruned model
    dense: nn.Module
    pruned: nn.Module | None
    keep_in: torch.Tensor | None  # dense input channels kept; None: the input axis is whole
    drop_in: torch.Tensor  # dense input channels removed
    keep_out: torch.Tensor | None  # dense output channels kept; None: all
    skip: str | None = None  # why no method can touch it

    @property
    def channel_dim(self) -> int:
        return -1 if isinstance(self.dense, nn.Linear) else 1


def recover(pruned: nn.Module, dense: nn.Module, plan: Plan, analysis: Analysis,
            batches: Sequence[Batch], method: str | Sequence[str] = "bn", *,
            max_rows: int = 20_000, ridge: float = 1e-4, seed: int = 0,
            lsq_samples: int | None = None, check_samples: int = 16,
            memory_budget: int | str | None = None, progress: bool = False,
            ) -> dict[str, Any]:
    """Bring ``pruned`` (changed in place) closer to ``dense`` on ``batches``; see the module
    docstring for the methods, the fit/check split and the report returned.

    ``pruned`` is ``apply_plan(dense, plan)`` (e.g. ``prune(...).model``), ``analysis`` the
    analysis the plan was made from, ``batches`` a list of batches in any form of
    :mod:`structprune.batches` (targets, if any, are not used). ``method`` is one of
    ``"none"``, ``"bn"``, ``"bias"``, ``"lsq"`` or a list of them applied in order.
    ``max_rows``, ``ridge``, ``seed`` and ``lsq_samples`` (fit samples it uses, at most;
    None: as many as :func:`lsq_sample_count` allows) tune ``lsq``; ``check_samples`` caps the samples every step is checked on;
    ``memory_budget`` (bytes or a string such as ``"8G"``; None: half of the memory available
    now) bounds what ``lsq`` allocates; ``progress`` shows a bar per layer (lsq) and per batch
    (bn) on stderr. ``dense`` is never changed.
    """
    methods = [method] if isinstance(method, str) else list(method)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise StructPruneError(f"unknown recovery method {unknown[0]!r}: use one of "
                               f"{', '.join(METHODS)} or a list of them, e.g. ['bias', 'bn']")
    # each batch's inputs, taken out (and checked) once
    inputs = [split(batch)[0] for batch in batches]
    if not inputs:
        raise StructPruneError("recovery needs at least one calibration batch")
    if pruned is dense:
        raise StructPruneError("recover() changes the pruned model and compares it with the "
                               "dense one: pass two different models")
    if lsq_samples is None:
        lsq_samples = lsq_sample_count(analysis, inputs)
    if max_rows < 1 or ridge < 0 or lsq_samples < 1 or check_samples < 1:
        raise StructPruneError(f"max_rows ({max_rows}), lsq_samples ({lsq_samples}) and "
                               f"check_samples ({check_samples}) must be 1 or more and ridge "
                               f"({ridge}) 0 or more")
    budget = memory_size(memory_budget)
    memory = {"budget_bytes": budget if budget is not None else available_memory() // 2,
              "budget_from": "memory_budget" if budget is not None else
              "half of the memory available"}
    fit, check, how = _fit_and_check(inputs, check_samples)
    report: dict[str, Any] = {"method": methods, "layers": [], "steps": []}
    with torch.no_grad():
        layers = _consumers(pruned, dense, plan)
        graph = _Graph(analysis, dense)
        checker = _Check(dense, check, fit is check,
                         _sites(pruned, dense, plan, layers, methods, max_rows, memory), seed)
        error, at_sites = checker.measure(pruned)
        report["output_mse_before"] = error
        for name in methods:
            if name == "none":
                continue
            undo = _Undo()
            try:
                if name == "bn":
                    entries = _recalibrate(pruned, fit, undo, progress)
                elif name == "bias":
                    entries = _compensate(pruned, dense, plan, graph, layers, fit, undo)
                else:
                    entries = _Reconstruction(pruned, dense, graph, checker, fit, memory,
                                              max_rows, ridge, seed, lsq_samples,
                                              progress).run(layers, undo)
            except BaseException:  # a failed step leaves the model as it found it
                undo.restore()
                raise
            after, after_sites = checker.measure(pruned) if undo else (error, at_sites)
            for entry in entries:
                site = entry.pop("_site", None)
                if site is not None:
                    entry["mse_before"], entry["mse_after"] = \
                        at_sites.get(site), after_sites.get(site)
            step = {"method": name, "check_mse_before": error, "check_mse_after": after}
            if undo and (math.isnan(error) or math.isnan(after)):
                step["unchecked"] = "the models' outputs cannot be compared"
            elif undo and not after < error:
                undo.restore()
                reason = (f"the output error on the {checker.samples} check samples did not go "
                          f"down ({error:.4g} -> {after:.4g})")
                step["undone"] = reason
                for entry in entries:
                    if not entry.get("skipped"):
                        entry.setdefault("undone", f"{name} undone as a whole: {reason}")
                after, after_sites = error, at_sites
            error, at_sites = after, after_sites
            report["steps"].append(step)
            report["layers"].extend(entries)
        report["output_mse_after"] = error
    report["check"] = {"how": how, "batches": len(check), "samples": checker.samples,
                       "fit_batches": len(fit)}
    report["memory"] = memory
    return report


def lsq_sample_count(analysis: Analysis, inputs: Sequence[Inputs]) -> int:
    """lsq's default number of fit samples: as many as keep one dense forward of them under
    :data:`LSQ_FORWARD_MACS` multiply-adds (the capture's count, scaled by the calibration
    inputs' size per sample against the example's), at least :data:`LSQ_MIN_SAMPLES`."""
    example = flatten_outputs(analysis.capture.example_inputs)
    given = flatten_outputs((inputs[0].args, inputs[0].kwargs))
    if not example or not given or not example[0].dim() or not given[0].dim():
        return LSQ_MIN_SAMPLES
    per_example = count_macs(analysis.capture) / example[0].shape[0]
    scale = (given[0][0].numel() / max(1, example[0][0].numel()))
    per_sample = per_example * scale
    if per_sample <= 0:
        return sys.maxsize
    return max(LSQ_MIN_SAMPLES, int(LSQ_FORWARD_MACS // per_sample))


def available_memory() -> int:
    """Bytes of memory available now (psutil, else /proc/meminfo; 4 GiB when neither
    says)."""
    try:
        import psutil
        return int(psutil.virtual_memory().available)
    except ImportError:
        pass
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 4 << 30


# ------------------------------------------------------------------------ samples and sets


def _tensors(inputs: Inputs) -> list[torch.Tensor]:
    return [v for v in (*inputs.args, *inputs.kwargs.values()) if isinstance(v, torch.Tensor)]


def _samples(inputs: Inputs) -> int | None:
    """The batch size: the first axis its input tensors share (None: none, or they differ)."""
    sizes = {v.shape[0] if v.ndim else None for v in _tensors(inputs)}
    return sizes.pop() if len(sizes) == 1 else None


def _slice(inputs: Inputs, start: int, stop: int) -> Inputs:
    """Samples ``start:stop`` of a batch whose size is known."""
    def cut(v: Any) -> Any:
        return v[start:stop] if isinstance(v, torch.Tensor) else v
    return Inputs(tuple(cut(v) for v in inputs.args),
                  {k: cut(v) for k, v in inputs.kwargs.items()})


def _take(parts: Sequence[Inputs], count: int) -> tuple[list[Inputs], int]:
    """The first ``count`` samples of ``parts`` (the last part cut) and how many that is; a
    batch whose size is unknown counts as one sample and is never cut."""
    taken, total = [], 0
    for inputs in parts:
        if total >= count:
            break
        n = _samples(inputs)
        if n is None:
            taken.append(inputs)
            total += 1
            continue
        use = min(n, count - total)
        taken.append(inputs if use == n else _slice(inputs, 0, use))
        total += use
    return taken, total


class _Unjoinable(Exception):
    pass


def _join(parts: Sequence[Inputs]) -> Inputs | None:
    """The batches as one, tensors concatenated along their first axis; None when they
    cannot be (other structure, tensors that differ beyond the first axis, other values
    that differ)."""
    if len(parts) == 1:
        return parts[0]
    first = parts[0]
    if any(len(p.args) != len(first.args) or p.kwargs.keys() != first.kwargs.keys()
           or _samples(p) is None for p in parts):
        return None

    def merge(values: list[Any]) -> Any:
        head = values[0]
        if all(isinstance(v, torch.Tensor) for v in values):
            if any(v.ndim == 0 or v.shape[1:] != head.shape[1:] or v.dtype != head.dtype
                   or v.device != head.device for v in values):
                raise _Unjoinable
            return torch.cat(values)
        if all(v is head or (isinstance(v, (int, float, str, bool)) and v == head)
               for v in values):
            return head
        raise _Unjoinable

    try:
        return Inputs(tuple(merge([p.args[i] for p in parts]) for i in range(len(first.args))),
                      {k: merge([p.kwargs[k] for p in parts]) for k in first.kwargs})
    except _Unjoinable:
        return None


def _fit_and_check(batches: list[Inputs], check_samples: int,
                   ) -> tuple[list[Inputs], list[Inputs], str]:
    """The fit batches, the check batches (at most ``check_samples`` samples) and how they
    were chosen; the same list for both when a single batch of one sample cannot be split."""
    if len(batches) > 1:
        picked = [i for i in range(len(batches)) if i % CHECK_EVERY == CHECK_EVERY - 1]
        how = f"every {CHECK_EVERY}th batch" if picked else "the last batch"
        picked = picked or [len(batches) - 1]
        check, _ = _take([batches[i] for i in picked], check_samples)
        return [b for i, b in enumerate(batches) if i not in picked], check, how
    only = batches[0]
    n = _samples(only)
    if n is None or n < 2:
        return batches, batches, ("the one batch itself (it cannot be split; lsq checks each "
                                  "layer on rows it did not fit)")
    held = min(check_samples, max(1, n // CHECK_EVERY))
    return ([_slice(only, 0, n - held)], [_slice(only, n - held, n)],
            f"the last {held} samples of the one batch")


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
            total_, count_ = _output_error(want, got)
            total, count = total + total_, count + count_
    return total / count if count else math.nan


def _output_error(want: Sequence[torch.Tensor], got: Sequence[torch.Tensor],
                  ) -> tuple[float, int]:
    """Sum of squared differences and element count over the floating output pairs of equal
    shapes."""
    total, count = 0.0, 0
    for w, g in zip(want, got, strict=False):
        if w.shape == g.shape and w.is_floating_point() and g.is_floating_point():
            total += float((g.double() - w.to(g.device).double()).square().sum())
            count += g.numel()
    return total, count


class _Undo:
    """The tensors a step overwrote, with copies of what they held, to put back."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def save(self, tensor: torch.Tensor) -> None:
        self.saved.setdefault(id(tensor), (tensor, tensor.detach().clone()))

    def restore(self) -> None:
        for tensor, old in self.saved.values():
            tensor.copy_(old)

    def __bool__(self) -> bool:
        return bool(self.saved)


# ----------------------------------------------------------------------- rows of outputs


@dataclass
class _Site:
    """A module whose output is compared between the models: its name, channel axis (1 for
    convs and BatchNorms, -1 for Linear), the dense channels the pruned model keeps, how
    many rows to draw over a set of samples, and its calls per forward."""

    name: str
    dim: int
    keep: torch.Tensor | None
    rows: int
    calls: int = 1


@dataclass
class _Taken:
    """Rows drawn from one call's output on one part of a set: which (flat indices over
    samples and positions, sorted), the dense model's values there (kept channels, float32
    on the CPU), and the output's shape."""

    part: int
    call: int
    shape: torch.Size
    idx: torch.Tensor
    dense: torch.Tensor


def _row_count(shape: torch.Size, dim: int) -> int:
    """Rows of an output: samples x positions (channels on axis 1), or the leading axes
    (channels last)."""
    if dim == 1:
        return shape[0] * math.prod(shape[2:]) if len(shape) > 1 else 1
    return math.prod(shape[:-1])


def _rows_of(y: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of an output, channels last: (len(idx), channels)."""
    idx = idx.to(y.device)
    if dim == 1 and y.ndim > 1:
        flat = y.reshape(y.shape[0], y.shape[1], -1)
        length = flat.shape[2]
        return flat[idx // length, :, idx % length]
    return y.reshape(-1, y.shape[-1])[idx]


def _pick(total: int, count: int, gen: torch.Generator,
          exclude: torch.Tensor | None = None) -> torch.Tensor:
    """``count`` distinct random rows of ``total`` (sorted), none of ``exclude``."""
    if count >= total and exclude is None:
        return torch.arange(total)
    want = count + (0 if exclude is None else len(exclude))
    if total <= max(4 * want, 1 << 20):
        order = torch.randperm(total, generator=gen)
    else:  # never a permutation of a huge count
        order = torch.randint(total, (2 * want,), generator=gen).unique()
        order = order[torch.randperm(len(order), generator=gen)]
    if exclude is not None and len(exclude):
        order = order[~torch.isin(order, exclude)]
    return order[:count].sort().values


def _record(model: nn.Module, parts: Sequence[Inputs], sites: Sequence[_Site], seed: int, *,
            outputs: bool = False, exclude: Callable[[str, int, int], torch.Tensor | None]
            | None = None, fraction: float = 1.0,
            ) -> tuple[dict[str, list[_Taken]], list[list[torch.Tensor]], float]:
    """Run ``model`` (eval mode) on each part, drawing rows of each site's outputs (at most
    ``fraction`` of each call's rows, none of ``exclude``'s); also the model's floating
    outputs per part when ``outputs`` (float32, CPU), and the bytes per sample of its largest
    leaf-module output."""
    gen = torch.Generator().manual_seed(seed)
    modules = dict(model.named_modules())
    taken: dict[str, list[_Taken]] = {site.name: [] for site in sites}
    sizes = [_samples(p) or 1 for p in parts]
    share = [n / sum(sizes) for n in sizes]
    state = {"part": 0, "calls": {}, "largest": 0.0}

    def draw(site: _Site) -> Callable[[torch.Tensor], None]:
        def fn(y: torch.Tensor) -> None:
            if site.dim == 1 and y.ndim < 2:
                return
            part = state["part"]
            count = state["calls"].get(site.name, 0)
            state["calls"][site.name] = count + 1
            total = _row_count(y.shape, site.dim)
            quota = max(1, min(math.ceil(site.rows * share[part] / site.calls),
                               int(total * fraction)))
            skip = exclude(site.name, part, count) if exclude else None
            idx = _pick(total, quota, gen, skip)
            rows = _rows_of(y, site.dim, idx)
            if site.keep is not None:
                rows = rows.index_select(1, site.keep.to(rows.device))
            taken[site.name].append(_Taken(part, count, y.shape, idx,
                                           rows.float().cpu()))
        return fn

    def measure(y: torch.Tensor) -> None:
        per = y.element_size() * y.numel() / sizes[state["part"]]
        state["largest"] = max(state["largest"], per)

    kept: list[list[torch.Tensor]] = []
    with evaluation(model), _Hooks() as hooks:
        for site in sites:
            hooks.post(modules[site.name], draw(site))
        for module in model.modules():
            if not list(module.children()):
                hooks.post(module, measure)
        for part, inputs in enumerate(parts):
            state["part"], state["calls"] = part, {}
            out = flatten_outputs(call(model, inputs))
            if outputs:
                kept.append([o.detach().float().cpu() if o.is_floating_point() else o
                             for o in out])
    return taken, kept, state["largest"]


def _find(taken: dict[str, list[_Taken]], name: str, part: int, call_: int) -> _Taken | None:
    return next((t for t in taken.get(name, ()) if t.part == part and t.call == call_), None)


class _Check:
    """The check samples: the dense model's outputs on them and rows of the sites' outputs,
    and :meth:`measure` of a model against them."""

    def __init__(self, dense: nn.Module, parts: list[Inputs], same_as_fit: bool,
                 sites: list[_Site], seed: int):
        joined = _join(parts)
        self.parts = [joined] if joined is not None else list(parts)
        self.same_as_fit = same_as_fit  # the check samples are the fit samples
        self.samples = sum(_samples(p) or 1 for p in self.parts)
        self.sites = {site.name: site for site in sites}
        # checked on the fit samples themselves: a quarter of each layer's rows, the rest fit
        self.taken, self.outputs, self.activation = _record(
            dense, self.parts, sites, seed, outputs=True,
            fraction=1 / CHECK_EVERY if same_as_fit else 1.0)

    def measure(self, model: nn.Module) -> tuple[float, dict[str, float]]:
        """The model's output MSE against the dense model's on the check samples, and each
        site's output MSE on its drawn rows."""
        modules = dict(model.named_modules())
        sums = {name: [0.0, 0] for name in self.sites}
        state = {"part": 0, "calls": {}}

        def compare(name: str) -> Callable[[torch.Tensor], None]:
            dim = self.sites[name].dim

            def fn(y: torch.Tensor) -> None:
                count = state["calls"].get(name, 0)
                state["calls"][name] = count + 1
                want = _find(self.taken, name, state["part"], count)
                if want is None or _row_count(y.shape, dim) != _row_count(want.shape, dim):
                    return
                got = _rows_of(y, dim, want.idx)
                if got.shape == want.dense.shape:
                    sums[name][0] += float((got.double().cpu() - want.dense.double())
                                           .square().sum())
                    sums[name][1] += got.numel()
            return fn

        total, count = 0.0, 0
        with evaluation(model), _Hooks() as hooks:
            for name in self.sites:
                if name in modules:
                    hooks.post(modules[name], compare(name))
            for part, inputs in enumerate(self.parts):
                state["part"], state["calls"] = part, {}
                got = flatten_outputs(call(model, inputs))
                total_, count_ = _output_error(self.outputs[part], got)
                total, count = total + total_, count + count_
        return (total / count if count else math.nan,
                {name: (s / n if n else math.nan) for name, (s, n) in sums.items()})


def _sites(pruned: nn.Module, dense: nn.Module, plan: Plan, layers: list[_Consumer],
           methods: list[str], max_rows: int, memory: dict[str, Any]) -> list[_Site]:
    """The modules whose check-sample errors the methods report: the BatchNorms (bn, and
    bias folded into them) and the refitted layers (bias, lsq, whose check rows they are)."""
    if not set(methods) & {"bn", "bias", "lsq"}:
        return []
    entries, canonical = _plan_entries(plan), tensor_index(dense).canonical
    dense_modules = dict(dense.named_modules())
    sites = []
    for name, m in pruned.named_modules():
        other = dense_modules.get(name)
        if isinstance(m, BATCH_NORMS) and isinstance(other, BATCH_NORMS) \
                and other.running_mean is not None:
            keep = _kept(entries.get((canonical.get(id(other.running_mean)), 0)))
            sites.append(_Site(name, 1, keep, SITE_ROWS))
    rows = SITE_ROWS
    if "lsq" in methods:  # the check rows of each layer lsq refits, within an eighth of the budget
        width = sum(c.pruned.weight.shape[0] for c in layers if c.pruned is not None) or 1
        rows = max(SITE_ROWS, min(max_rows // CHECK_EVERY,
                                  memory["budget_bytes"] // 8 // (4 * width)))
    sites += [_Site(c.name, c.channel_dim, c.keep_out, rows) for c in layers
              if c.skip is None]
    return sites


# ------------------------------------------------------------------------- what to recover


def _plan_entries(plan: Plan) -> dict[tuple[str, int], dict]:
    return {(entry["name"], entry["dim"]): entry for entry in plan.params}


def _kept(entry: dict | None) -> torch.Tensor | None:
    return None if entry is None else torch.tensor(entry["keep"], dtype=torch.long)


def _consumers(pruned: nn.Module, dense: nn.Module, plan: Plan) -> list[_Consumer]:
    """The dense model's Conv/Linear layers whose weight's input axis the plan slices, and
    its grouped convs that lose groups."""
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
        grouped = isinstance(module, CONVS) and module.groups > 1
        keep_out = None if isinstance(module, TRANSPOSED) else \
            _kept(entries.get((weight_name, 0)))
        if entry is None and not (grouped and keep_out is not None):
            continue
        keep_in = _kept(entry)
        drop = torch.zeros(0, dtype=torch.long)
        if entry is not None:
            mask = torch.ones(entry["size"], dtype=torch.bool)
            mask[keep_in] = False
            drop = torch.nonzero(mask).flatten()
        consumer = _Consumer(name, module, pruned_modules.get(name), keep_in, drop, keep_out)
        consumer.skip = _why_not(consumer)
        found.append(consumer)
    return found


def _why_not(c: _Consumer) -> str | None:
    if isinstance(c.dense, TRANSPOSED):
        return "transposed convolution (not handled)"
    if c.pruned is None or type(c.pruned) is not type(c.dense):
        return "not found in the pruned model under the same name"
    dense_shape = list(c.dense.weight.shape)
    if c.keep_in is not None:
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

    def call_count(self, name: str) -> int:
        """How many times a forward calls the module (1 when the graph does not say)."""
        return max(1, len(self.calls.get(name, ())))

    def norm_after(self, name: str, modules: dict[str, nn.Module],
                   size: int) -> tuple[str, nn.Module] | None:
        """The BatchNorm (name and module of ``modules``) that alone takes ``name``'s only
        call's output and tracks running statistics of ``size`` channels: where a bias-free
        layer's bias goes, subtracted from its ``running_mean``."""
        user = self.only_user(name)
        norm = modules.get(user or "")
        if isinstance(norm, BATCH_NORMS) and norm.track_running_stats \
                and norm.running_mean is not None and norm.running_mean.numel() == size:
            return user, norm
        return None


def _skipped(c: _Consumer, method: str, reason: str) -> dict[str, Any]:
    return {"module": c.name, "method": method, "rows": 0, "mse_before": None,
            "mse_after": None, "skipped": reason}


def _bar(total: int | None, desc: str, progress: bool) -> tqdm:
    return tqdm(total=total, desc=desc, unit="layer" if desc == "lsq" else "batch",
                file=sys.stderr, disable=not progress, leave=False)


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


def _recalibrate(pruned: nn.Module, batches: Sequence[Inputs], undo: _Undo, progress: bool,
                 ) -> list[dict[str, Any]]:
    norms = {name: m for name, m in pruned.named_modules()
             if isinstance(m, BATCH_NORMS) and m.track_running_stats
             and m.running_mean is not None and m.running_var is not None}
    if not norms:
        return []
    for m in norms.values():
        for t in (m.running_mean, m.running_var, m.num_batches_tracked):
            if t is not None:
                undo.save(t)
    moments = {name: _Moments() for name in norms}
    momenta = {name: m.momentum for name, m in norms.items()}
    try:
        with training_mode(pruned, training=False), _Hooks() as hooks:
            for name, m in norms.items():
                m.train()
                m.reset_running_stats()
                m.momentum = None  # cumulative average, overwritten by the pooled moments
                hooks.pre(m, moments[name].add)
            for batch in tqdm(batches, desc="bn", unit="batch", file=sys.stderr,
                              disable=not progress, leave=False):
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
    return [{"module": name, "method": "bn", "rows": moments[name].count,
             "mse_before": None, "mse_after": None, "_site": name} for name in norms]


# ----------------------------------------------------------------------------------- bias


def _compensate(pruned: nn.Module, dense: nn.Module, plan: Plan, graph: _Graph,
                consumers: list[_Consumer], batches: Sequence[Inputs], undo: _Undo,
                ) -> list[dict[str, Any]]:
    entries = _plan_entries(plan)
    canonical = tensor_index(dense).canonical
    dense_modules, pruned_modules = dict(dense.named_modules()), dict(pruned.named_modules())
    layers: list[dict[str, Any]] = []
    todo: list[tuple[_Consumer, str, torch.Tensor, torch.Tensor | None]] = []
    for c in consumers:
        if c.keep_in is None:
            continue  # a grouped conv that lost whole groups lost no input of a kept group
        if c.skip or (isinstance(c.dense, CONVS) and c.dense.groups != 1):
            layers.append(_skipped(c, "bias", c.skip or
                                   f"grouped convolution (groups={c.dense.groups})"))
            continue
        if c.pruned.bias is not None:
            todo.append((c, c.name, c.pruned.bias, c.keep_out))
            continue
        size = len(c.keep_out) if c.keep_out is not None else c.dense.weight.shape[0]
        found = graph.norm_after(c.name, pruned_modules, size)
        dense_norm = dense_modules.get(found[0]) if found else None
        if found and isinstance(dense_norm, BATCH_NORMS):
            keep = _kept(entries.get((canonical.get(id(dense_norm.running_mean)), 0)))
            todo.append((c, found[0], found[1].running_mean, keep))
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
    for c, site, target, _ in todo:
        total, count = sums[c.name]
        if not count:
            continue
        weight = c.dense.weight.detach().double().cpu().index_select(1, c.drop_in)
        shift = weight.reshape(weight.shape[0], weight.shape[1], -1).sum(-1) @ (total / count)
        if c.keep_out is not None:
            shift = shift.index_select(0, c.keep_out)
        undo.save(target)
        shift = shift.to(target)
        if site == c.name:
            target.add_(shift)
        else:
            target.sub_(shift)
    for c, site, _, _ in todo:
        how = "bias" if site == c.name else f"folded into {site}.running_mean"
        layers.append({"module": c.name, "method": "bias", "rows": sums[c.name][1],
                       "mse_before": None, "mse_after": None, "target": how,
                       "measured_at": site, "_site": site})
    return layers


# ------------------------------------------------------------------------------------ lsq


def _lsq_skip(c: _Consumer) -> str | None:
    if c.skip:
        return c.skip
    if not isinstance(c.dense, (*CONVS, nn.Linear)):
        return f"lsq handles Conv1d/2d/3d and Linear, not {type(c.dense).__name__}"
    if isinstance(c.dense, CONVS) and c.dense.padding_mode != "zeros":
        return f"padding_mode {c.dense.padding_mode!r} (lsq gathers with zero padding)"
    return None


class _Layout:
    """How one pruned layer's regression is laid out: ``groups`` problems, each with
    ``cols`` columns (inputs per group x kernel taps, and a ones column for the bias) and
    ``outs`` outputs; rows are gathered from the layer's input at drawn output positions."""

    def __init__(self, module: nn.Module, folded: torch.Tensor | None = None):
        self.module = module
        # a layer without a bias whose output goes to a BatchNorm alone still gets an
        # intercept: it is written into that BatchNorm's running_mean (subtracted)
        self.folded = folded if module.bias is None else None
        weight = module.weight
        self.conv = isinstance(module, CONVS)
        self.groups = module.groups if self.conv else 1
        self.outs = weight.shape[0] // self.groups
        self.width = weight[0].numel()  # inputs per group x taps
        self.has_bias = module.bias is not None or self.folded is not None
        self.cols = self.width + self.has_bias
        self.inputs = weight.shape[1] * self.groups  # the layer's input channels
        self.taps = math.prod(weight.shape[2:])
        if self.conv:
            kernel, dilation = list(module.kernel_size), list(module.dilation)
            if isinstance(module.padding, str):  # "same" pads total // 2 before, as torch
                self.before = [0 if module.padding == "valid" else d * (k - 1) // 2
                               for d, k in zip(dilation, kernel, strict=True)]
            else:
                self.before = list(module.padding)
            self.stride = list(module.stride)
            grids = torch.meshgrid(*[torch.arange(k) * d for k, d in
                                     zip(kernel, dilation, strict=True)], indexing="ij")
            self.offsets = [g.reshape(-1) for g in grids]  # per axis, one offset per tap

    def gather(self, part: _Part, idx: torch.Tensor) -> torch.Tensor:
        """The rows ``idx`` (flat over samples x output positions) of this layer's input on
        ``part``: (len(idx), taps, input channels), float32; taps over the zero padding are
        zeros."""
        flat = part.flat(self.conv)
        idx = idx.to(flat.device)
        if not self.conv:
            return flat[idx].unsqueeze(1)
        spatial_in, spatial_out = part.x.shape[2:], part.shape[2:]
        length = math.prod(spatial_out)
        sample, rest = idx // length, idx % length
        coords = []
        for size in reversed(spatial_out):
            coords.append(rest % size)
            rest = rest // size
        coords.reverse()
        index = sample[:, None].expand(len(idx), self.taps)
        valid = torch.ones(len(idx), self.taps, dtype=torch.bool, device=flat.device)
        for axis, size in enumerate(spatial_in):
            at = coords[axis][:, None] * self.stride[axis] - self.before[axis] \
                + self.offsets[axis].to(flat.device)[None, :]
            valid &= (at >= 0) & (at < size)
            index = index * size + at.clamp(0, size - 1)
        # a tap over the padding reads the zero row after the last position
        return flat[torch.where(valid, index, len(flat) - 1)]

    def design(self, rows: torch.Tensor) -> torch.Tensor:
        """Gathered rows as the groups' design matrices (groups, rows, cols): columns tap
        by tap, each tap's input channels of the group, then the ones column."""
        r = len(rows)
        per = self.width // self.taps
        x = rows.reshape(r, self.taps, self.groups, per).permute(2, 0, 1, 3)
        x = x.reshape(self.groups, r, self.width)
        if self.has_bias:
            x = torch.cat([x, x.new_ones(self.groups, r, 1)], 2)
        return x

    def targets(self, y: torch.Tensor) -> torch.Tensor:
        """Dense output rows as the groups' targets: (groups, rows, outs)."""
        return y.reshape(len(y), self.groups, self.outs).transpose(0, 1).contiguous()

    def current(self) -> torch.Tensor:
        """The layer's weights (and bias) as the solution: (groups, cols, outs), float64."""
        w = self.module.weight.detach().double().cpu()
        w = w.reshape(self.groups, self.outs, -1, self.taps).permute(0, 3, 2, 1)
        w = w.reshape(self.groups, self.width, self.outs)
        if self.has_bias:
            b = torch.zeros(self.groups, 1, self.outs, dtype=torch.float64) \
                if self.module.bias is None else \
                self.module.bias.detach().double().cpu().reshape(self.groups, 1, self.outs)
            w = torch.cat([w, b], 1)
        return w

    def write(self, solution: torch.Tensor, undo: _Undo) -> None:
        weight, bias = self.module.weight, self.module.bias
        undo.save(weight)
        w = solution[:, :self.width].reshape(self.groups, self.taps, -1, self.outs)
        weight.copy_(w.permute(0, 3, 2, 1).reshape(weight.shape))
        if bias is not None:
            undo.save(bias)
            bias.copy_(solution[:, self.width].reshape(-1))
        elif self.folded is not None:
            undo.save(self.folded)
            self.folded.sub_(solution[:, self.width].reshape(-1).to(self.folded))


@dataclass
class _Part:
    """One call of a layer on one part of the samples: the pruned model's input to it, the
    shape of the dense output, and the rows to fit and to check on with their targets."""

    x: torch.Tensor
    shape: torch.Size
    fit: _Taken | None
    check: _Taken | None
    _flat: torch.Tensor | None = None

    def flat(self, conv: bool) -> torch.Tensor:
        """The input as rows of channels, float32: a Linear's (leading axes, channels); a
        conv's (samples x positions, channels), channels last, with a row of zeros after
        them (copied once)."""
        if self._flat is None:
            x = self.x
            if conv:
                rows = x.movedim(1, -1).reshape(-1, x.shape[1])
                self._flat = torch.cat([rows.float(), rows.new_zeros(1, x.shape[1]).float()])
            else:
                self._flat = x.reshape(-1, x.shape[-1]).float()
        return self._flat


class _Rows:
    """Chunks of (design, targets) rows over a layer's parts, gathered on the fly or, when
    the plan allows, kept after the first pass."""

    def __init__(self, layout: _Layout, parts: list[_Part], which: str, chunk: int,
                 keep: bool = False):
        self.layout, self.parts, self.which, self.chunk = layout, parts, which, chunk
        self.keep = keep
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] | None = None

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.kept is not None:
            yield from self.kept
            return
        kept = [] if self.keep else None
        for part in self.parts:
            taken = part.fit if self.which == "fit" else part.check
            if taken is None:
                continue
            for start in range(0, len(taken.idx), self.chunk):
                idx = taken.idx[start:start + self.chunk]
                rows = self.layout.gather(part, idx).cpu()
                pair = (self.layout.design(rows),
                        self.layout.targets(taken.dense[start:start + self.chunk]))
                if kept is not None:
                    kept.append(pair)
                yield pair
        if kept is not None:
            self.kept = kept


def _ridge(diag: torch.Tensor, width: int, ridge: float) -> torch.Tensor:
    """Per group: ``ridge * mean(diag(X^T X))`` over the weights' columns (``ridge`` when
    that is 0)."""
    lam = ridge * diag[:, :width].mean(1) if width else torch.zeros(len(diag), dtype=diag.dtype)
    return torch.where((lam <= 0) & (ridge > 0), torch.full_like(lam, ridge), lam)


def _quadratic(w: torch.Tensor, gram_w: torch.Tensor, xty: torch.Tensor, yy: float) -> float:
    """``||X w - Y||^2`` from ``X^T X w``, ``X^T Y`` and ``||Y||^2``."""
    return float((w * gram_w).sum() - 2 * (w * xty).sum() + yy)


def _solve_spd(a: torch.Tensor, b: torch.Tensor, regularised: bool) -> torch.Tensor:
    """``a x = b`` for a symmetric ``a``: by Cholesky when it is regularised and positive
    definite, else by least squares (the minimum-norm solution of a singular one)."""
    if regularised:
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            return torch.cholesky_solve(b, factor)
    return torch.linalg.lstsq(a, b).solution


def _normal_equations(layout: _Layout, rows: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      ) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``X^T X``, ``X^T Y`` (per group, float64) and ``||Y||^2``, accumulated chunk by chunk:
    each chunk's products in float32, their sum in float64."""
    g, c, o = layout.groups, layout.cols, layout.outs
    gram = torch.zeros(g, c, c, dtype=torch.float64)
    xty = torch.zeros(g, c, o, dtype=torch.float64)
    yy = 0.0
    for x, y in rows:
        xt = x.transpose(1, 2)
        gram += torch.bmm(xt, x)
        xty += torch.bmm(xt, y)
        yy += float(y.square().sum(dtype=torch.float64))
    return gram, xty, yy


def _solve_gram(layout: _Layout, rows: _Rows, w0: torch.Tensor, ridge: float,
                ) -> tuple[torch.Tensor, float, float, dict[str, Any]]:
    """The ridge normal equations, solved per group in float64. Returns the solution and the
    fit rows' squared errors of ``w0`` and of it."""
    gram, xty, yy = _normal_equations(layout, rows)
    before = _quadratic(w0, torch.bmm(gram, w0), xty, yy)
    lam = _ridge(gram.diagonal(dim1=1, dim2=2), layout.width, ridge)
    idx = torch.arange(layout.width)
    solution = torch.empty_like(w0)
    for k in range(layout.groups):  # one group's workspace at a time
        a = gram[k].clone()
        a[idx, idx] += lam[k]
        solution[k] = _solve_spd(a, xty[k], bool(lam[k] > 0))
    after = _quadratic(solution, torch.bmm(gram, solution), xty, yy)
    return solution, before, after, {}


def _solve_cg(layout: _Layout, rows: _Rows, w0: torch.Tensor, ridge: float,
              ) -> tuple[torch.Tensor, float, float, dict[str, Any]]:
    """Jacobi-preconditioned conjugate gradients on the ridge normal equations, from ``w0``,
    with ``X^T (X P)`` summed over streamed row chunks; each group's outputs are separate
    systems sharing ``X^T X``. The iterates are kept transposed, (groups, outs, cols), so
    that every reduction runs along contiguous memory."""
    g, c, o = layout.groups, layout.cols, layout.outs
    yx = torch.zeros(g, o, c, dtype=torch.float64)  # (X^T Y)^T
    diag = torch.zeros(g, c, dtype=torch.float64)
    yy = 0.0
    for x, y in rows:
        yx += torch.bmm(y.transpose(1, 2), x)
        diag += x.square().sum(1, dtype=torch.float64)
        yy += float(y.square().sum(dtype=torch.float64))

    def gram_times(p: torch.Tensor) -> torch.Tensor:  # (X^T X P)^T = P^T X^T X
        out = torch.zeros_like(p)
        p32 = p.float()
        for x, _ in rows:
            out += torch.bmm(torch.bmm(p32, x.transpose(1, 2)), x)
        return out

    def dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # per output: (g, o, 1)
        return torch.bmm(a.reshape(g * o, 1, c), b.reshape(g * o, c, 1)).reshape(g, o, 1)

    lam = _ridge(diag, layout.width, ridge)[:, None, None] * \
        (torch.arange(c) < layout.width).double()[None, None, :]
    w = w0.transpose(1, 2).contiguous()
    gw = gram_times(w)
    before = _quadratic(w, gw, yx, yy)
    residual = (yx - gw).addcmul_(lam, w, value=-1)
    scale = (diag[:, None, :] + lam).clamp_min(1e-30)
    z = residual / scale
    direction = z.clone()
    rz = dot(residual, z)
    target = CG_TOLERANCE * yx.norm(dim=2, keepdim=True).clamp_min(1e-30)
    iterations = 0
    # in place: each (groups, outs, cols) temporary is as large as the layer's weight
    while iterations < CG_ITERATIONS and bool((residual.norm(dim=2, keepdim=True)
                                               > target).any()):
        iterations += 1
        ap = gram_times(direction).addcmul_(lam, direction)
        pap = dot(direction, ap)
        alpha = torch.where(pap > 0, rz / pap.clamp_min(1e-300), torch.zeros_like(pap))
        w.addcmul_(alpha, direction)
        residual.addcmul_(alpha, ap, value=-1)
        torch.div(residual, scale, out=z)
        rz_next = dot(residual, z)
        beta = torch.where(rz > 0, rz_next / rz.clamp_min(1e-300), torch.zeros_like(rz))
        direction.mul_(beta).add_(z)
        rz = rz_next
    after = _quadratic(w, gram_times(w), yx, yy)
    relative = float((residual.norm(dim=2) / yx.norm(dim=2).clamp_min(1e-30)).max())
    return (w.transpose(1, 2).contiguous(), before, after,
            {"iterations": iterations, "relative_residual": relative})


def _solve_kernel(layout: _Layout, rows: _Rows, w0: torch.Tensor, ridge: float,
                  ) -> tuple[torch.Tensor, float, float, dict[str, Any]]:
    """The ridge solution in its dual form, for fewer rows than columns, from all fit rows
    at once: ``W = Xc^T (Xc Xc^T + lam I)^-1 Yc``, with X and Y centred over the rows when
    there is a bias (which the ridge leaves free: ``b = mean(Y) - mean(X) W``); products in
    float32, the (rows x rows) system solved in float64."""
    pairs = list(rows)
    x = torch.cat([p[0] for p in pairs], 1)
    y = torch.cat([p[1] for p in pairs], 1)
    del pairs
    width = layout.width
    weights = x[:, :, :width]
    lam = _ridge(weights.square().sum(1, dtype=torch.float64), width, ridge)
    if layout.has_bias:
        x_mean, y_mean = weights.mean(1, keepdim=True), y.mean(1, keepdim=True)
        centred, target = weights - x_mean, (y - y_mean).double()
    else:
        centred, target = weights, y.double()
    kernel = torch.bmm(centred, centred.transpose(1, 2)).double()
    eye = torch.eye(kernel.shape[1], dtype=kernel.dtype)
    solution = torch.empty_like(w0)
    for k in range(layout.groups):
        dual = _solve_spd(kernel[k] + lam[k] * eye, target[k], bool(lam[k] > 0))
        solution[k, :width] = centred[k].T @ dual.float()
        if layout.has_bias:
            solution[k, width] = y_mean[k, 0].double() - \
                x_mean[k, 0].double() @ solution[k, :width]

    def sse(w: torch.Tensor) -> float:
        return float((torch.bmm(x, w.float()) - y).square().sum(dtype=torch.float64))
    return solution, sse(w0), sse(solution), {}


def _errors(rows: _Rows, solutions: Sequence[torch.Tensor]) -> tuple[list[float], int]:
    """Each solution's squared error over the rows, and the row count, in one pass."""
    sums, count = [0.0] * len(solutions), 0
    cast = [s.float() for s in solutions]
    for x, y in rows:
        count += x.shape[1]
        for i, w in enumerate(cast):
            sums[i] += float((torch.bmm(x, w) - y).square().sum(dtype=torch.float64))
    return sums, count


def _memory_plan(layout: _Layout, fit_rows: int, allowed: int) -> dict[str, Any]:
    """Bytes each solver needs for this layer and the one chosen: of those that fit, the
    cheapest in multiply-adds (conjugate gradients keep their row chunks when that fits too);
    none when none fits."""
    g, c, o, r = layout.groups, layout.cols, layout.outs, fit_rows
    # a gathered chunk: the gather, the design matrix, the targets
    per_row = 4 * (2 * layout.inputs * layout.taps + g * (c + o))
    chunk = max(1, min(r, min(CHUNK_BYTES, allowed // 4) // per_row))
    work = chunk * per_row
    kept = 4 * r * g * (c + o)
    needs = {"gram": 12 * g * c * c + 16 * c * c + 24 * g * c * o + work,
             "cg": 56 * g * c * o + 8 * g * c + work + 8 * chunk * g * o,
             "kernel": kept + 4 * r * g * (c + o) + 16 * g * r * r + 24 * g * c * o + work}
    costs = {"gram": 2 * r * g * c * c + g * c ** 3 / 3,
             "cg": min(CG_ITERATIONS, r + 1) * 4 * r * g * c * o,
             "kernel": 2 * g * r * r * c + g * r ** 3 / 3 + 4 * g * r * c * o}
    plan: dict[str, Any] = {"bytes_allowed": int(allowed), "chunk_rows": chunk,
                            **{f"{name}_bytes": need for name, need in needs.items()}}
    fitting = [name for name in needs if needs[name] <= allowed]
    if not fitting:
        return plan | {"method": "skip", "bytes_needed": min(needs.values())}
    method = min(fitting, key=costs.__getitem__)
    plan.update(method=method, bytes_needed=needs[method])
    if method == "cg":
        plan["rows_kept"] = needs["cg"] + kept <= allowed
        plan["bytes_needed"] += kept * plan["rows_kept"]
    return plan


class _Stop(Exception):
    """Raised by a hook once a layer's inputs are captured: the rest of the forward is not
    needed."""


class _Reconstruction:
    """lsq: each refittable layer regressed in call order, the pruned model's input to it
    (earlier layers refitted) on the dense model's output, within the memory budget."""

    def __init__(self, pruned: nn.Module, dense: nn.Module, graph: _Graph, checker: _Check,
                 fit: list[Inputs], memory: dict[str, Any], max_rows: int, ridge: float,
                 seed: int, lsq_samples: int, progress: bool):
        self.pruned, self.dense, self.graph, self.checker = pruned, dense, graph, checker
        self.memory, self.max_rows, self.ridge, self.seed = memory, max_rows, ridge, seed
        self.progress = progress
        self.modules = dict(pruned.named_modules())
        budget = memory["budget_bytes"]
        # as many fit samples as a forward of them (with the check samples) fits half the
        # budget, at most lsq_samples
        per_sample = LIVE_ACTIVATIONS * checker.activation
        room = int(budget // 2 // per_sample) - checker.samples if per_sample else lsq_samples
        self.fit, self.samples = _take(fit, max(1, min(lsq_samples, room)))

    def run(self, consumers: list[_Consumer], undo: _Undo) -> list[dict[str, Any]]:
        order = sorted(consumers, key=lambda c: self.graph.order.get(c.name, len(self.graph.order)))
        entries: dict[str, dict[str, Any]] = {}
        todo = []
        for c in order:
            reason = _lsq_skip(c)
            if reason:
                entries[c.name] = _skipped(c, "lsq", reason)
            else:
                todo.append(c)
        if not todo:
            return list(entries.values())
        same = self.checker.same_as_fit
        joined = _join(self.fit)
        whole = None
        if joined is not None and all(self.graph.call_count(c.name) == 1 for c in todo):
            whole = joined if same else (_join([joined, self.checker.parts[0]])
                                         if len(self.checker.parts) == 1 else None)
        fit_parts = [joined] if whole is not None else self.fit
        rows = self._row_cap(todo)
        sites = [_Site(c.name, c.channel_dim, c.keep_out, rows, self.graph.call_count(c.name))
                 for c in todo]
        exclude = None
        if same:  # fit rows never among the rows the layer is checked on
            def exclude(name: str, part: int, call_: int) -> torch.Tensor | None:
                found = _find(self.checker.taken, name, part, call_)
                return None if found is None else found.idx
        self.targets, _, _ = _record(self.dense, fit_parts, sites, self.seed + 1,
                                     exclude=exclude)
        held = LIVE_ACTIVATIONS * self.checker.activation * (self.samples + self.checker.samples)
        held += sum(t.dense.numel() * 4 for taken in self.targets.values() for t in taken)
        held += sum(t.dense.numel() * 4 for c in todo for t in self.checker.taken.get(c.name, ()))
        held += sum(c.pruned.weight.numel() * c.pruned.weight.element_size() for c in todo)
        self.allowed = max(0, int(self.memory["budget_bytes"] - held))
        self.memory.update(lsq_samples=self.samples, rows_per_layer=rows,
                           held_bytes=int(held), mode="one forward" if whole is not None
                           else "a forward as far as each layer")
        with _bar(len(todo), "lsq", self.progress) as bar, evaluation(self.pruned):
            if whole is not None:
                self._in_one_forward(todo, whole, same, entries, undo, bar)
            else:
                self._layer_by_layer(todo, fit_parts, same, entries, undo, bar)
        for c in todo:
            entries.setdefault(c.name, _skipped(c, "lsq", "not called on the batches"))
        return [entries[c.name] for c in order]

    def _row_cap(self, todo: list[_Consumer]) -> int:
        """Rows drawn per layer: ``max_rows``, fewer when the dense targets of all layers
        would take more than a quarter of the budget."""
        width = sum(c.pruned.weight.shape[0] for c in todo)
        return max(1, min(self.max_rows, self.memory["budget_bytes"] // 4 // (4 * width)))

    def _in_one_forward(self, todo: list[_Consumer], whole: Inputs, same: bool,
                        entries: dict[str, dict[str, Any]], undo: _Undo, bar: tqdm) -> None:
        """One forward of the fit and check samples joined; each layer refitted by a
        pre-hook before it runs, so the layers after it see its new output."""
        def refit(c: _Consumer) -> Callable[[torch.Tensor], None]:
            def fn(x: torch.Tensor) -> None:
                if c.name in entries:
                    return
                fit = _find(self.targets, c.name, 0, 0)
                check = _find(self.checker.taken, c.name, 0, 0)
                if fit is None:
                    return
                if same:
                    parts = [_Part(x, fit.shape, fit, check)]
                else:
                    split_at = fit.shape[0]
                    if check is not None and x.shape[0] != split_at + check.shape[0]:
                        entries[c.name] = _skipped(c, "lsq", "its input's first axis is not "
                                                   "the batch axis")
                        bar.update()
                        return
                    parts = [_Part(x[:split_at], fit.shape, fit, None)]
                    if check is not None:
                        parts.append(_Part(x[split_at:], check.shape, None, check))
                entries[c.name] = self._refit(c, parts, undo)
                bar.update()
            return fn

        with _Hooks() as hooks:
            for c in todo:
                hooks.pre(c.pruned, refit(c))
            call(self.pruned, whole)

    def _layer_by_layer(self, todo: list[_Consumer], fit_parts: list[Inputs], same: bool,
                        entries: dict[str, dict[str, Any]], undo: _Undo, bar: tqdm) -> None:
        """For each layer, the pruned model run on each part only as far as that layer."""
        for c in todo:
            parts = []
            for p, inputs in enumerate(fit_parts):
                for k, x in enumerate(self._inputs_of(c, inputs)):
                    fit = _find(self.targets, c.name, p, k)
                    check = _find(self.checker.taken, c.name, p, k) if same else None
                    if fit is not None:
                        parts.append(_Part(x, fit.shape, fit, check))
            if not same:
                for p, inputs in enumerate(self.checker.parts):
                    for k, x in enumerate(self._inputs_of(c, inputs)):
                        check = _find(self.checker.taken, c.name, p, k)
                        if check is not None:
                            parts.append(_Part(x, check.shape, None, check))
            if any(part.fit is not None for part in parts):
                entries[c.name] = self._refit(c, parts, undo)
            bar.update()

    def _folded(self, c: _Consumer) -> torch.Tensor | None:
        """The running mean of the BatchNorm that alone takes a bias-free layer's output
        (called once, like the layer), where the layer's intercept goes; else None."""
        found = None if c.pruned.bias is not None else \
            self.graph.norm_after(c.name, self.modules, c.pruned.weight.shape[0])
        if found is None or self.graph.call_count(found[0]) != 1:  # a shared norm: not ours
            return None
        return found[1].running_mean

    def _inputs_of(self, c: _Consumer, inputs: Inputs) -> list[torch.Tensor]:
        """The pruned layer's inputs on one part, the forward stopped after its last call."""
        found: list[torch.Tensor] = []
        calls = self.graph.call_count(c.name)

        def capture(x: torch.Tensor) -> None:
            found.append(x)
            if len(found) == calls:
                raise _Stop

        with _Hooks() as hooks:
            hooks.pre(c.pruned, capture)
            try:
                call(self.pruned, inputs)
            except _Stop:
                pass
        return found

    def _refit(self, c: _Consumer, parts: list[_Part], undo: _Undo) -> dict[str, Any]:
        layout = _Layout(c.pruned, self._folded(c))
        fit_rows = sum(len(p.fit.idx) for p in parts if p.fit is not None)
        plan = _memory_plan(layout, fit_rows, self.allowed)
        entry: dict[str, Any] = {"module": c.name, "method": "lsq", "rows": fit_rows,
                                 "mse_before": None, "mse_after": None, "check_rows": 0,
                                 "check_mse_before": None, "check_mse_after": None,
                                 "plan": plan}
        if layout.groups > 1:
            entry["groups"] = layout.groups
        if not fit_rows:
            entry["skipped"] = "no rows left to fit (all of them check)"
            return entry
        if plan["method"] == "skip":
            entry["skipped"] = (f"needs {plan['bytes_needed']} bytes at least (normal "
                                f"equations {plan['gram_bytes']}, dual form "
                                f"{plan['kernel_bytes']}, conjugate gradients "
                                f"{plan['cg_bytes']}), the budget leaves "
                                f"{plan['bytes_allowed']}")
            return entry
        w0 = layout.current()
        rows = _Rows(layout, parts, "fit", plan["chunk_rows"], plan.get("rows_kept", False))
        solve = {"gram": _solve_gram, "cg": _solve_cg, "kernel": _solve_kernel}[plan["method"]]
        w1, before, after, info = solve(layout, rows, w0, self.ridge)
        plan.update(info)
        values = fit_rows * layout.groups * layout.outs
        entry["mse_before"], entry["mse_after"] = before / values, max(0.0, after) / values
        (check_before, check_after), check_rows = _errors(
            _Rows(layout, parts, "check", plan["chunk_rows"]), [w0, w1])
        if check_rows:
            values = check_rows * layout.groups * layout.outs
            entry.update(check_rows=check_rows, check_mse_before=check_before / values,
                         check_mse_after=check_after / values)
            better, on = check_after < check_before, f"the {check_rows} check rows"
        else:
            better, on = after < before, "the fit rows (no check rows)"
        if better and bool(torch.isfinite(w1).all()):
            layout.write(w1, undo)
        else:
            entry["undone"] = f"the refit did not lower the layer's error on {on}"
        return entry
