"""INT8 of a run folder's ONNX files, with accuracy and latency measured beside FP32.

:func:`quantize_dir` quantizes ``dense.onnx`` and ``pruned.onnx`` into ``dense.int8.onnx``
and ``pruned.int8.onnx`` (:func:`structprune.deploy.quantize.quantize_onnx`), calibrated on
the data's training inputs, and measures each INT8 file through ONNX Runtime on the
validation split: accuracy, per-class recall and macro F1 of both files when the data has
labels, and always the INT8 file's fidelity to its FP32 file (top-1 agreement, relative
output error). ``max_drop`` is measured the same way: points of accuracy lost against the FP32
file with labels, points of top-1 agreement without (100 times the largest relative output
error when the output is not class scores). Each pair is also timed on the quantize runtime,
and where INT8 is not faster the FP32 file stays the one to deploy (the guard).
``structprune quantize`` and ``prune --quantize int8`` run it; its record is the report's
``quantize`` block.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from structprune.accuracy.data import DataSplits
from structprune.accuracy.evaluate import evaluate, fidelity
from structprune.config import QuantizeConfig
from structprune.deploy.quantize import OnnxModel, check, int8_path, quantize_onnx, time_pair

MODELS = ("dense", "pruned")


def drop_measure(reference: OnnxModel, data: DataSplits) -> Callable[[Path], float]:
    """What an INT8 candidate file costs against the FP32 ``reference``, in points, on the
    validation split (see the module docstring)."""
    if data.labelled:
        base = evaluate(reference, data.val, num_classes=data.num_classes).accuracy

        def lost_accuracy(path: Path) -> float:
            got = evaluate(OnnxModel(path), data.val, num_classes=data.num_classes).accuracy
            return 100.0 * (base - got)
        return lost_accuracy

    def disagreement(path: Path) -> float:
        found = fidelity(OnnxModel(path), reference, data.val)
        if found["top1_agreement"] is not None:
            return 100.0 * (1.0 - found["top1_agreement"])
        return 100.0 * max(found["rel_error"].values())
    return disagreement


def quantize_dir(directory: str | Path, data: DataSplits, config: QuantizeConfig,
                 input_shapes: Sequence[Sequence[int]], *, models: Sequence[str] = MODELS,
                 time_it: bool = True, threads: int | None = None,
                 progress: Callable[[str], None] = lambda step: None) -> dict[str, Any]:
    """Quantize ``{name}.onnx`` for each of ``models`` in ``directory`` as ``config`` says,
    calibrated on ``data.train`` and measured on ``data.val``; with ``time_it``, time each
    pair on ``config.runtime`` at batch 1 on ``threads`` (None: every core;
    ``input_shapes``: the model's inputs). The FP32
    files are only read; each INT8 file is written whole or not at all. Returns the report's
    ``quantize`` block."""
    check(config)
    directory = Path(directory)
    start = time.perf_counter()
    found: dict[str, Any] = {}
    references = {name: OnnxModel(directory / f"{name}.onnx") for name in models}  # all load
    for name, reference in references.items():
        fp32 = reference.path
        drop = drop_measure(reference, data) if config.max_drop is not None else None
        record = quantize_onnx(fp32, data.train, config, drop=drop, progress=progress)
        progress(f"measure {record['file']}")
        int8 = OnnxModel(int8_path(fp32))
        record["fidelity"] = fidelity(int8, reference, data.val)
        if data.labelled:
            record["fp32_metrics"] = evaluate(reference, data.val,
                                              num_classes=data.num_classes).to_json()
            record["int8_metrics"] = evaluate(int8, data.val,
                                              num_classes=data.num_classes).to_json()
        if time_it:
            progress(f"time {record['file']} against {fp32.name}")
            record["latency"] = time_pair(fp32, int8.path, input_shapes, config.runtime,
                                          threads=threads)
        found[name] = record
    return {"settings": config.to_json(), "data": data.summary(), "models": found,
            "seconds": time.perf_counter() - start}


def int8_files(directory: Path) -> tuple[dict[str, Path], list[str]]:
    """The INT8 files of a run folder, by FP32 model name, and a line for each one left out
    because it is older than its FP32 file (re-exported since, by ``finetune``)."""
    found, stale = {}, []
    for name in MODELS:
        fp32 = directory / f"{name}.onnx"
        int8 = int8_path(fp32)
        if not int8.is_file() or not fp32.is_file():
            continue
        if int8.stat().st_mtime < fp32.stat().st_mtime:
            stale.append(f"{int8.name} is older than {fp32.name}, left out: run `structprune "
                         f"quantize {directory} --data ...` again")
            continue
        found[name] = int8
    return found, stale


def evaluate_int8(directory: str | Path, data: DataSplits) -> tuple[dict[str, Any], list[str]]:
    """The INT8 files of a run folder (those :func:`int8_files` keeps) measured on
    ``data.val`` through ONNX Runtime: ``{name}_int8`` holds their metrics when the data has
    labels, else their fidelity to their FP32 files; and the lines to print."""
    files, lines = int8_files(Path(directory))
    found: dict[str, Any] = {}
    for name, int8 in files.items():
        model = OnnxModel(int8)
        if data.labelled:
            m = evaluate(model, data.val, num_classes=data.num_classes)
            found[f"{name}_int8"] = m.to_json()
            lines.append(f"{int8.name}: top-1 accuracy {100 * m.accuracy:.2f}%, macro F1 "
                         f"{m.macro_f1:.4f}, lowest class recall {min(m.recall):.3f}")
        else:
            f = fidelity(model, OnnxModel(Path(directory) / f"{name}.onnx"), data.val)
            found[f"{name}_int8"] = {"fidelity_to_fp32": f}
            agreement = f["top1_agreement"]
            lines.append(f"{int8.name}: " + (f"top-1 agreement with {name}.onnx "
                                             f"{100 * agreement:.2f}%, " if agreement is not None
                                             else "") + "relative output error " + ", ".join(
                f"{e:.2e}" for e in f["rel_error"].values()))
    return found, lines


def summary_lines(block: dict[str, Any]) -> list[str]:
    """One line per quantized model: its accuracy (or fidelity), the layers left in FP32,
    and its latency against FP32, with the guard's verdict when INT8 is not faster."""
    lines = []
    for r in block["models"].values():
        if "int8_metrics" in r:
            quality = (f"accuracy {100 * r['fp32_metrics']['accuracy']:.2f}% FP32 -> "
                       f"{100 * r['int8_metrics']['accuracy']:.2f}% INT8")
        else:
            f = r["fidelity"]
            agreement = f.get("top1_agreement")
            quality = (f"top-1 agreement with FP32 {100 * agreement:.2f}%, " if agreement
                       is not None else "") + "relative output error " + ", ".join(
                f"{e:.2e}" for e in f["rel_error"].values())
        kept = (f"; {len(r['excluded'])} node(s) left in FP32 for --max-drop "
                f"{r['max_drop']:g}: {', '.join(r['excluded'])}" if r["excluded"] else "")
        if r["met"] is False:
            kept += f" (drop {r['drop']:.2f} points still above {r['max_drop']:g})"
        lines.append(f"{r['file']}: {quality}{kept}")
        t = r.get("latency")
        if t:
            verdict = (f"{t['speedup']:.2f}x faster" if t["int8_faster"] else
                       f"NOT faster ({t['speedup']:.2f}x): keep {r['fp32_file']}, the FP32 "
                       "file stays the one to deploy")
            lines.append(f"  {t['runtime']}, {t['threads']} thread(s), batch {t['batch']}: "
                         f"{r['fp32_file']} {t['fp32_ms']:.2f} ms, {r['file']} "
                         f"{t['int8_ms']:.2f} ms, {verdict}")
    return lines


__all__ = ["MODELS", "drop_measure", "evaluate_int8", "int8_files", "quantize_dir",
           "summary_lines"]
