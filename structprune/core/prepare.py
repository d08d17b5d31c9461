"""The front half of the pass, said once: capture -> analyse -> settle literals -> score.

Every caller that needs a model's groups (``prune``, the speed search, ``--auto``, ``structprune
analyze``, sparsity training) gets them from :func:`prepare`, so they all see the same
groups: on a torch.export capture, the literals that do not follow channel counts are pinned
(:func:`structprune.core.literals.settle_literals`) before anything is listed or scored.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch.nn as nn

from structprune.config import PruneConfig
from structprune.core.analyse import Analysis, analyse
from structprune.core.capture import capture
from structprune.core.literals import settle_literals
from structprune.core.registry import RuleRegistry
from structprune.core.score import criterion_report, make_criterion, normalise, score


@dataclass
class Prepared:
    """A model's analysis (literals settled), the scores of its prunable groups (by group
    index; empty when not scored), the seconds each step took and what the report says
    about the criterion (:func:`~structprune.core.score.criterion_report`; empty when not
    scored). With ``sequential``, ``rescore`` maps the units each group loses (by group
    index) to its scores measured on the pruned inputs, normalised as ``scores`` are."""

    analysis: Analysis
    scores: dict[int, np.ndarray] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    criterion: dict[str, Any] = field(default_factory=dict)
    rescore: Callable[[Mapping[int, int]], dict[int, np.ndarray]] | None = None


def prepare(model: nn.Module, example_inputs: Sequence[Any] | Any,
            config: PruneConfig | None = None, *, data: Iterable | None = None,
            registry: RuleRegistry | None = None, leaf_modules: Sequence[type] = (),
            scored: bool = True) -> Prepared:
    """Capture ``model`` on ``example_inputs`` (``config.capture_method``), analyse it, settle
    the literals of a torch.export capture, and (with ``scored``) score every group with a
    unit that may go by ``config.criterion`` (``data`` feeds the data-driven criteria).

    Every such group is scored whatever ``exact_only`` and ``ignore`` say, so that a group's
    scores (a seeded criterion's draws too) do not depend on which other groups are pruned.
    """
    config = config or PruneConfig()
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    t0 = time.perf_counter()
    cap = capture(model, example_inputs, leaf_modules, registry, config.capture_method)
    t1 = time.perf_counter()
    analysis = settle_literals(model, analyse(cap, registry), registry)
    t2 = time.perf_counter()
    scores, report, rescore = {}, {}, None
    if scored:
        name = config.criterion if isinstance(config.criterion, str) else None
        measure = make_criterion(name, analysis, data=data, seed=config.seed,
                                 batches=config.calibration_batches) \
            if name is not None else config.criterion
        if config.sequential:  # the dense pass keeps what rescore will read again
            measure.expect_rescore()
        scores = score(analysis, measure, analysis.prunable_groups(),
                       normalize=config.normalize)
        report = criterion_report(measure, name)
        if config.sequential:
            def rescore(removals: Mapping[int, int]) -> dict[int, np.ndarray]:
                rescored = measure.rescore(removals, config.exact_only)
                report.update(criterion_report(measure, name))  # fallbacks found on the way
                return {g: normalise(s, config.normalize) for g, s in rescored.items()}
    t3 = time.perf_counter()
    return Prepared(analysis, scores, {"capture": t1 - t0, "analyse": t2 - t1,
                                       "score": t3 - t2}, report, rescore)


__all__ = ["Prepared", "prepare"]
