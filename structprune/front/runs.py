"""Run folders: writing one whole or not at all, reading one back, and checkpoints in one.

A run folder is what ``structprune prune`` (or ``train``) writes: ``report.json``,
``plan.json`` and the pruned weights, the ONNX files and plots. It is written in a staging
folder beside the output and published only when everything succeeded (:func:`staged`), so a
failure leaves nothing half-written. ``bench``, ``eval`` and ``finetune`` read it back
(:func:`read_report`, :func:`dense_model`, :func:`dense_and_pruned`); ``finetune`` keeps its
checkpoint in it (:func:`write_checkpoint`, :func:`read_checkpoint`).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from structprune.errors import StructPruneError
from structprune.files import atomic_write, atomic_write_text
from structprune.front.io import load
from structprune.front.models import build_model, load_weights
from structprune.front.onnx_in import PREFIX as ONNX_PREFIX
from structprune.front.onnx_in import is_onnx_spec, onnx_path

REPORT = "report.json"
CHECKPOINT = "checkpoint.safetensors"
CHECKPOINT_STATE = "checkpoint.json"


# writing


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


@contextmanager
def staged(out: str | os.PathLike, *, writer: bool = True) -> Iterator[Path]:
    """A staging folder beside ``out`` to write a run into. When the block succeeds, what it
    wrote is moved into ``out`` (created if needed; files of the same name replaced), by
    ``writer`` only (under torchrun, rank 0 alone publishes); when it fails, nothing reaches
    ``out``. The staging folder is removed either way."""
    out = Path(out)
    staging = Path(tempfile.mkdtemp(prefix=".structprune-", dir=writable_parent(out)))
    try:
        yield staging
        if writer:
            _publish(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, out: Path) -> None:
    """Move everything written to ``staging`` into ``out``, file by file (renames on one
    file system)."""
    out.mkdir(parents=True, exist_ok=True)
    for item in staging.iterdir():
        os.replace(item, out / item.name)


def write_report(directory: Path, report: dict[str, Any]) -> None:
    """Write ``report.json`` (numpy numbers as floats)."""
    atomic_write_text(directory / REPORT, json.dumps(report, indent=1, default=float) + "\n")


# reading back


def read_report(directory: Path) -> dict[str, Any]:
    """The report.json of a `structprune prune` output directory."""
    report_path = directory / REPORT
    if not report_path.is_file():
        raise StructPruneError(f"{directory} has no report.json: run `structprune prune ... "
                               f"--out {directory}` first")
    try:
        report = json.loads(report_path.read_text())
        report["spec"], report["input_shapes"]  # noqa: B018 - both must be there
    except (ValueError, KeyError, TypeError) as exc:
        raise StructPruneError(f"{report_path} is not a structprune report ({type(exc).__name__}"
                               f": {exc}): run `structprune prune ... --out {directory}` again"
                               ) from exc
    return report


def model_record(spec: str, seed: int = 0, weights: str | None = None) -> dict[str, Any]:
    """What a report records of the dense model, so that :func:`dense_model` can rebuild it:
    its spec (an ONNX file by absolute path), seed and weights file (by absolute path)."""
    if is_onnx_spec(spec):
        spec = f"{ONNX_PREFIX}{onnx_path(spec).resolve()}"
    return {"spec": spec, "seed": seed,
            "weights": str(Path(weights).resolve()) if weights else None}


def dense_model(report: dict[str, Any]) -> nn.Module:
    """The dense model a report names, rebuilt with its seed and weights (an ONNX file's
    converted and checked on inputs of the report's shapes)."""
    dense = build_model(report["spec"], report.get("seed", 0),
                        [tuple(shape) for shape in report.get("input_shapes") or []] or None)
    if report.get("weights"):
        load_weights(dense, report["weights"])
    return dense


def pruned_model(directory: Path, dense: nn.Module) -> nn.Module:
    """The pruned model saved in ``directory``, rebuilt on a copy of ``dense``."""
    return load(directory, copy.deepcopy(dense))


def dense_and_pruned(directory: Path, report: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """The dense model the report names and the pruned one saved in ``directory``."""
    dense = dense_model(report)
    return dense, pruned_model(directory, dense)


# checkpoints


def write_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                     epoch: int, epochs: int) -> None:
    """Save ``model``'s weights and ``optimizer``'s state after ``epoch`` of ``epochs``:
    the tensors in ``checkpoint.safetensors``, the rest in ``checkpoint.json``."""
    state = optimizer.state_dict()
    tensors = {f"model.{k}": v.detach().contiguous() for k, v in model.state_dict().items()}
    tensors.update({f"optimizer.{index}.{key}": value.contiguous()
                    for index, values in state["state"].items()
                    for key, value in values.items() if isinstance(value, torch.Tensor)})
    atomic_write(directory / CHECKPOINT, lambda path: save_file(tensors, str(path)))
    atomic_write_text(directory / CHECKPOINT_STATE, json.dumps(
        {"epoch": epoch, "epochs": epochs, "param_groups": state["param_groups"]}))


def read_checkpoint(directory: Path, model: nn.Module) -> tuple[int, dict[str, Any]]:
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


__all__ = ["CHECKPOINT", "CHECKPOINT_STATE", "REPORT", "dense_and_pruned", "dense_model",
           "model_record", "pruned_model", "read_checkpoint", "read_report", "staged",
           "writable_parent", "write_checkpoint", "write_report"]
