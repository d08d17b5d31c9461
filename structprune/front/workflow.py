"""The whole job into a folder: prune, save, export both models, check ONNX, evaluate on
data when given, draw where the channels went, write a report.

``prune_to_dir`` is what ``structprune prune`` runs, and ``sweep`` runs it once per ratio.
Everything is written to a staging folder beside the output and moved into place only when
all of it succeeded, so a failure leaves nothing half-written.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from structprune.accuracy import distributed
from structprune.accuracy.data import DataSplits, load_data
from structprune.accuracy.evaluate import Metrics, evaluate, metrics, plot_confusion, predict
from structprune.accuracy.recover import recover
from structprune.accuracy.sensitivity import auto_plan
from structprune.accuracy.sensitivity import plot as plot_sensitivity
from structprune.accuracy.sparsity import BNL1, GroupLasso
from structprune.accuracy.train import fit
from structprune.core.analyse import analyse
from structprune.core.api import PruneResult, prune
from structprune.core.capture import capture
from structprune.core.plan import Plan, PlanSettings, compose
from structprune.core.score import calibration
from structprune.deploy.bench import interleaved, ort_runner
from structprune.deploy.export import export_onnx, onnx_parity
from structprune.deploy.runtimes import Target
from structprune.deploy.speed import prune_for_target
from structprune.deploy.tune import fastest_rounding
from structprune.errors import StructPruneError
from structprune.front.io import PLAN, load, save
from structprune.front.plots import plot_widths
from structprune.tree import random_inputs


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


def publish(staging: Path, out: Path) -> None:
    """Move everything written to ``staging`` into ``out``, file by file (renames)."""
    out.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        os.replace(item, out / item.name)


def prune_to_dir(model: nn.Module, example_inputs: Sequence[Any], out: str | os.PathLike, *,
                 ratio: float | None = None, plan: Plan | None = None,
                 round_to: int | str = 1, tune_batch: int = 1, exporter: str = "auto",
                 simplify: bool = False, onnx: bool = True, data: DataSplits | None = None,
                 auto: bool = False, steps: int = 1, finetune_epochs: int = 0,
                 distill: bool = False, recover_with: str | Sequence[str] | None = None,
                 calibration_batches: int = 8, record: dict[str, Any] | None = None,
                 progress: Callable[[str], None] = lambda step: None,
                 target: Target | None = None, target_speedup: float | None = None,
                 target_latency: float | None = None, if_slower: str = "fix",
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
    With ``steps`` > 1 the ratio is reached in that many steps, each removing the same share
    of what is left, with ``finetune_epochs`` of fine-tuning on ``data`` (distilled from the
    dense model with ``distill``) after each; the steps compose into one plan in dense
    indices, checked by applying it to the dense model, which the final weights load onto.
    With a ``target`` runtime, widths are chosen from its measured latency table: to
    ``target_speedup`` or ``target_latency`` ms, else by the ratio or budget snapped to fast
    widths, and the pruned model is timed against the dense one there before anything is
    written; one that is not faster is fixed or refused as ``if_slower`` says
    (:func:`structprune.deploy.speed.prune_for_target`).
    Returns the result and the report's figures."""
    out = Path(out)
    if target is None and (target_speedup is not None or target_latency is not None):
        raise StructPruneError("a speed target is measured on a runtime: give --target")
    if target is not None and (steps > 1 or plan is not None or auto):
        raise StructPruneError("--target chooses the widths itself: it does not combine with "
                               "--plan, --steps or --auto")
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
        if steps > 1:
            result = _iterative(model, example_inputs, ratio, steps, finetune_epochs, distill,
                                data, progress, settings)
        elif plan is not None:
            result = prune(model, example_inputs, plan=plan, **settings)
        elif target is not None:
            budget = any(settings.get(k) is not None
                         for k in ("threshold", "macs_budget", "params_budget"))
            # the files written are exported as the ones timed on the target were
            exporter = "torchscript" if exporter == "auto" else exporter
            result = prune_for_target(
                model, example_inputs, target, speedup=target_speedup, latency_ms=target_latency,
                ratio=None if budget else ratio, round_to=round_to, if_slower=if_slower,
                exporter=exporter,
                progress=lambda step: progress(f"prune + verify: {step}"), **settings)
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
        publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return result, figures


def _iterative(model: nn.Module, example_inputs: Sequence[Any], ratio: float, steps: int,
               finetune_epochs: int, distill: bool, data: DataSplits | None,
               progress: Callable[[str], None], settings: dict[str, Any]) -> PruneResult:
    """Prune by ``ratio`` in ``steps`` steps with fine-tuning between; one composed plan."""
    if finetune_epochs and data is None:
        raise StructPruneError("fine-tuning between steps needs --data")
    per_step = 1 - (1 - ratio) ** (1 / steps)
    current, composed, history = model, None, []
    for step in range(steps):
        progress(f"step {step + 1}/{steps}")
        result = prune(current, example_inputs, per_step, **settings)
        composed = result.plan if composed is None else compose(composed, result.plan)
        current = result.model
        if finetune_epochs:
            history += fit(current, data.train, finetune_epochs, seed=step,
                           teacher=model if distill else None)
            current.eval()
    final = prune(model, example_inputs, plan=composed, **settings)
    final.model.load_state_dict(current.state_dict())  # the tuned weights fit the plan
    final.figures["steps"] = {"steps": steps, "ratio_per_step": per_step,
                              "finetune_epochs": finetune_epochs, "distill": distill,
                              "history": history}
    return final


CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"


def finetune_dir(directory: str | os.PathLike, dense: nn.Module, data: DataSplits, epochs: int,
                 *, distill: bool = False, temperature: float = 4.0,
                 distill_weight: float = 0.5, lr: float = 1e-3, resume: bool = False,
                 exporter: str = "auto", seed: int = 0, progress: bool = True,
                 ) -> dict[str, Any]:
    """Fine-tune the pruned model saved in ``directory`` (plan.json + safetensors) on
    ``data``'s training split, optionally distilled from ``dense``; save a checkpoint after
    every epoch (``resume`` continues from it), then write the weights, re-export
    ``pruned.onnx`` with its parity check when the folder has one, and record accuracy,
    per-class recall and macro F1 before and after in ``report.json``. Returns that record."""
    directory = Path(directory)
    report_path = directory / "report.json"
    report = json.loads(report_path.read_text())
    plan = Plan.load(directory / PLAN)
    pruned = load(directory, copy.deepcopy(dense))
    writer = distributed.rank() == 0  # under torchrun, rank 0 alone writes
    before = evaluate_everywhere(pruned, data.val, data.num_classes)
    dense_metrics = evaluate_everywhere(dense, data.val, data.num_classes)
    start, optimizer_state = 0, None
    if resume:
        start, optimizer_state = _read_checkpoint(directory, pruned)
        if start >= epochs:
            raise StructPruneError(f"the checkpoint in {directory} has {start} epochs done, "
                                   f"--epochs {epochs} asks for no more")

    def checkpoint(epoch: int, optimizer: Any) -> None:
        if not writer:
            return
        state = optimizer.state_dict()
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in pruned.state_dict().items()}
        tensors.update({f"optimizer.{index}.{key}": value.contiguous()
                        for index, values in state["state"].items()
                        for key, value in values.items() if isinstance(value, torch.Tensor)})
        _atomic(directory / CHECKPOINT, lambda path: save_file(tensors, str(path)))
        _atomic(directory / CHECKPOINT_STATE, lambda path: path.write_text(json.dumps(
            {"epoch": epoch, "epochs": epochs, "param_groups": state["param_groups"]})))

    history = fit(pruned, distributed.shard(data.train, seed), epochs, lr=lr, seed=seed,
                  progress=progress and writer,
                  teacher=dense if distill else None, temperature=temperature,
                  distill_weight=distill_weight, start_epoch=start,
                  optimizer_state=optimizer_state, on_epoch_end=checkpoint)
    distributed.sync_buffers(pruned)
    pruned.eval()
    after = evaluate_everywhere(pruned, data.val, data.num_classes)
    record: dict[str, Any] = {
        "epochs": epochs, "resumed_from_epoch": start, "distill": distill, "lr": lr,
        "temperature": temperature if distill else None,
        "distill_weight": distill_weight if distill else None, "history": history,
        "data": data.summary(), "dense": dense_metrics.to_json(),
        "before": before.to_json(), "after": after.to_json(),
        "world_size": distributed.world_size()}
    if not writer:
        return record
    save(pruned, directory, plan)
    if (directory / "pruned.onnx").exists():
        inputs = random_inputs(report["input_shapes"])
        _atomic(directory / "pruned.onnx",
                lambda path: export_onnx(pruned, inputs, path, exporter))
        record["onnx_rel_error"] = onnx_parity(directory / "pruned.onnx", pruned, inputs)
    report["finetune"] = record
    _atomic(report_path, lambda path: path.write_text(json.dumps(report, indent=1,
                                                                 default=float) + "\n"))
    return record


def _read_checkpoint(directory: Path, model: nn.Module) -> tuple[int, dict[str, Any]]:
    """Load the checkpoint's weights into ``model``; the epochs done and optimizer state."""
    if not (directory / CHECKPOINT).is_file() or not (directory / CHECKPOINT_STATE).is_file():
        raise StructPruneError(f"{directory} has no checkpoint to resume from: run "
                               "`structprune finetune` without --resume first")
    tensors = load_file(str(directory / CHECKPOINT))
    state = json.loads((directory / CHECKPOINT_STATE).read_text())
    model.load_state_dict({k.removeprefix("model."): v for k, v in tensors.items()
                           if k.startswith("model.")})
    optimizer: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            _, index, name = key.split(".", 2)
            optimizer.setdefault(int(index), {})[name] = value
    return state["epoch"], {"state": optimizer, "param_groups": state["param_groups"]}


def _atomic(path: Path, write: Callable[[Path], Any]) -> Any:
    """``write`` to a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp{path.suffix}")
    try:
        result = write(tmp)
        os.replace(tmp, path)
        return result
    finally:
        tmp.unlink(missing_ok=True)


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
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=".structprune-", dir=writable_parent(out)))
    try:
        regularizer = None
        if sparsity != "none":
            analysis = analyse(capture(model, example_inputs))
            regularizer = (BNL1 if sparsity == "bn" else GroupLasso)(analysis, strength)
        history = fit(model, distributed.shard(data.train, seed), epochs, lr=lr, seed=seed,
                      regularizer=regularizer, progress=distributed.rank() == 0)
        distributed.sync_buffers(model)
        model.eval()
        metrics = evaluate_everywhere(model, data.val, data.num_classes)
        digests = distributed.gather(distributed.weights_digest(model))
        summary = {"epochs": epochs, "sparsity": sparsity, "strength": strength, "lr": lr,
                   "seed": seed, "data": data.summary(), "history": history,
                   "metrics": metrics.to_json(), "world_size": distributed.world_size(),
                   "ranks_hold_the_same_weights": len(set(digests)) == 1, **(record or {})}
        if distributed.rank() == 0:  # one writer
            save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()},
                      str(staging / "weights.safetensors"))
            (staging / "train.json").write_text(json.dumps(summary, indent=1) + "\n")
            publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def evaluate_everywhere(model: nn.Module, batches: Iterable[Any], num_classes: int) -> Metrics:
    """Metrics of ``model`` on ``batches``; under torchrun each rank predicts its share and
    the predictions of all ranks are pooled."""
    shares = distributed.gather(predict(model, distributed.shard(batches),
                                        num_classes=num_classes))
    y_true = np.concatenate([share[0] for share in shares])
    y_pred = np.concatenate([share[1] for share in shares])
    return metrics(y_true, y_pred, num_classes)


def demo(out: str | os.PathLike | None = None, *, ratio: float = 0.5, epochs: int = 3,
         finetune_epochs: int = 3, recover_with: str | Sequence[str] = ("lsq", "bn"),
         distill: bool = True, seed: int = 0,
         say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole loop on the embedded data, nothing downloaded: train the VGG-style digits
    CNN, prune it, recover without training, fine-tune (distilled from the dense model), and
    compare dense and pruned at every step (accuracy, recall, F1, parameters, MACs, ONNX
    Runtime latency on one thread). With ``out``, ``report.json`` holds ``dense`` and
    ``pruned`` (and the plan, weights and ONNX files beside it)."""
    from structprune.front.models import digits_cnn

    data = load_data("digits", (1, 1, 32, 32), seed=seed)
    torch.manual_seed(seed)
    dense = digits_cnn()
    x = (torch.randn(1, 1, 32, 32),)
    say(f"training the digits CNN for {epochs} epochs on {data.summary()}")
    fit(dense, data.train, epochs, seed=seed)
    dense.eval()
    steps: dict[str, Any] = {"dense": evaluate(dense, data.val).to_json()}
    result = prune(dense, x, ratio)
    pruned = result.model
    steps["right after pruning"] = evaluate(pruned, data.val).to_json()
    recovery = recover(pruned, dense, result.plan, result.analysis,
                       calibration(data.train, 8), recover_with)
    steps["after recovery"] = evaluate(pruned, data.val).to_json()
    say(f"fine-tuning for {finetune_epochs} epochs" + (" with distillation" if distill else ""))
    fit(pruned, data.train, finetune_epochs, seed=seed, teacher=dense if distill else None)
    pruned.eval()
    steps["after fine-tuning"] = evaluate(pruned, data.val).to_json()
    figures = result.figures
    with tempfile.TemporaryDirectory() as tmp:
        paths = [Path(tmp) / "dense.onnx", Path(tmp) / "pruned.onnx"]
        for model, path in zip((dense, pruned), paths, strict=True):
            export_onnx(model, x, path, "torchscript")
        runners = [ort_runner(path, 1, [(1, 1, 32, 32)], 1, "CPUExecutionProvider")
                   for path in paths]
        dense_ms, pruned_ms = interleaved(*runners, warmup=5, repeats=50, max_seconds=20)
    latency = [float(np.median(dense_ms)), float(np.median(pruned_ms))]
    report = {
        "dense": {**steps["dense"], "params": figures["params_dense"],
                  "macs": figures["macs_dense"], "ort_cpu_ms": latency[0]},
        "pruned": {**steps["after fine-tuning"], "params": figures["params_pruned"],
                   "macs": figures["macs_pruned"], "ort_cpu_ms": latency[1],
                   "accuracy_before_finetune": steps["after recovery"]["accuracy"],
                   "accuracy_right_after_pruning": steps["right after pruning"]["accuracy"]},
        "recipe": {"ratio": ratio, "criterion": "l2", "epochs": epochs,
                   "recover": list([recover_with] if isinstance(recover_with, str)
                                   else recover_with),
                   "finetune_epochs": finetune_epochs, "distill": distill, "seed": seed,
                   "sparsity_training": None},
        "steps": steps, "recovery": recovery, "data": data.summary(),
    }
    say(_demo_table(report))
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save(pruned, out, result.plan)
        export_onnx(pruned, x, out / "pruned.onnx", "torchscript")
        export_onnx(dense, x, out / "dense.onnx", "torchscript")
        (out / "report.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
        say(f"wrote {out}/report.json, plan.json, pruned.safetensors, dense.onnx, pruned.onnx")
    return report


def _demo_table(report: dict[str, Any]) -> str:
    d, p, steps = report["dense"], report["pruned"], report["steps"]
    lines = [f"{'':30s}{'dense':>12s}{'pruned':>12s}",
             f"{'parameters':30s}{d['params']:>12,d}{p['params']:>12,d}",
             f"{'MACs':30s}{d['macs']:>12,d}{p['macs']:>12,d}",
             f"{'ONNX Runtime, 1 thread (ms)':30s}{d['ort_cpu_ms']:>12.3f}{p['ort_cpu_ms']:>12.3f}"]
    for step in ("right after pruning", "after recovery", "after fine-tuning"):
        m = steps[step]
        lines += [f"{step}:",
                  f"{'  accuracy':30s}{100 * d['accuracy']:>11.2f}%{100 * m['accuracy']:>11.2f}%",
                  f"{'  macro F1':30s}{d['macro_f1']:>12.4f}{m['macro_f1']:>12.4f}",
                  f"{'  lowest class recall':30s}{min(d['recall']):>12.3f}"
                  f"{min(m['recall']):>12.3f}"]
    return "\n".join(lines)
