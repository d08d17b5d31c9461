"""The whole job into a folder: prune, save, export both models, check ONNX, evaluate on
data when given, draw where the channels went, write a report.

``prune_to_dir`` is what ``structprune prune`` runs, and ``sweep`` runs it once per ratio.
Everything is written to a staging folder beside the output and moved into place only when
all of it succeeded, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch.nn as nn

from .api import PruneResult, prune
from .data import DataSplits
from .errors import StructPruneError
from .evaluate import evaluate, plot_confusion
from .export import export_onnx, onnx_parity
from .io import save
from .plan import Plan, PlanSettings
from .plots import plot_widths
from .recover import recover
from .score import calibration
from .sensitivity import auto_plan
from .sensitivity import plot as plot_sensitivity
from .tune import fastest_rounding


def writable_parent(out: Path) -> Path:
    """The existing folder to stage output in; fails before any work if it is not writable."""
    if out.exists() and not out.is_dir():
        raise StructPruneError(f"--out {out} exists and is not a directory")
    probe = out
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise StructPruneError(f"--out {out}: {probe} is not writable; choose another directory")
    return probe


def prune_to_dir(model: nn.Module, example_inputs: Sequence[Any], out: str | os.PathLike, *,
                 ratio: float | None = None, plan: Plan | None = None,
                 round_to: int | str = 1, tune_batch: int = 1, exporter: str = "auto",
                 simplify: bool = False, onnx: bool = True, data: DataSplits | None = None,
                 auto: bool = False, recover_with: str | Sequence[str] | None = None,
                 calibration_batches: int = 8, record: dict[str, Any] | None = None,
                 progress: Callable[[str], None] = lambda step: None,
                 **settings: Any) -> tuple[PruneResult, dict[str, Any]]:
    """Prune ``model`` (by ``ratio``, or apply ``plan``) and write into ``out``: ``plan.json``,
    ``pruned.safetensors``, ``dense.onnx`` and ``pruned.onnx`` (unless ``onnx=False``),
    ``widths.png`` and ``report.json`` (the figures, plus ``record``). With ``data``, both
    models are evaluated on its validation split (``dense`` and ``pruned`` metrics in the
    report, ``confusion.png``), its training split feeds the data-driven criteria, and
    ``auto`` chooses per-group ratios for ``macs_budget`` from each group's measured
    sensitivity (``sensitivity.json`` and ``.png``). ``round_to="auto"`` picks the multiple
    that times fastest here. ``recover_with`` (``"bn"``, ``"bias"``, ``"lsq"`` or a list;
    default ``"bn"`` when data is given) then brings the pruned model's kept weights closer to
    the dense model on ``calibration_batches`` training batches, before anything is saved.
    Returns the result and the report's figures."""
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=".structprune-", dir=writable_parent(out)))
    try:
        start = time.perf_counter()
        progress("prune + verify")
        if ratio is None:  # a threshold or a budget decides instead
            ratio = PlanSettings().ratio
        if data is not None:
            settings["data"] = data.train
        sensitivity = None
        if auto:
            plan, sensitivity = auto_plan(model, example_inputs, data.val, **settings)
            (staging / "sensitivity.json").write_text(json.dumps(sensitivity, indent=1) + "\n")
            plot_sensitivity(sensitivity, staging / "sensitivity.png")
        settings["calibration_batches"] = calibration_batches
        if plan is not None:
            result = prune(model, example_inputs, plan=plan, **settings)
        elif round_to == "auto":
            result = fastest_rounding(model, example_inputs, ratio, batch=tune_batch, **settings)
        else:
            result = prune(model, example_inputs, ratio, round_to=round_to, **settings)
        if recover_with is None:
            recover_with = "bn" if data is not None else "none"
        recovery = None
        if recover_with != "none":
            if data is None:
                raise StructPruneError("recovery needs calibration data: pass --data")
            progress("recover")
            batches = calibration(data.train, calibration_batches)
            recovery = recover(result.model, model, result.plan, result.analysis, batches,
                               recover_with)
        save(result.model, staging, result.plan)
        plot_widths(result.plan, result.analysis.sizes, staging / "widths.png")
        figures = dict(result.figures)
        figures["verification"] = result.verification.to_json() if result.verification else None
        figures["recovery"] = recovery
        if onnx:
            progress("export dense.onnx")
            figures["exporter_dense"] = export_onnx(model, example_inputs, staging / "dense.onnx",
                                                    exporter, simplify=simplify)
            progress("export pruned.onnx")
            figures["exporter_pruned"] = export_onnx(result.model, example_inputs,
                                                     staging / "pruned.onnx", exporter,
                                                     simplify=simplify)
            figures["onnx_rel_error"] = onnx_parity(staging / "pruned.onnx", result.model,
                                                    example_inputs)
        if data is not None:
            progress("evaluate")
            scores = {"dense": evaluate(model, data.val), "pruned": evaluate(result.model, data.val)}
            plot_confusion(scores, staging / "confusion.png", data.classes)
            figures["metrics"] = {name: m.to_json() for name, m in scores.items()}
            figures["data"] = data.summary()
        figures.update(record or {})
        figures["input_shapes"] = [list(x.shape) for x in example_inputs]
        figures["wall_seconds"] = time.perf_counter() - start
        (staging / "report.json").write_text(json.dumps(figures, indent=1, default=float) + "\n")
        out.mkdir(parents=True, exist_ok=True)
        for item in staging.iterdir():
            os.replace(item, out / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result, figures
