"""``structprune eval``: accuracy, per-class recall and macro F1 of the dense and pruned
models of a run folder on ``--data``; on data without labels, the pruned model's fidelity to
the dense one (top-1 agreement, relative output errors, box mAP of a YOLO detector); and the
same for dense.int8.onnx and pruned.int8.onnx where `structprune quantize` wrote them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from structprune.accuracy.evaluate import evaluate, fidelity, plot_confusion
from structprune.files import atomic_write_text
from structprune.front.cli.arguments import data_args, data_splits, is_yolo_dataset, require_data
from structprune.front.cli.output import fidelity_line, metric_rows, table, yolo_rows
from structprune.front.quantize import evaluate_int8
from structprune.front.runs import dense_and_pruned, read_report
from structprune.tree import random_inputs

HELP = "accuracy, recall and F1 (or, without labels, fidelity) of dense and pruned models in DIR"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help=HELP)
    p.add_argument("dir", metavar="DIR", help="output directory of `structprune prune`")
    data_args(p)
    return p


def handle(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    require_data(args, "eval")
    report = read_report(directory)
    if is_yolo_dataset(report, args.data):
        return _eval_yolo(directory, report, args.data)
    dense, pruned = dense_and_pruned(directory, report)
    data = data_splits(args, dense, random_inputs(report["input_shapes"]),
                       seed=report.get("seed", 0))
    result: dict[str, Any] = {"data": data.summary()}
    if data.labelled:
        scores = {"dense": evaluate(dense, data.val), "pruned": evaluate(pruned, data.val)}
        plot_confusion(scores, directory / "confusion.png", data.classes)
        result.update({k: m.to_json() for k, m in scores.items()})
    else:
        result["fidelity"] = fidelity(pruned, dense, data.val)
    int8, int8_lines = evaluate_int8(directory, data)  # where `structprune quantize` wrote them
    result.update(int8)
    atomic_write_text(directory / "eval.json", json.dumps(result, indent=1) + "\n")
    print(f"structprune: {report['spec']} on {data.summary()}")
    if data.labelled:
        print(table(metric_rows(result)))
        for line in int8_lines:
            print(line)
        print(f"wrote {directory}/eval.json and confusion.png")
        return 0
    found = result["fidelity"]
    print(fidelity_line(found))
    if len(found["rel_error"]) > 1:
        print(table([("output", "relative error")]
                    + [(name, f"{e:.2e}") for name, e in found["rel_error"].items()]))
    for line in int8_lines:
        print(line)
    print(f"wrote {directory}/eval.json")
    return 0


def _eval_yolo(directory: Path, report: dict[str, Any], data_yaml: str) -> int:
    """ultralytics' own validation (mAP) of the dense and the pruned model on a dataset
    yaml."""
    from structprune.front.yolo import image_size, yolo_metrics

    dense, pruned = dense_and_pruned(directory, report)
    imgsz = image_size(report)
    result = {"data": str(Path(data_yaml).resolve()), "imgsz": imgsz,
              "dense": yolo_metrics(dense, data_yaml, imgsz),
              "pruned": yolo_metrics(pruned, data_yaml, imgsz)}
    atomic_write_text(directory / "eval.json", json.dumps(result, indent=1) + "\n")
    print(f"structprune: {report['spec']} on {data_yaml} (ultralytics' validator, "
          f"{result['pruned']['images']} images at {imgsz})")
    print(table(yolo_rows(result, ("dense", "pruned"))))
    print(f"wrote {directory}/eval.json")
    return 0


__all__ = ["HELP", "add_parser", "handle"]
