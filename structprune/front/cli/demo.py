"""``structprune demo``: the digits demo (:mod:`structprune.front.demo`), nothing
downloaded."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from structprune.config import PruneConfig
from structprune.front.demo import demo
from structprune.front.runs import writable_parent

HELP = ("train the digits CNN, prune, recover, fine-tune and compare dense and pruned "
        "(nothing downloaded)")


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("demo", help=HELP)
    p.add_argument("--out", metavar="DIR", help="write report.json, plan, weights, ONNX files")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of channels to remove")
    p.add_argument("--epochs", type=int, default=3, help="epochs of training the dense model")
    p.add_argument("--finetune-epochs", type=int, default=3,
                   help="epochs of fine-tuning the pruned model")
    p.add_argument("--recover", default="lsq,bn",
                   help="recovery methods run after surgery, comma-separated: bn, bias, lsq")
    p.add_argument("--no-distill", action="store_true",
                   help="fine-tune on the labels alone, not distilled from the dense model")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split and training")
    return p


def handle(args: argparse.Namespace) -> int:
    PruneConfig(ratio=args.ratio)  # refused before training when it is not a fraction
    if args.out:
        writable_parent(Path(args.out))
    demo(args.out, ratio=args.ratio, epochs=args.epochs, finetune_epochs=args.finetune_epochs,
         recover_with=args.recover.split(","), distill=not args.no_distill, seed=args.seed)
    return 0


__all__ = ["HELP", "add_parser", "handle"]
