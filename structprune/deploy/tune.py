"""Rounding found by measurement: the kept widths that are fast on the target runtime.

Odd channel counts fall off the fast kernels (cuDNN's tensor-core tiles, ONNX Runtime's
blocked convolutions), so a model pruned to arbitrary widths can run *slower* than the
dense one, and no single multiple is best everywhere. ``fastest_rounding`` prunes with each
candidate ``round_to``, times every candidate and the dense model side by side on the
runtime that will run it, and keeps the fastest.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from structprune.config import PruneConfig, make_config
from structprune.core.api import PruneResult, prune
from structprune.core.registry import RuleRegistry
from structprune.deploy import bench
from structprune.deploy.runtimes import Target, make_target
from structprune.errors import PlanError

CANDIDATES = (1, 8, 16, 32, 64)


def default_runtime() -> str:
    return "torch-cuda-fp16" if torch.cuda.is_available() else "ort-cpu"


def _runners(models: Sequence[nn.Module], example_inputs: Sequence[Any], target: Target,
             tmp: Path) -> list[bench.Runner]:
    shapes = [tuple(x.shape) for x in example_inputs if isinstance(x, torch.Tensor)]
    if not target.uses_onnx:
        return [target.torch_runner(model, shapes) for model in models]
    from structprune.deploy.export import export_onnx

    runners = []
    for i, model in enumerate(models):
        path = tmp / f"candidate_{i}.onnx"
        export_onnx(model, example_inputs, path, exporter="torchscript")
        runners.append(target.onnx_runner(path, shapes))
    return runners


def fastest_rounding(model: nn.Module, example_inputs: Sequence[Any], ratio: float | None = None,
                     *, config: PruneConfig | None = None, data: Iterable | None = None,
                     registry: RuleRegistry | None = None, leaf_modules: Sequence[type] = (),
                     candidates: Sequence[int] = CANDIDATES, runtime: str | Target | None = None,
                     batch: int = 1, repeats: int = 10, tolerance: float = 0.03,
                     **settings: Any) -> PruneResult:
    """Prune with the ``round_to`` among ``candidates`` that runs fastest on ``runtime`` (a
    runtime name, timed at ``batch``, or a :class:`Target`).

    The pass settings are ``config`` with ``ratio`` and ``settings`` (its field names)
    replaced, as :func:`structprune.prune` takes them; their ``round_to`` is what this
    chooses, so it must be left at 1 or ``"auto"``. Candidates within ``tolerance`` of the
    fastest count as ties, and the smallest multiple (closest to the requested ratio) wins.
    The measurements are in ``result.figures["rounding"]``.
    """
    config = make_config(config, ratio, **settings)
    if config.round_to not in (1, "auto"):
        raise PlanError(f"fastest_rounding chooses round_to itself: leave it 'auto', not "
                        f"{config.round_to}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    target = runtime if isinstance(runtime, Target) else \
        make_target(runtime or default_runtime(), batch=batch)
    # timing depends on the widths alone: the candidates skip the sequential channel choice
    trials = {c: prune(model, example_inputs,
                       config=config.replace(round_to=c, check=False, sequential=False),
                       data=data, registry=registry, leaf_modules=leaf_modules)
              for c in candidates}
    with tempfile.TemporaryDirectory() as tmp:
        runners = _runners([model] + [t.model for t in trials.values()], example_inputs,
                           target, Path(tmp))
        times = bench.interleaved_many(runners, warmup=3, repeats=repeats, max_seconds=60,
                                       sync=target.sync())
    medians = [sorted(t)[len(t) // 2] for t in times]
    dense_ms, trial_ms = medians[0], dict(zip(trials, medians[1:], strict=True))
    best = min(trial_ms.values())
    chosen = min(c for c, ms in trial_ms.items() if ms <= best * (1 + tolerance))
    result = prune(model, example_inputs, config=config.replace(round_to=chosen), data=data,
                   registry=registry, leaf_modules=leaf_modules)
    result.figures["rounding"] = {
        "runtime": target.runtime, "threads": target.cpu_threads, "batch": target.batch,
        "dense_ms": dense_ms, "chosen": chosen,
        "candidates": [{"round_to": c, "ms": ms, "speedup": dense_ms / ms,
                        "macs_ratio": trials[c].figures["macs_ratio"]}
                       for c, ms in trial_ms.items()],
    }
    return result  # its plan's settings already say round_to=chosen
