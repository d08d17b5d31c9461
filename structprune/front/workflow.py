"""The jobs that write a run folder: prune a model into one, fine-tune the pruned model in
one, train a model into one.

``prune_to_dir`` is what ``structprune prune`` runs (and ``sweep`` once per ratio): prune,
save, export both models, check ONNX, evaluate on data when given, draw where the channels
went, write a report. Each job writes through :mod:`structprune.front.runs` (a staged folder
published whole, atomic files in place, checkpoints).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn
from safetensors.torch import save_file

from structprune.accuracy import distributed
from structprune.accuracy.data import DataSplits
from structprune.accuracy.evaluate import (
    FidelityTally,
    Metrics,
    evaluate,
    fidelity,
    fidelity_tally,
    metrics,
    plot_confusion,
    predict,
)
from structprune.accuracy.recover import recover
from structprune.accuracy.sensitivity import auto_plan
from structprune.accuracy.sensitivity import plot as plot_sensitivity
from structprune.accuracy.sparsity import BNL1, GroupLasso
from structprune.accuracy.train import fit
from structprune.config import OnnxSignature, PruneConfig, RunConfig, TargetConfig
from structprune.core.api import PruneResult, prune
from structprune.core.plan import Plan, compose
from structprune.core.prepare import prepare
from structprune.core.registry import RuleRegistry
from structprune.core.score import calibration
from structprune.core.selection import make_plan, plan_toward, refine
from structprune.deploy.export import export_onnx, export_pair, onnx_parity, parity_batch
from structprune.deploy.speed import prune_for_target
from structprune.deploy.tune import fastest_rounding
from structprune.errors import StructPruneError
from structprune.files import atomic_write
from structprune.front.io import PLAN, save
from structprune.front.plots import plot_widths
from structprune.front.quantize import quantize_dir
from structprune.front.runs import (
    pruned_model,
    read_checkpoint,
    read_report,
    staged,
    write_checkpoint,
    write_report,
)
from structprune.front.yolo import (
    CHECKPOINT,
    is_ultralytics_model,
    save_ultralytics_checkpoint,
    train_pruned,
    yolo_metrics,
    yolo_source,
)
from structprune.tree import random_inputs


def prune_to_dir(model: nn.Module, example_inputs: Sequence[Any], out: str | os.PathLike,
                 config: PruneConfig, *, run: RunConfig | None = None,
                 target: TargetConfig | None = None, plan: Plan | None = None,
                 data: DataSplits | None = None, registry: RuleRegistry | None = None,
                 leaf_modules: Sequence[type] = (), record: dict[str, Any] | None = None,
                 progress: Callable[[str], None] = lambda step: None,
                 ) -> tuple[PruneResult, dict[str, Any]]:
    """Prune ``model`` (by the pass settings, or apply ``plan``) and write into ``out``:
    ``plan.json``, ``pruned.safetensors``, ``dense.onnx`` and ``pruned.onnx`` (unless
    ``run.onnx`` is off), ``widths.png`` and ``report.json`` (the figures, plus ``record``).

    ``config`` is the pass (:class:`~structprune.config.PruneConfig`), as
    :func:`structprune.prune` takes it; ``run`` says what happens around the pass
    (:class:`~structprune.config.RunConfig`). With ``data``, both models are evaluated
    on its validation split (``dense`` and ``pruned`` metrics in the report,
    ``confusion.png``; without labels the pruned model's ``fidelity`` to the dense one,
    :func:`~structprune.accuracy.evaluate.fidelity`), its training split feeds the
    data-driven criteria, and ``run.auto`` chooses per-group ratios for ``macs_budget``
    from each group's measured sensitivity (``sensitivity.json`` and ``.png``).
    ``round_to="auto"`` picks the multiple that times fastest here. The recovery methods
    (``run.recover``; ``bn`` by default when data is given) then bring the pruned model's
    kept weights closer to the dense model on ``calibration_batches`` training batches,
    before anything is saved. With ``run.steps``
    > 1 the ratio's widths are reached in that many steps, each narrowing every group by about
    the same share of what is left, recovered and then fine-tuned for ``run.finetune_epochs``
    on ``data`` (distilled
    from the dense model with ``run.distill``, and always on data without labels); the steps
    compose into one plan in dense indices, checked by applying it to the dense model, which
    the final weights load onto.
    With a ``target``, widths are chosen from its runtime's measured latency table and the
    pruned model is timed against the dense one there before anything is written
    (:func:`structprune.deploy.speed.prune_for_target`).
    Returns the result and the report's figures."""
    run = run or RunConfig()
    run.check(config, target, plan_given=plan is not None, data_given=data is not None)
    train = data.train if data is not None else None
    # with a target, the files written are exported as the ones timed on it were
    exporter = "torchscript" if target is not None and run.exporter == "auto" else run.exporter
    with staged(out) as staging:
        start = time.perf_counter()
        progress("prune + verify")
        sensitivity = recalibrate = None
        if run.auto:
            # measured as the model will be used: after BatchNorm recalibration, if it follows
            # (on the batches the recovery below takes)
            recalibrate = (calibration(data.train, config.calibration_batches)
                           if "bn" in run.recovery(True) else None)
            plan, sensitivity = auto_plan(model, example_inputs, data.val, config, data=train,
                                          registry=registry, leaf_modules=leaf_modules,
                                          recalibrate=recalibrate)
            (staging / "sensitivity.json").write_text(json.dumps(sensitivity, indent=1) + "\n")
            plot_sensitivity(sensitivity, staging / "sensitivity.png")
        if run.steps > 1:
            result = _iterative(model, example_inputs, config, run, data, progress, registry,
                                leaf_modules, source=yolo_source(record or {}))
        elif plan is not None:
            result = prune(model, example_inputs, config=config, plan=plan, registry=registry,
                           leaf_modules=leaf_modules)
        elif target is not None:
            result = prune_for_target(
                model, example_inputs, target, config, data=train, registry=registry,
                leaf_modules=leaf_modules, exporter=exporter,
                progress=lambda step: progress(f"prune + verify: {step}"))
        elif config.round_to == "auto":
            result = fastest_rounding(model, example_inputs, config=config, data=train,
                                      registry=registry, leaf_modules=leaf_modules,
                                      batch=run.tune_batch)
        else:
            result = prune(model, example_inputs, config=config, data=train, registry=registry,
                           leaf_modules=leaf_modules)
        detection_yaml = data.dataset_yaml if data is not None and \
            is_ultralytics_model(model) else None
        imgsz = int(max(example_inputs[0].shape[-2:]))  # ultralytics' square image size
        map_figures = {}
        if detection_yaml:  # ultralytics' own validator, before recovery changes the model
            progress("mAP of the dense and the pruned model")
            map_figures = {"dense": yolo_metrics(model, detection_yaml, imgsz),
                           "pruned": yolo_metrics(result.model, detection_yaml, imgsz)}
        # steps recover each step before its fine-tuning (_iterative); recovering the
        # fine-tuned model toward the dense one afterwards would work against the tuning
        recover_with = run.recovery(data is not None) if run.steps == 1 else ()
        recovery = None
        if recover_with:
            progress("recover")
            batches = recalibrate or calibration(data.train, config.calibration_batches)
            recovery = recover(result.model, model, result.plan, result.analysis, batches,
                               list(recover_with), memory_budget=run.memory_budget,
                               progress=sys.stderr.isatty())
        if detection_yaml and recovery is not None:
            map_figures["recovered"] = yolo_metrics(result.model, detection_yaml, imgsz)
        save(result.model, staging, result.plan)
        if is_ultralytics_model(result.model):  # back into ultralytics: YOLO("pruned.pt")
            save_ultralytics_checkpoint(result.model, yolo_source(record or {}),
                                        staging / CHECKPOINT, imgsz=imgsz)
        plot_widths(result.plan, result.analysis.sizes, staging / "widths.png")
        figures = dict(result.figures)
        figures["verification"] = result.verification.to_json() if result.verification else None
        figures["recovery"] = recovery
        if map_figures:
            figures["map"] = map_figures
        if run.onnx:
            progress("export dense.onnx and pruned.onnx")
            figures.update(export_pair(model, result.model, example_inputs,
                                       staging / "dense.onnx", staging / "pruned.onnx",
                                       exporter, simplify=run.simplify,
                                       signature=run.signature))
        if run.quantize is not None:  # INT8 twins of both files, measured beside them
            progress("quantize dense.onnx and pruned.onnx")
            figures["quantize"] = quantize_dir(
                staging, data, run.quantize, [list(x.shape) for x in example_inputs],
                threads=target.threads if target is not None else None)
        if data is not None:
            progress("evaluate")
            if data.labelled:
                scores = {"dense": evaluate(model, data.val),
                          "pruned": evaluate(result.model, data.val)}
                plot_confusion(scores, staging / "confusion.png", data.classes)
                figures["metrics"] = {name: m.to_json() for name, m in scores.items()}
            else:
                figures["fidelity"] = fidelity(result.model, model, data.val)
            figures["data"] = data.summary()
        figures.update(record or {})
        figures["input_shapes"] = [list(x.shape) for x in example_inputs]
        if run.signature is not None:  # what a later export of the folder's files keeps
            figures["onnx_signature"] = run.signature.to_json()
        figures["wall_seconds"] = time.perf_counter() - start
        write_report(staging, figures)
    return result, figures


def _iterative(model: nn.Module, example_inputs: Sequence[Any], config: PruneConfig,
               run: RunConfig, data: DataSplits | None, progress: Callable[[str], None],
               registry: RuleRegistry | None, leaf_modules: Sequence[type],
               source: str | None = None) -> PruneResult:
    """Prune by ``config.ratio`` in ``run.steps`` steps with fine-tuning between (for an
    ultralytics model given a dataset yaml, ultralytics' own trainer; ``source`` is its
    checkpoint or config); each step's pruned model is recovered (``run.recovery``) toward
    the model the step began from before it is fine-tuned. Each step narrows every group
    geometrically toward the widths one step would give (:func:`plan_toward`), scored on
    the model as it is then, and the last step lands on those widths. One composed plan."""
    train = data.train if data is not None else None
    current, composed, target, history, recoveries = model, None, None, [], []
    distill = run.distill or (data is not None and not data.labelled)  # no labels: distil
    recover_with = list(run.recovery(data is not None))
    for step in range(run.steps):
        progress(f"step {step + 1}/{run.steps}")
        prepared = prepare(current, example_inputs, config, data=train, registry=registry,
                           leaf_modules=leaf_modules)
        if target is None:  # the widths one step would reach; the steps end on them
            target = make_plan(prepared.analysis, prepared.scores, config)
        plan = plan_toward(prepared.analysis, prepared.scores, config, target,
                           (step + 1) / run.steps)
        if prepared.rescore is not None:  # the step's widths, channels on pruned inputs
            plan = refine(prepared.analysis, prepared.scores, config, plan, prepared.rescore)
        result = prune(current, example_inputs, config=config, registry=registry,
                       leaf_modules=leaf_modules, plan=plan)
        composed = result.plan if composed is None else compose(composed, result.plan)
        if recover_with:  # toward the step's starting model, before it is fine-tuned
            progress(f"step {step + 1}/{run.steps}: recover")
            recoveries.append(recover(
                result.model, current, result.plan, result.analysis,
                calibration(data.train, config.calibration_batches), recover_with,
                memory_budget=run.memory_budget, progress=sys.stderr.isatty()))
        current = result.model
        if run.finetune_epochs and data.dataset_yaml and is_ultralytics_model(current):
            # ultralytics' own trainer on its dataset yaml, keeping the pruned widths
            with tempfile.TemporaryDirectory() as runs:
                trained = train_pruned(current, data.dataset_yaml, run.finetune_epochs,
                                       project=runs, name=f"step{step + 1}",
                                       teacher=model if run.distill else None,
                                       imgsz=int(max(example_inputs[0].shape[-2:])),
                                       seed=step, source=source)
            history.append({"step": step + 1, "metrics": trained["metrics"]})
            current.eval()
        elif run.finetune_epochs:
            history += fit(current, data.train, run.finetune_epochs, seed=step,
                           teacher=model if distill else None)
            current.eval()
    final = prune(model, example_inputs, config=config, plan=composed, registry=registry,
                  leaf_modules=leaf_modules)
    final.model.load_state_dict(current.state_dict())  # the tuned weights fit the plan
    final.figures["steps"] = {"steps": run.steps,
                              "finetune_epochs": run.finetune_epochs, "distill": distill,
                              "history": history, "recovery": recoveries}
    return final


def finetune_dir(directory: str | os.PathLike, dense: nn.Module, data: DataSplits, epochs: int,
                 *, distill: bool = False, temperature: float = 4.0,
                 distill_weight: float = 0.5, feature_weight: float = 0.0,
                 features: str | Sequence[str] = "auto", lr: float = 1e-3,
                 mix: float = 1.0, resume: bool = False, exporter: str = "auto", seed: int = 0,
                 progress: bool = True) -> dict[str, Any]:
    """Fine-tune the pruned model saved in ``directory`` (plan.json + safetensors) on
    ``data``'s training split, optionally distilled from ``dense``; save a checkpoint after
    every epoch (``resume`` continues from it), then write the weights, re-export
    ``pruned.onnx`` with its parity check when the folder has one, and record accuracy,
    per-class recall and macro F1 before and after in ``report.json``. Returns that record.

    Data without labels needs ``distill``: the pruned model then learns to match the dense
    one on every output tensor (label-free, :func:`~structprune.accuracy.train.fit`), and
    the record holds its ``fidelity`` to the dense model before and after
    (:func:`~structprune.accuracy.evaluate.fidelity`) in place of the metrics. With
    ``feature_weight`` > 0 the feature maps of ``features`` (module names, or ``"auto"``
    for every convolution) are matched too, on the channels the folder's plan kept. Its
    batches are blended by mixup (``mix``, the Beta parameter; 0 turns it off), and when
    the fidelity on the validation split ends worse than it began, the weights it started
    from are kept and the record's ``kept`` says why: a few hundred unlabeled samples can
    overfit, and nothing then tells the user."""
    if not data.labelled and not distill:
        raise StructPruneError("no labels: pass --distill to train against the dense model")
    directory = Path(directory)
    report = read_report(directory)
    plan = Plan.load(directory / PLAN)
    pruned = pruned_model(directory, dense)
    writer = distributed.rank() == 0  # under torchrun, rank 0 alone writes

    def measure(model: nn.Module) -> dict[str, Any]:
        if data.labelled:
            return evaluate_everywhere(model, data.val, data.num_classes).to_json()
        return fidelity_everywhere(model, dense, data.val)

    before = measure(pruned)
    # without labels, the weights to go back to if distillation ends further from dense
    start_state = None if data.labelled else \
        {k: v.detach().clone() for k, v in pruned.state_dict().items()}
    dense_metrics = evaluate_everywhere(dense, data.val, data.num_classes).to_json() \
        if data.labelled else None
    start, optimizer_state = 0, None
    if resume:
        start, optimizer_state = read_checkpoint(directory, pruned)
        if start >= epochs:
            raise StructPruneError(f"the checkpoint in {directory} has {start} epochs done, "
                                   f"--epochs {epochs} asks for no more")

    def checkpoint(epoch: int, optimizer: Any) -> None:
        if writer:
            write_checkpoint(directory, pruned, optimizer, epoch, epochs)

    history = fit(pruned, distributed.shard(data.train, seed), epochs, lr=lr, seed=seed,
                  progress=progress and writer,
                  teacher=dense if distill else None, temperature=temperature,
                  distill_weight=distill_weight, feature_weight=feature_weight,
                  features=features, plan=plan, mix=mix, start_epoch=start,
                  optimizer_state=optimizer_state, on_epoch_end=checkpoint)
    distributed.sync_buffers(pruned)
    pruned.eval()
    after = measure(pruned)
    kept = None
    if start_state is not None and not closer(after, before):
        pruned.load_state_dict(start_state)
        kept = ("the weights it started from: the fidelity to the dense model on the "
                "validation split did not improve")
        after = before
    record: dict[str, Any] = {
        "epochs": epochs, "resumed_from_epoch": start, "distill": distill, "lr": lr,
        "temperature": temperature if distill else None,
        "distill_weight": distill_weight if distill and data.labelled else None,
        "feature_weight": feature_weight if distill else None,
        "mix": mix if distill and not data.labelled else None, "history": history,
        "data": data.summary(), "labelled": data.labelled,
        **({"dense": dense_metrics, "before": before, "after": after} if data.labelled
           else {"fidelity": {"before": before, "after": after}}),
        "world_size": distributed.world_size(), **({"kept": kept} if kept else {})}
    if not writer:
        return record
    save(pruned, directory, plan)
    if (directory / "pruned.onnx").exists():
        inputs = random_inputs(report["input_shapes"])
        signature = OnnxSignature.from_json(report.get("onnx_signature"))
        atomic_write(directory / "pruned.onnx",
                     lambda path: export_onnx(pruned, inputs, path, exporter,
                                              dense_error=report.get("onnx_dense_rel_error"),
                                              signature=signature))
        record["onnx_rel_error"] = onnx_parity(directory / "pruned.onnx", pruned, inputs,
                                               batch=parity_batch(signature))
    report["finetune"] = record
    write_report(directory, report)
    return record


def closer(after: dict[str, Any], before: dict[str, Any]) -> bool:
    """Whether fidelity ``after`` is closer to the dense model than ``before``: by top-1
    agreement where both have it (a classifier), else by the mean relative output error."""
    if after.get("top1_agreement") is not None and before.get("top1_agreement") is not None:
        if after["top1_agreement"] != before["top1_agreement"]:
            return after["top1_agreement"] > before["top1_agreement"]

    def mean_error(found: dict[str, Any]) -> float:
        errors = list((found.get("rel_error") or {}).values())
        return sum(errors) / len(errors) if errors else float("inf")

    return mean_error(after) < mean_error(before)


SPARSITY = ("none", "bn", "group")


def train_to_dir(model: nn.Module, example_inputs: Sequence[Any], data: DataSplits,
                 out: str | os.PathLike, epochs: int, *, sparsity: str = "none",
                 strength: float = 1e-4, lr: float = 1e-3, seed: int = 0,
                 record: dict[str, Any] | None = None) -> dict[str, Any]:
    """Train ``model`` on ``data`` (with a sparsity regulariser over the coupled groups the
    analysis finds: ``bn`` for L1 on BatchNorm scales, ``group`` for group lasso), then write
    ``weights.safetensors`` (loadable by ``prune --weights``) and ``train.json`` (history,
    accuracy, recall and F1 on the validation split) into ``out``."""
    if sparsity not in SPARSITY:
        raise StructPruneError(f"unknown --sparsity {sparsity!r}: use one of "
                               + ", ".join(SPARSITY))
    writer = distributed.rank() == 0  # under torchrun, rank 0 alone writes
    with staged(out, writer=writer) as staging:
        regularizer = None
        if sparsity != "none":
            analysis = prepare(model, example_inputs, scored=False).analysis
            regularizer = (BNL1 if sparsity == "bn" else GroupLasso)(analysis, strength)
        history = fit(model, distributed.shard(data.train, seed), epochs, lr=lr, seed=seed,
                      regularizer=regularizer, progress=writer)
        distributed.sync_buffers(model)
        model.eval()
        metrics = evaluate_everywhere(model, data.val, data.num_classes)
        digests = distributed.gather(distributed.weights_digest(model))
        summary = {"epochs": epochs, "sparsity": sparsity, "strength": strength, "lr": lr,
                   "seed": seed, "data": data.summary(), "history": history,
                   "metrics": metrics.to_json(), "world_size": distributed.world_size(),
                   "ranks_hold_the_same_weights": len(set(digests)) == 1, **(record or {})}
        if writer:
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                      str(staging / "weights.safetensors"))
            (staging / "train.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


def evaluate_everywhere(model: nn.Module, batches: Iterable[Any], num_classes: int) -> Metrics:
    """Metrics of ``model`` on ``batches``; under torchrun each rank predicts its share and
    the predictions of all ranks are pooled."""
    shares = distributed.gather(predict(model, distributed.shard(batches),
                                        num_classes=num_classes))
    y_true = np.concatenate([share[0] for share in shares])
    y_pred = np.concatenate([share[1] for share in shares])
    return metrics(y_true, y_pred, num_classes)


def fidelity_everywhere(model: nn.Module, reference: nn.Module,
                        batches: Iterable[Any]) -> dict[str, Any]:
    """:func:`~structprune.accuracy.evaluate.fidelity` of ``model`` to ``reference`` (the
    dense model) on ``batches``; under torchrun each rank measures its share and the tallies
    of all ranks are pooled."""
    shares = distributed.gather(fidelity_tally(model, reference, distributed.shard(batches)))
    return FidelityTally.merge(shares).result()


__all__ = ["SPARSITY", "evaluate_everywhere", "fidelity_everywhere", "finetune_dir",
           "prune_to_dir", "train_to_dir"]
