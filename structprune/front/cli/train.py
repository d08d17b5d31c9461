"""``structprune train``: train a model on data, optionally with sparsity regularisation over
its coupled groups, into a folder that ``prune --weights`` reads."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from structprune.accuracy import distributed
from structprune.front.cli.arguments import (
    data_args,
    data_splits,
    model_and_inputs,
    model_args,
    require_data,
)
from structprune.front.runs import writable_parent
from structprune.front.workflow import train_to_dir

HELP = "train a model on data, optionally with sparsity regularisation over its coupled groups"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help=HELP)
    model_args(p)
    data_args(p)
    p.add_argument("--epochs", type=int, required=True, help="epochs of training")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate")
    p.add_argument("--sparsity", default="none",
                   help="none, bn (L1 on BatchNorm scales) or group (group lasso per group)")
    p.add_argument("--strength", type=float, default=1e-4, help="weight of the regulariser")
    p.add_argument("--out", required=True, metavar="DIR",
                   help="output directory: weights.safetensors and train.json")
    return p


def handle(args: argparse.Namespace) -> int:
    distributed.start()  # under torchrun --nproc_per_node N: one rank per process
    require_data(args, "train")
    writable_parent(Path(args.out))
    model, inputs = model_and_inputs(args)
    data = data_splits(args, model, inputs, seed=args.seed)
    summary = train_to_dir(model, inputs, data, args.out, args.epochs,
                           sparsity=args.sparsity, strength=args.strength, lr=args.lr,
                           seed=args.seed, record={"spec": args.spec})
    m = summary["metrics"]
    if distributed.rank() != 0:
        return 0
    print(f"structprune: trained {args.spec} for {args.epochs} epochs (sparsity "
          f"{args.sparsity}) on {data.summary()}: top-1 accuracy {100 * m['accuracy']:.2f}%, "
          f"macro F1 {m['macro_f1']:.4f}")
    print(f"wrote {args.out}/weights.safetensors and train.json; prune it with "
          f"`structprune prune {args.spec} --weights {args.out}/weights.safetensors ...`")
    return 0


__all__ = ["HELP", "add_parser", "handle"]
