"""``structprune eval``: accuracy, per-class recall and macro F1 of the dense and pruned
models of a run folder on ``--data``."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from structprune.accuracy.evaluate import evaluate, plot_confusion
from structprune.files import atomic_write_text
from structprune.front.cli.arguments import data_args, data_splits, require_data
from structprune.front.cli.output import metric_rows, table
from structprune.front.runs import dense_and_pruned, read_report
from structprune.tree import random_inputs

HELP = "accuracy, recall and F1 of dense and pruned models in DIR"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help=HELP)
    p.add_argument("dir", metavar="DIR", help="output directory of `structprune prune`")
    data_args(p)
    return p


def handle(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    require_data(args, "eval")
    report = read_report(directory)
    dense, pruned = dense_and_pruned(directory, report)
    data = data_splits(args, dense, random_inputs(report["input_shapes"]),
                       seed=report.get("seed", 0))
    scores = {"dense": evaluate(dense, data.val), "pruned": evaluate(pruned, data.val)}
    plot_confusion(scores, directory / "confusion.png", data.classes)
    result = {"data": data.summary(), **{k: m.to_json() for k, m in scores.items()}}
    atomic_write_text(directory / "eval.json", json.dumps(result, indent=1) + "\n")
    print(f"structprune: {report['spec']} on {data.summary()}")
    print(table(metric_rows(result)))
    print(f"wrote {directory}/eval.json and confusion.png")
    return 0


__all__ = ["HELP", "add_parser", "handle"]
