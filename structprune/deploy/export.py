"""Stage 7, export: ONNX files with a dynamic batch axis, checked against torch.

The current exporter (``torch.onnx.export(dynamo=True)``) is tried first; models it cannot
handle fall back to the TorchScript exporter. Every file passes ``onnx.checker``, and
ONNX Runtime's output is compared with torch's on random inputs: a mismatch is an error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from structprune.core.verify import compare, flatten_outputs
from structprune.errors import StructPruneError, first_line
from structprune.tree import evaluation, random_inputs


class ExportError(StructPruneError):
    """Export failed or ONNX Runtime disagrees with torch."""


def _names(inputs: Sequence[Any]) -> list[str]:
    return [f"input_{i}" if len(inputs) > 1 else "input" for i in range(len(inputs))]


@contextlib.contextmanager
def _quiet():
    """The exporters print progress and warnings for every model; keep the terminal clean."""
    logger = logging.getLogger("torch.onnx")
    level = logger.level
    logger.setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        try:
            yield
        finally:
            logger.setLevel(level)


def _export_dynamo(model: nn.Module, inputs: tuple, path: Path, opset: int) -> None:
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = tuple({0: batch} if isinstance(x, torch.Tensor) and x.ndim > 0 else None
                   for x in inputs)
    program = torch.onnx.export(model, inputs, dynamic_shapes=shapes, dynamo=True,
                                input_names=_names(inputs), opset_version=max(opset, 18),
                                verbose=False, report=False)
    program.save(str(path))


def _export_torchscript(model: nn.Module, inputs: tuple, path: Path, opset: int) -> None:
    names = _names(inputs)
    torch.onnx.export(model, inputs, str(path), dynamo=False, input_names=names,
                      dynamic_axes={n: {0: "batch"} for n in names}, opset_version=opset,
                      do_constant_folding=True)


def export_onnx(model: nn.Module, example_inputs: Sequence[Any], path: str | os.PathLike,
                exporter: str = "auto", opset: int = 18, simplify: bool = False) -> str:
    """Write ``model`` to ``path`` as ONNX with a dynamic batch axis; returns the exporter used.

    ``exporter`` is ``"dynamo"``, ``"torchscript"`` or ``"auto"`` (dynamo, then TorchScript).
    ``simplify`` folds constants (BN into conv, ...) with onnxscript's optimizer.
    """
    import onnx

    path = Path(path)
    inputs = random_inputs(example_inputs, batch=2)  # batch 1 would be specialised by torch.export
    order = {"auto": ["dynamo", "torchscript"], "dynamo": ["dynamo"],
             "torchscript": ["torchscript"]}[exporter]
    errors = []
    with torch.no_grad(), evaluation(model), _quiet():
        for name in order:
            try:
                fn = _export_dynamo if name == "dynamo" else _export_torchscript
                fn(model, inputs, path, opset)
            except Exception as exc:  # noqa: BLE001 - try the next exporter
                errors.append(f"{name}: {type(exc).__name__}: {first_line(exc, 120)}")
                continue
            try:  # the file must run at another batch size: dynamo can fix the batch axis
                onnx_parity(path, model, example_inputs, batch=3)
                break
            except ExportError as exc:
                errors.append(f"{name}: {exc}")
        else:
            raise ExportError(f"ONNX export failed ({'; '.join(errors)})")
    if simplify:
        import onnxscript.optimizer
        proto = onnxscript.optimizer.optimize(onnx.load(str(path)))
        onnx.save(proto, str(path))
    onnx.checker.check_model(str(path), full_check=True)
    return name


def run_onnx(path: str | os.PathLike, inputs: Sequence[Any], threads: int | None = None,
             ) -> list[np.ndarray]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(),
                                              [x for x in inputs if isinstance(x, torch.Tensor)],
                                              strict=False)}
    return session.run(None, feeds)


def onnx_parity(path: str | os.PathLike, model: nn.Module, example_inputs: Sequence[Any],
                batch: int = 3, tolerance: float = 1e-4) -> float:
    """Relative error of ONNX Runtime against torch on random inputs (batch ``batch``)."""
    inputs = random_inputs(example_inputs, batch=batch)
    with torch.no_grad(), evaluation(model):
        expected = flatten_outputs(model(*inputs))
    try:
        got = [torch.from_numpy(np.asarray(g)) for g in run_onnx(path, inputs)]
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors, one line
        raise ExportError(f"{path}: ONNX Runtime cannot run it at batch {batch}: "
                          f"{first_line(exc, 160)}") from exc
    if len(got) != len(expected):
        raise ExportError(f"{path}: ONNX has {len(got)} outputs, torch {len(expected)}")
    for e, g in zip(expected, got, strict=True):
        if tuple(e.shape) != tuple(g.shape):
            raise ExportError(f"{path}: ONNX output shape {tuple(g.shape)} != torch "
                              f"{tuple(e.shape)}")
    result = compare(expected, got, tolerance)
    if not result.ok:
        raise ExportError(f"{path}: ONNX Runtime differs from torch (relative error "
                          f"{result.max_rel_error:.2e} > {tolerance:.0e})")
    return result.max_rel_error
