"""The digits demo: the whole loop on data that ships with scikit-learn, nothing downloaded.

Train the VGG-style digits CNN, prune it, recover without training, fine-tune (distilled from
the dense model), and compare dense and pruned at every step. ``structprune demo`` runs it.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from structprune.accuracy.data import load_data
from structprune.accuracy.evaluate import evaluate
from structprune.accuracy.recover import recover
from structprune.accuracy.train import fit
from structprune.config import QuantizeConfig
from structprune.core.api import prune
from structprune.core.score import calibration
from structprune.deploy.bench import interleaved, ort_runner
from structprune.deploy.export import export_onnx
from structprune.front.io import save
from structprune.front.models import digits_cnn
from structprune.front.quantize import quantize_dir
from structprune.front.runs import staged, write_report


def demo(out: str | os.PathLike | None = None, *, ratio: float = 0.5, epochs: int = 3,
         finetune_epochs: int = 3, recover_with: str | Sequence[str] = ("lsq", "bn"),
         distill: bool = True, seed: int = 0,
         say: Callable[[str], None] = print) -> dict[str, Any]:
    """The whole loop on the embedded data, nothing downloaded: train the VGG-style digits
    CNN, prune it, recover without training, fine-tune (distilled from the dense model), and
    compare dense and pruned at every step (accuracy, recall, F1, parameters, MACs, ONNX
    Runtime latency on one thread), and both again quantized to INT8. With ``out``, ``report.json`` holds ``dense`` and
    ``pruned`` (and the plan, weights and ONNX files beside it)."""
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
        say("quantizing both to INT8 (ONNX Runtime, static, per-channel)")
        int8 = quantize_dir(tmp, data, QuantizeConfig(), [(1, 1, 32, 32)], threads=1)
        int8_files = {name: (Path(tmp) / f"{name}.int8.onnx").read_bytes()
                      for name in ("dense", "pruned")}
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
        "int8": {name: {"accuracy": m["int8_metrics"]["accuracy"],
                        "fp32_accuracy": m["fp32_metrics"]["accuracy"],
                        "ort_cpu_ms": m["latency"]["int8_ms"],
                        "fp32_ort_cpu_ms": m["latency"]["fp32_ms"],
                        "top1_agreement": m["fidelity"]["top1_agreement"]}
                 for name, m in int8["models"].items()},
    }
    say(_demo_table(report))
    if out is not None:
        with staged(out) as staging:  # all of it or nothing
            save(pruned, staging, result.plan)
            export_onnx(pruned, x, staging / "pruned.onnx", "torchscript")
            export_onnx(dense, x, staging / "dense.onnx", "torchscript")
            for name, content in int8_files.items():  # quantized from these same exports
                (staging / f"{name}.int8.onnx").write_bytes(content)
            write_report(staging, report)
        say(f"wrote {out}/report.json, plan.json, pruned.safetensors, dense.onnx, pruned.onnx, "
            "dense.int8.onnx, pruned.int8.onnx")
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
    if report.get("int8"):
        d8, p8 = report["int8"]["dense"], report["int8"]["pruned"]
        lines += ["INT8 (ONNX Runtime, static, per-channel):",
                  f"{'  accuracy':30s}{100 * d8['accuracy']:>11.2f}%{100 * p8['accuracy']:>11.2f}%",
                  f"{'  1 thread (ms)':30s}{d8['ort_cpu_ms']:>12.3f}{p8['ort_cpu_ms']:>12.3f}"]
    return "\n".join(lines)


__all__ = ["demo"]
