"""Prune to a speed on a target runtime, and never ship a model slower than the dense one.

``prune_for_target`` measures every latency decision on the runtime of one
:class:`~structprune.config.TargetConfig`:

- with its ``speedup`` (or ``latency_ms``) it chooses each group's width from the latency table
  (:mod:`structprune.deploy.widths`), exports the pruned model, times it against the dense one in
  interleaved pairs, and, where the measurement misses the goal, recalibrates the
  prediction on that measurement and searches again, until the goal is met within
  ``speed_tolerance`` or it is plain that it cannot be (:class:`TargetError`);
- with the pass config's ratio, threshold or budget it makes that plan and snaps every
  group's width to the nearest width the table says is fast (``round_to="auto"`` instead
  times whole candidates);
- either way the pruned model is timed against the dense one before anything is returned. A
  model that is not faster is fixed by width choice (``if_slower="fix"``: narrower fast
  widths until the measurement says faster) or refused (``"fail"``: :class:`SlowerError`).

``result.figures["target"]`` records the target, the measurements (median and p10-p90 of
the per-pair speed-ups), every attempt, and the latency model's prediction next to the
measured whole-model latency, for the dense and the pruned model.

An INT8 target (``TargetConfig.quantize``; ONNX Runtime on the CPU) asks for a speed-up over
the dense model in FP32 of the pruned model in INT8: the latency table times the layers
quantized, every candidate is quantized before it is timed against the dense FP32 model, and
the table's prediction is calibrated on the dense model in INT8.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn

from structprune.config import PruneConfig, QuantizeConfig, TargetConfig, make_config
from structprune.core.api import PruneResult, prune
from structprune.core.cost import PruneCost
from structprune.core.prepare import prepare
from structprune.core.registry import RuleRegistry
from structprune.core.selection import (
    keep_bounds,
    make_plan,
    plan_from_keep,
    prunable_units,
    removal_order,
)
from structprune.deploy import bench
from structprune.deploy.export import export_onnx
from structprune.deploy.latency import LatencyModel, LatencyTable
from structprune.deploy.quantize import quantize_bytes
from structprune.deploy.runtimes import DEFAULT_STEP, Target, make_target
from structprune.deploy.tune import fastest_rounding
from structprune.deploy.widths import (
    Choice,
    ModelEvaluator,
    Point,
    WidthPath,
    fast_keeps,
    grid,
    search,
    snap,
)
from structprune.errors import StructPruneError

# what ``fix`` aims for: a predicted speed-up of at least this much over dense
FIX_MARGIN = 1.05


class SlowerError(StructPruneError):
    """The pruned model is not faster than the dense one on the target."""


class TargetError(StructPruneError):
    """The speed-up or latency asked for cannot be reached on the target; ``attempts`` holds
    what was measured."""

    attempts: list[dict[str, Any]] = []


@dataclass
class Speed:
    """Dense against pruned, timed in interleaved pairs (milliseconds per run)."""

    dense_ms: list[float]
    pruned_ms: list[float]

    @property
    def ratios(self) -> np.ndarray:
        return np.asarray(self.dense_ms) / np.asarray(self.pruned_ms)

    @property
    def speedup(self) -> float:
        return float(np.median(self.ratios))

    @property
    def dense(self) -> float:
        return float(np.median(self.dense_ms))

    @property
    def pruned(self) -> float:
        return float(np.median(self.pruned_ms))

    @property
    def faster(self) -> bool:
        return self.speedup > 1.0

    def to_json(self) -> dict[str, Any]:
        r = self.ratios
        return {"speedup": self.speedup, "speedup_p10": float(np.percentile(r, 10)),
                "speedup_p90": float(np.percentile(r, 90)), "dense_ms": self.dense,
                "pruned_ms": self.pruned, "pairs": len(r)}

    def describe(self) -> str:
        j = self.to_json()
        return (f"{j['speedup']:.2f}x (p10-p90 {j['speedup_p10']:.2f}-{j['speedup_p90']:.2f}; "
                f"dense {self.dense:.2f} ms, pruned {self.pruned:.2f} ms)")


# (dense model, pruned model or None for dense alone) -> (dense ms, pruned ms) per pair
Timer = Callable[[nn.Module, nn.Module | None], tuple[list[float], list[float]]]


class Measurer:
    """Times models on the target: the dense model once exported (ONNX runtimes) or copied
    to the GPU (torch), each pruned candidate beside it in interleaved pairs (quantized on
    an INT8 target, the dense model staying in FP32)."""

    def __init__(self, target: Target, dense: nn.Module, example_inputs: Sequence[Any],
                 directory: Path, exporter: str = "torchscript", repeats: int = 15,
                 warmup: int = 2, max_seconds: float = 60.0):
        self.target = target
        self.inputs = example_inputs
        self.directory = directory
        self.timing = {"repeats": repeats, "warmup": warmup, "max_seconds": max_seconds,
                       "sync": target.sync()}
        self.shapes = [tuple(x.shape) for x in example_inputs if hasattr(x, "shape")]
        self.exporter = exporter
        self.count = 0
        self.dense = self._runner(dense, quantize=False)

    def _runner(self, model: nn.Module, quantize: bool = True) -> bench.Runner:
        if not self.target.uses_onnx:
            return self.target.torch_runner(model, self.shapes)
        path = self.directory / f"model_{self.count}.onnx"
        self.count += 1
        # the exporter that worked for the dense model exports the candidates too
        self.exporter = export_onnx(model, self.inputs, path, self.exporter)
        if quantize and self.target.int8:
            path.write_bytes(quantize_bytes(path.read_bytes(), self.shapes,
                                            QuantizeConfig(samples=8)))
        return self.target.onnx_runner(path, self.shapes)

    def __call__(self, dense: nn.Module, pruned: nn.Module | None) -> tuple[list, list]:
        if pruned is None:
            times = bench.interleaved_many([self.dense], **self.timing)[0]
            return times, times
        return bench.interleaved(self.dense, self._runner(pruned), **self.timing)


@dataclass
class _Search:
    """Everything the width search needs, built once per call."""

    choices: list[Choice]
    evaluator: ModelEvaluator
    ranked: dict[int, np.ndarray]
    config: PruneConfig
    model: LatencyModel
    attempts: list[dict[str, Any]] = field(default_factory=list)


def prune_for_target(model: nn.Module, example_inputs: Sequence[Any] | Any,
                     target: TargetConfig, config: PruneConfig | None = None, *,
                     data: Iterable | None = None, registry: RuleRegistry | None = None,
                     leaf_modules: Sequence[type] = (), speed_tolerance: float = 0.05,
                     attempts: int = 4, exporter: str = "torchscript",
                     cache: str | Path | None = None, timer: Timer | None = None,
                     table: LatencyTable | None = None, repeats: int = 15, warmup: int = 2,
                     max_seconds: float = 60.0,
                     progress: Callable[[str], None] = lambda step: None,
                     **settings: Any) -> PruneResult:
    """Prune ``model`` for ``target``: to its ``speedup`` over dense (or its ``latency_ms``),
    else by the pass config's ratio / threshold / budget with widths snapped to fast ones;
    never returns a model the measurement says is not faster (see the module doc).

    The pass settings are ``config`` with ``settings`` (its field names) replaced, as
    :func:`structprune.prune` takes them. Its ``round_to`` is the channel step of the width
    grid (default: the target's), or ``"auto"`` to choose one multiple by timing whole
    candidates. ``timer`` replaces the measurement (tests); ``table`` the latency table (else
    the cached one for ``target``)."""
    config = make_config(config, **settings)
    target.check(config)
    runtime = make_target(target.runtime, target.threads, target.batch, target.quantize)
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    start = time.perf_counter()

    progress("latency table")
    prepared = prepare(model, example_inputs, config, data=data, registry=registry,
                       leaf_modules=leaf_modules)
    analysis, scores = prepared.analysis, prepared.scores
    table = table or LatencyTable(runtime, cache)
    cost = PruneCost(analysis, registry)
    latency = LatencyModel(analysis, table, cost)
    step = config.round_to if isinstance(config.round_to, int) and config.round_to > 1 \
        else DEFAULT_STEP[runtime.runtime]
    found = _choices(analysis, scores, config, latency, step)

    with tempfile.TemporaryDirectory(prefix="structprune-target-") as tmp:
        measure = timer or Measurer(runtime, model, example_inputs, Path(tmp), exporter,
                                    repeats, warmup, max_seconds)
        progress("measure dense")
        dense_alone, _ = measure(model, None)
        dense_ms = float(np.median(dense_alone))
        predicted_dense = latency.predict()
        table_dense_ms = dense_ms  # what the table's prediction of dense is calibrated on
        if runtime.int8:  # the table times layers in INT8: so is the dense model here
            progress("measure dense INT8")
            table_dense_ms = float(np.median(measure(model, model)[1]))
        calibration = table_dense_ms / predicted_dense if predicted_dense > 0 else 1.0

        def attempt(keep: dict[int, int], label: str) -> tuple[PruneResult, Speed]:
            plan = plan_from_keep(analysis, keep, found.ranked, config)
            return measured(prune(model, example_inputs, config=config, plan=plan,
                                  registry=registry, leaf_modules=leaf_modules), label)

        def measured(result: PruneResult, label: str) -> tuple[PruneResult, Speed]:
            result.plan.settings["target"] = runtime.to_json()
            raw = latency.predict(analysis.removed_components(result.plan.params))
            progress(f"measure {label}")
            speed = Speed(*measure(model, result.model))
            found.attempts.append({
                "what": label, "predicted_ms": raw * calibration, "predicted_raw_ms": raw,
                "macs_ratio": result.figures["macs_ratio"], **speed.to_json()})
            return result, speed

        if target.goal:
            goal_ms = target.latency_ms if target.latency_ms is not None \
                else dense_ms / target.speedup
            result, speed, met = _to_goal(found, goal_ms, calibration, attempts,
                                          speed_tolerance, attempt, dense_ms)
            if not met:
                best = max(found.attempts, key=lambda a: a["speedup"])
                asked = f"{target.speedup:g}x" if target.speedup is not None \
                    else f"{target.latency_ms:g} ms"
                error = TargetError(
                    f"{asked} on {runtime.describe()} cannot be reached: the fastest widths "
                    f"tried run at {best['speedup']:.2f}x (p10-p90 {best['speedup_p10']:.2f}-"
                    f"{best['speedup_p90']:.2f}, {best['pruned_ms']:.2f} ms against dense "
                    f"{best['dense_ms']:.2f} ms, {100 * best['macs_ratio']:.1f}% of the MACs); "
                    "ask for less, or relax --min-width, --ignore or --exact-only")
                error.attempts = found.attempts
                raise error
        else:
            if config.round_to == "auto":
                progress("round_to auto")
                result = fastest_rounding(model, example_inputs, config=config, runtime=runtime,
                                          batch=runtime.batch, data=data, registry=registry,
                                          leaf_modules=leaf_modules)
                result, speed = measured(result, f"round_to {result.plan.settings['round_to']}")
            else:
                # round_to is the grid's step here: the widths snap to fast multiples of it
                plan = make_plan(analysis, scores, config.replace(round_to=1), cost=cost)
                down = config.mode in ("macs_budget", "params_budget")
                keep = {c.group: snap(_kept(plan, c.group), c.keeps, down)
                        if latency.layers_of_group.get(c.group) else _kept(plan, c.group)
                        for c in found.choices}
                result, speed = attempt(keep, f"{config.mode}, widths snapped to fast ones")
            if not speed.faster:
                if target.if_slower == "fail":
                    raise SlowerError(f"the pruned model is not faster than dense on "
                                      f"{runtime.describe()}: {speed.describe()}; nothing "
                                      "written (--if-slower fix narrows it to fast widths)")
                start_keep = _only({g["index"]: g["kept"] for g in result.plan.groups}, found)
                result, speed = _fix(found, start_keep, speed, attempt, attempts, calibration,
                                     dense_ms, runtime)
    predicted = latency.predict(analysis.removed_components(result.plan.params))
    table.close()
    final = found.attempts[-1] if found.attempts else {}
    for a in found.attempts:
        if a["speedup"] == speed.speedup and a["pruned_ms"] == speed.pruned:
            final = a
    result.figures["target"] = {
        "target": runtime.to_json(), "machine": bench.machine(),
        "mode": "latency" if target.latency_ms is not None else
        "speedup" if target.speedup is not None else
        ("round_to auto" if config.round_to == "auto" else config.mode),
        "goal_speedup": target.speedup, "goal_latency_ms": target.latency_ms,
        "speed_tolerance": speed_tolerance, "if_slower": target.if_slower, "step": step,
        "measured": speed.to_json(), "faster": speed.faster,
        "met": (speed.speedup >= target.speedup * (1 - speed_tolerance))
        if target.speedup is not None else
        (speed.pruned <= target.latency_ms * (1 + speed_tolerance))
        if target.latency_ms is not None else speed.faster,
        "latency_model": {
            "dense_predicted_ms": predicted_dense, "dense_measured_ms": table_dense_ms,
            "dense_error": predicted_dense / table_dense_ms - 1,
            "dtype": runtime.dtype, "dense_fp32_ms": dense_ms,
            "pruned_predicted_ms": predicted, "pruned_measured_ms": speed.pruned,
            "pruned_error": predicted / speed.pruned - 1,
            "pruned_predicted_calibrated_ms": predicted * calibration,
            "pruned_calibrated_error": predicted * calibration / speed.pruned - 1,
            **latency.summary()},
        "final_attempt": final, "attempts": found.attempts,
        "widths": {str(c.group): {"fast": c.keeps, "kept": _kept(result.plan, c.group)}
                   for c in found.choices},
        "seconds": time.perf_counter() - start,
    }
    return result


def _kept(plan: Any, group: int) -> int:
    for entry in plan.groups:
        if entry["index"] == group:
            return int(entry["kept"])
    raise KeyError(group)


def _only(keep: dict[int, int], found: _Search) -> dict[int, int]:
    """``keep`` restricted to the groups the search may change (and as a fast candidate)."""
    out = {}
    for c in found.choices:
        k = keep.get(c.group, c.keeps[0])
        if k not in c.keeps:  # a width the grid lacks: the search moves on from the nearest
            k = snap(k, c.keeps)
        out[c.group] = k
    return out


def _choices(analysis: Any, scores: dict[int, np.ndarray], config: PruneConfig,
             latency: LatencyModel, step: int) -> _Search:
    """Each prunable group's fast candidate widths, profiled on the latency table (the other
    groups dense), with the importance each loses."""
    candidates, _ = prunable_units(analysis, scores, config)
    ranked = removal_order(scores, candidates)
    groups = {g.index: g for g in analysis.groups}
    evaluator = ModelEvaluator(latency, ranked)
    dense = {g: groups[g].size for g in candidates}
    grids = {}
    for g, prunable in candidates.items():
        group = groups[g]
        grids[g] = grid(group.size, group.width, keep_bounds(group, prunable, config), step)
    evaluator.prepare(dense, [(g, k) for g, keeps in grids.items() for k in keeps[1:]])
    choices = []
    for g, keeps in grids.items():
        layers = latency.shapes(evaluator.at(dense)[1], latency.layers_of_group.get(g, []))
        touched = sum(latency.table.ms(p, s) for p, s in layers)
        ms_at = {k: evaluator.delta(dense, g, k) if k != keeps[0] else 0.0 for k in keeps}
        fast = fast_keeps(keeps, ms_at, margin=0.01 * touched)
        lost_by_removed = np.concatenate([[0.0], np.cumsum(scores[g][ranked[g]])])
        lost = [float(lost_by_removed[groups[g].size - k]) for k in fast]
        choices.append(Choice(g, fast, lost))
    return _Search(choices, evaluator, ranked, config, latency)


def _to_goal(found: _Search, goal_ms: float, calibration: float, attempts: int,
             tolerance: float, attempt: Callable, dense_ms: float,
             ) -> tuple[PruneResult, Speed, bool]:
    """Search, measure, correct the prediction by the measurements and search again, until
    the measured speed-up is within ``tolerance`` of the goal; the best attempt (met with
    the least importance lost, else the fastest) and whether it met the goal."""
    path = WidthPath(found.choices, found.evaluator)
    tried: dict[tuple, tuple[PruneResult, Speed, Point]] = {}
    history: list[tuple[float, float]] = []  # (predicted, measured) per attempt
    for _ in range(attempts):
        point = search(path, _predicted_goal(history, goal_ms, calibration, tolerance))
        if point is None:  # the path ends above the goal: measure the fastest widths
            point = path.fastest()
        state = tuple(sorted(point.keep.items()))
        if state in tried:
            break
        result, speed = attempt(point.keep, f"goal {goal_ms:.3f} ms")
        tried[state] = (result, speed, point)
        # in the dense model's milliseconds: the pair's ratio holds when the load drifts
        history.append((point.ms, dense_ms / speed.speedup))
        if abs(speed.speedup / (dense_ms / goal_ms) - 1) <= tolerance:
            break
    met = [(r, s, p) for r, s, p in tried.values()
           if s.speedup >= dense_ms / goal_ms * (1 - tolerance) and s.faster]
    if met:
        result, speed, _ = min(met, key=lambda t: t[2].lost)
        return result, speed, True
    result, speed, _ = max(tried.values(), key=lambda t: t[1].speedup)
    return result, speed, False


def _predicted_goal(history: list[tuple[float, float]], goal_ms: float,
                    calibration: float, step: float = 0.05) -> float:
    """The predicted latency to search for so that the measured one meets ``goal_ms``:
    interpolated between the nearest measured attempts on either side of the goal, else
    scaled by the nearest attempt's measured-to-predicted ratio (before any, by the dense
    model's). While every attempt missed on one side, it asks for at least ``step`` beyond
    the nearest of them, so that a noisy measurement cannot send the search back to
    widths already measured."""
    if not history:
        return goal_ms / calibration
    above = [h for h in history if h[1] > goal_ms]
    below = [h for h in history if h[1] <= goal_ms]
    if above and below:
        (p1, m1), (p2, m2) = min(above, key=lambda h: h[1]), max(below, key=lambda h: h[1])
        if m1 > m2:
            return p2 + (goal_ms - m2) * (p1 - p2) / (m1 - m2)
    predicted, measured = min(history, key=lambda h: abs(h[1] - goal_ms))
    want = goal_ms * predicted / measured
    if above and not below:  # all too slow: narrower than the narrowest tried
        want = min(want, min(p for p, _ in above) * (1 - step))
    if below and not above:  # all faster than needed: wider than the widest tried
        want = max(want, max(p for p, _ in below) * (1 + step))
    return want


def _fix(found: _Search, start: dict[int, int], slow: Speed, attempt: Callable, attempts: int,
         calibration: float, dense_ms: float, target: Target) -> tuple[PruneResult, Speed]:
    """Narrow a model that measured not faster to fast widths, from where it stands, until
    the measurement says faster; :class:`SlowerError` when that does not happen."""
    path = WidthPath(found.choices, found.evaluator, start=start)
    # measured in the dense model's milliseconds (the pair's ratio), over predicted
    scale = dense_ms / slow.speedup / path.points[0].ms if path.points[0].ms > 0 else calibration
    speed = slow
    for _ in range(attempts):
        point = search(path, dense_ms / FIX_MARGIN / scale) or path.fastest()
        result, speed = attempt(point.keep, "fix: narrower fast widths")
        if speed.faster:
            return result, speed
        scale = dense_ms / speed.speedup / point.ms if point.ms > 0 else scale
        if point is path.points[-1] and path.done:
            break
    raise SlowerError(f"the pruned model is not faster than dense on {target.describe()} "
                      f"({speed.describe()}), even at narrower fast widths; nothing written")
