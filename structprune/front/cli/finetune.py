"""``structprune finetune``: fine-tune the pruned model of a run folder, optionally
distilled from the dense one (on data without labels, by distillation alone), with a
checkpoint after every epoch."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from structprune.accuracy import distributed
from structprune.errors import StructPruneError
from structprune.front.cli.arguments import (
    data_args,
    data_splits,
    exporter_arg,
    is_yolo_dataset,
    require_data,
)
from structprune.front.cli.output import fidelity_line, table, yolo_rows
from structprune.front.runs import dense_model, read_report
from structprune.front.workflow import finetune_dir
from structprune.tree import random_inputs

HELP = "fine-tune the pruned model in DIR, optionally distilled from the dense one"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("finetune", help=HELP)
    p.add_argument("dir", metavar="DIR", help="output directory of `structprune prune`")
    data_args(p)
    p.add_argument("--epochs", type=int, required=True, help="epochs of fine-tuning")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--distill", action="store_true",
                   help="distil from the dense model: KL on softened logits with labels; "
                        "without labels, match it on every output tensor")
    p.add_argument("--temperature", type=float, default=4.0,
                   help="with --distill: softening temperature of the logits")
    p.add_argument("--distill-weight", type=float, default=0.5,
                   help="with --distill: weight of the distillation loss (the rest is the "
                        "label loss)")
    p.add_argument("--feature-weight", type=float, default=0.0,
                   help="with --distill: weight of matching the dense model's feature maps "
                        "(on the channels the plan kept)")
    p.add_argument("--features", default="auto",
                   help="with --feature-weight: comma-separated module names, or auto for "
                        "every convolution")
    p.add_argument("--mix", type=float, default=1.0,
                   help="with --distill on data without labels: mixup of the samples before "
                        "both models see them (Beta parameter; 0: off)")
    p.add_argument("--resume", action="store_true",
                   help="continue from DIR/checkpoint.safetensors (written after every epoch)")
    exporter_arg(p)
    return p


def handle(args: argparse.Namespace) -> int:
    distributed.start()  # under torchrun --nproc_per_node N: one rank per process
    directory = Path(args.dir)
    require_data(args, "finetune")
    report = read_report(directory)
    seed = report.get("seed", 0)
    if is_yolo_dataset(report, args.data):
        return _finetune_yolo(args, directory, seed)
    dense = dense_model(report)
    data = data_splits(args, dense, random_inputs(report["input_shapes"]), seed=seed)
    features = args.features if args.features == "auto" else \
        [name.strip() for name in args.features.split(",") if name.strip()]
    record = finetune_dir(directory, dense, data, args.epochs, distill=args.distill,
                          temperature=args.temperature, distill_weight=args.distill_weight,
                          feature_weight=args.feature_weight, features=features,
                          lr=args.lr, mix=args.mix, resume=args.resume,
                          exporter=args.exporter, seed=seed)
    if distributed.rank() != 0:
        return 0
    print(f"structprune: fine-tuned {directory} for {args.epochs} epochs"
          + (" with distillation" if args.distill else "") + f" on {data.summary()}")
    if record["labelled"]:
        rows = [("", "dense", "pruned before", "pruned after")]
        for label, key, scale, fmt in (("top-1 accuracy", "accuracy", 100, "{:.2f}%"),
                                       ("macro F1", "macro_f1", 1, "{:.4f}")):
            rows.append((label, *(fmt.format(scale * record[which][key])
                                  for which in ("dense", "before", "after"))))
        print(table(rows))
    else:
        for when in ("before", "after"):
            print(f"{when}: {fidelity_line(record['fidelity'][when])}")
        if "kept" in record:
            print(f"kept {record['kept']}")
    skipped = record["history"][-1].get("features_skipped") if record["history"] else None
    if skipped:
        print("feature maps not matched: " + "; ".join(f"{name} ({why})"
                                                       for name, why in skipped.items()))
    if "onnx_rel_error" in record:
        print(f"ONNX: pruned.onnx re-exported, relative error {record['onnx_rel_error']:.1e}")
    print(f"wrote {directory}/pruned.safetensors, report.json, checkpoint.safetensors")
    return 0


def _finetune_yolo(args: argparse.Namespace, directory: Path, seed: int) -> int:
    from structprune.front.yolo import finetune_yolo

    if args.feature_weight:
        raise StructPruneError("--feature-weight is for structprune's own trainer: with a "
                               "dataset yaml, ultralytics' trainer distils the head outputs")
    record = finetune_yolo(directory, args.data, args.epochs, distill=args.distill,
                           resume=args.resume, exporter=args.exporter, seed=seed)
    if distributed.rank() != 0:
        return 0
    print(f"structprune: fine-tuned {directory} for {args.epochs} epochs with ultralytics' "
          f"trainer" + (" and distillation" if args.distill else "") + f" on {args.data}")
    print(table(yolo_rows(record)))
    if "onnx_rel_error" in record:
        print(f"ONNX: pruned.onnx re-exported, relative error {record['onnx_rel_error']:.1e}")
    print(f"wrote {directory}/pruned.safetensors, pruned.pt, report.json; ultralytics' run "
          f"in {record['run']}")
    return 0


__all__ = ["HELP", "add_parser", "handle"]
