"""The argument groups several commands share, and what they build: the model and its
example inputs, the data splits, the timing settings of a benchmark."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import torch.nn as nn

from structprune.accuracy.data import DataSplits, image_splits, load_data
from structprune.accuracy.evaluate import classifier_width, predict
from structprune.config import CAPTURE_METHODS
from structprune.errors import StructPruneError
from structprune.front.models import build_model, default_input_shapes, load_weights, parse_shape
from structprune.front.yolo import is_ultralytics_model
from structprune.tree import random_inputs

EXPORTERS = ("auto", "dynamo", "torchscript")
DEFAULT_BENCH_BATCHES = (1, 32)


def model_args(p: argparse.ArgumentParser) -> None:
    """The model a command builds: its spec, input shapes, weights, seed and capture."""
    p.add_argument("spec", metavar="SPEC",
                   help="torchvision:NAME, timm:NAME, ultralytics:yolov8n.yaml (or a .pt "
                        "checkpoint), model.onnx (or onnx:PATH), structprune:NAME or "
                        "path/to/file.py:FACTORY")
    p.add_argument("--input-shape", action="append", default=None, metavar="N,C,H,W",
                   help="shape of one forward() input; repeat for several (default "
                        "1,3,224,224; 1,3,640,640 for ultralytics detectors; an ONNX "
                        "graph's own)")
    p.add_argument("--weights", help="state_dict file to load (read with weights_only=True)")
    p.add_argument("--seed", type=int, default=0, help="seed for zoo models' random weights")
    p.add_argument("--capture", choices=CAPTURE_METHODS, default="auto",
                   help="fx tracing, torch.export, or fx with torch.export as fallback")


def data_args(p: argparse.ArgumentParser) -> None:
    """The data a command reads (``--data``) and its batch size."""
    p.add_argument("--data", metavar="SOURCE",
                   help="digits, a folder of images (class sub-folders give labels; a flat "
                        "folder or any nesting, none), or file.py:FACTORY returning "
                        "(train_loader, val_loader) of batches with or without targets")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of --data")
    p.add_argument("--calibration-batches", type=int, default=8,
                   help="training batches the data-driven criteria read")


def exporter_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exporter", choices=EXPORTERS, default="auto",
                   help="ONNX exporter: torch.export based (dynamo), TorchScript based, or "
                        "dynamo with TorchScript as fallback (auto)")


def timing_args(p: argparse.ArgumentParser) -> None:
    """How a benchmark times dense.onnx against pruned.onnx."""
    p.add_argument("--batch", type=int, action="append", default=None,
                   help="batch size; repeatable (default 1 and 32)")
    p.add_argument("--threads", type=int, action="append", default=None,
                   help="ONNX Runtime intra-op threads; repeatable (default 1 and all cores)")
    p.add_argument("--repeats", type=int, default=10, help="timed pairs per cell")
    p.add_argument("--warmup", type=int, default=2, help="untimed runs before the timed pairs")
    p.add_argument("--max-seconds", type=float, default=30.0,
                   help="stop repeating a cell after this long (at least 3 pairs)")
    p.add_argument("--no-torch", action="store_true", help="skip torch on CUDA")
    p.add_argument("--no-openvino", action="store_true",
                   help="skip OpenVINO CPU (timed when openvino is installed)")


def round_to(text: str) -> int | str:
    """``--round-to N|auto``: an integer or ``auto`` (its range is the config's to check)."""
    if text == "auto":
        return text
    try:
        return int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError("must be an integer or 'auto'") from exc


def model_and_inputs(args: argparse.Namespace) -> tuple[nn.Module, tuple]:
    """The model ``model_args`` name, in eval mode, and seeded random example inputs."""
    shapes = [parse_shape(s) for s in args.input_shape] if args.input_shape \
        else default_input_shapes(args.spec)
    model = build_model(args.spec, args.seed, shapes)
    if args.weights:
        load_weights(model, args.weights)
    model.eval()
    return model, random_inputs(shapes, seed=args.seed)


def require_data(args: argparse.Namespace, command: str) -> None:
    """A command that cannot go without --data says so before any work."""
    if not args.data:
        raise StructPruneError(f"{command} needs --data: digits, a folder of images or "
                               "file.py:FACTORY")


def data_splits(args: argparse.Namespace, model: nn.Module, inputs: tuple,
                seed: int = 0) -> DataSplits | None:
    """The --data splits (None without --data), shaped like the model's input, checked
    against its outputs on one batch; ``seed`` shuffles them. Labels are used only by a
    classifier (N,K outputs), whose K must be the class count; for any other model the
    splits come back without their labels."""
    if not args.data:
        return None
    splits = _detection_data(args, model, inputs, seed) or \
        load_data(args.data, tuple(inputs[0].shape), seed=seed, batch_size=args.batch_size,
                  normalize=not is_ultralytics_model(model))
    first = next(iter(splits.val), None)
    if first is None:
        raise StructPruneError(f"--data {args.data} has no validation samples")
    width = classifier_width(model, first)  # and the inputs fit the model
    if not splits.labelled:
        return splits
    if width is None:
        return splits.without_labels("labels unused: the model does not output class scores")
    if width != splits.num_classes:
        raise StructPruneError(
            f"the model has {width} outputs but the data has {splits.num_classes} "
            "classes: give the model a classifier with one output per class, or the images "
            "without class sub-folders to use them unlabeled")
    predict(model, [first], num_classes=splits.num_classes)  # targets are class indices
    return splits


def _detection_data(args: argparse.Namespace, model: nn.Module, inputs: tuple,
                    seed: int) -> DataSplits | None:
    """An ultralytics dataset yaml given to an ultralytics model: its train and val images,
    unlabeled, in [0, 1] as ultralytics feeds them (its own validator reads the labels for
    mAP); None for any other --data."""
    if not _is_dataset_yaml(args.data):
        return None
    if not is_ultralytics_model(model):
        raise StructPruneError(f"--data {args.data}: a dataset yaml is read for ultralytics "
                               "models; give other models a folder of images or "
                               "file.py:FACTORY")
    from structprune.front.yolo import dataset

    found = dataset(args.data)
    for split in ("train", "val"):
        if not isinstance(found.get(split), Path):
            raise StructPruneError(f"{args.data} names no {split}: folder of images")
    splits = image_splits(found["train"], found["val"], tuple(inputs[0].shape), seed,
                          args.batch_size or 16, normalize=False, source=str(args.data))
    if splits.labelled:  # images in class sub-folders: the yaml's labels are elsewhere
        splits = splits.without_labels("labels read by ultralytics' validator")
    return dataclasses.replace(splits, dataset_yaml=str(Path(args.data).resolve()))


def timing(args: argparse.Namespace) -> dict[str, Any]:
    """The timing settings of ``timing_args``, refused in one line when out of range."""
    for name, least in (("repeats", 1), ("warmup", 0)):
        if getattr(args, name) < least:
            raise StructPruneError(f"--{name} must be at least {least}")
    for b in args.batch or []:
        if b < 1:
            raise StructPruneError(f"--batch {b} must be 1 or more")
    return {"repeats": args.repeats, "warmup": args.warmup, "max_seconds": args.max_seconds}


def is_yolo_dataset(report: dict[str, Any], data: str | None) -> bool:
    """Whether a run's model came from ultralytics and ``data`` is a dataset yaml: then
    ultralytics' own trainer and validator are used (:mod:`structprune.front.yolo`)."""
    return str(report.get("spec") or "").startswith("ultralytics:") and _is_dataset_yaml(data)


def _is_dataset_yaml(data: str | None) -> bool:
    return str(data or "").lower().endswith((".yaml", ".yml"))


__all__ = ["DEFAULT_BENCH_BATCHES", "EXPORTERS", "data_args", "data_splits", "exporter_arg",
           "is_yolo_dataset", "model_and_inputs", "model_args", "require_data", "round_to", "timing",
           "timing_args"]
