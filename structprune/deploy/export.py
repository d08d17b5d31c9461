"""Stage 7, export: ONNX files with a dynamic batch axis, checked against torch.

The current exporter (``torch.onnx.export(dynamo=True)``) is tried first; models it cannot
handle fall back to the TorchScript exporter. Every file passes ``onnx.checker``, and
ONNX Runtime's output is compared with torch's on random inputs: a mismatch is an error.

Some models differ in ONNX Runtime before any pruning: float32 attention over long sequences,
large logits and top-k rankings accumulate or tie-break differently there. The dense file's
own error is then the yardstick: :func:`export_pair` measures it and holds the pruned file to
:data:`ERROR_MULTIPLE` times it (never less than the tolerance), and records all three.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from structprune.config import OnnxSignature
from structprune.core.capture import module_state_kept
from structprune.core.verify import compare, flatten_outputs
from structprune.errors import StructPruneError, first_line
from structprune.tree import evaluation, random_inputs

# the newest opset the TorchScript exporter writes (newer ones are converted from it)
TORCHSCRIPT_MAX_OPSET = 20
# a pruned file may differ from torch by this multiple of the dense file's own error: the
# pruned model runs the same ops on fewer channels, so it may round differently, not worse
ERROR_MULTIPLE = 4.0


class ExportError(StructPruneError):
    """Export failed or ONNX Runtime disagrees with torch."""


def allowed_error(tolerance: float = 1e-4, dense_error: float | None = None) -> float:
    """The largest relative error a file may show: ``tolerance``, or :data:`ERROR_MULTIPLE`
    times the dense file's own error when that is larger."""
    return tolerance if dense_error is None else max(tolerance, ERROR_MULTIPLE * dense_error)


def _bound(tolerance: float, dense_error: float | None) -> str:
    allowed = allowed_error(tolerance, dense_error)
    if allowed == tolerance:
        return f"{tolerance:.0e}"
    return f"{allowed:.2e} = {ERROR_MULTIPLE:g} x the dense file's own {dense_error:.2e}"


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


def _names_and_axes(inputs: tuple, signature: OnnxSignature | None,
                    ) -> tuple[list[str], dict[str, dict[int, str]]]:
    """The input names and dynamic axes a file gets: the signature's, else ``input`` (or
    ``input_0``, ...) with a dynamic batch axis each."""
    if signature is not None:
        return list(signature.input_names), dict(signature.dynamic_axes)
    names = _names(inputs)
    return names, {n: {0: "batch"} for n in names}


def _export_dynamo(model: nn.Module, inputs: tuple, path: Path, opset: int,
                   signature: OnnxSignature | None = None) -> None:
    names, axes = _names_and_axes(inputs, signature)
    batch = torch.export.Dim("batch", min=1, max=4096)
    shapes = []
    for name, x in zip(names, inputs, strict=False):
        dynamic = {axis: batch if dim == "batch" else torch.export.Dim.DYNAMIC
                   for axis, dim in axes.get(name, {}).items()}
        shapes.append(dynamic if isinstance(x, torch.Tensor) and x.ndim > 0 and dynamic
                      else None)
    with module_state_kept(model):  # RT-DETR caches anchors on its head while traced
        program = torch.onnx.export(
            model, inputs, dynamic_shapes=tuple(shapes), dynamo=True, input_names=names,
            output_names=None if signature is None else list(signature.output_names),
            opset_version=max(opset, 18), verbose=False, report=False)
    program.save(str(path))


def _export_torchscript(model: nn.Module, inputs: tuple, path: Path, opset: int,
                        signature: OnnxSignature | None = None) -> None:
    names, axes = _names_and_axes(inputs, signature)
    # given no output name, the exporter takes a GraphModule's fx graph for a TorchScript one
    # and fails; the first output is then named as torch.export names it
    outputs = list(signature.output_names) if signature is not None else \
        ["output"] if isinstance(model, torch.fx.GraphModule) else None
    torch.onnx.export(model, inputs, str(path), dynamo=False, input_names=names,
                      output_names=outputs, dynamic_axes=axes,
                      opset_version=opset if signature is None else
                      min(max(opset, 7), TORCHSCRIPT_MAX_OPSET),  # _signed converts the rest
                      do_constant_folding=True)


def _signed(path: Path, signature: OnnxSignature) -> None:
    """Give the written file the signature's opset and dynamic axis names: the exporters
    write opsets in their own ranges and name the axes of torch.export themselves."""
    import onnx
    from onnx import version_converter

    proto = onnx.load(str(path))
    for value in [*proto.graph.input, *proto.graph.output]:
        for axis, name in signature.dynamic_axes.get(value.name, {}).items():
            dims = value.type.tensor_type.shape.dim
            if axis < len(dims):
                dims[axis].dim_param = name
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    if opset != signature.opset:
        proto = version_converter.convert_version(proto, signature.opset)
    onnx.save(proto, str(path))


def export_onnx(model: nn.Module, example_inputs: Sequence[Any], path: str | os.PathLike,
                exporter: str = "auto", opset: int = 18, simplify: bool = False, *,
                tolerance: float = 1e-4, dense_error: float | None = None,
                signature: OnnxSignature | None = None) -> str:
    """Write ``model`` to ``path`` as ONNX with a dynamic batch axis; returns the exporter used.

    ``exporter`` is ``"dynamo"``, ``"torchscript"`` or ``"auto"`` (dynamo, then TorchScript).
    ``simplify`` folds constants (BN into conv, ...) with onnxscript's optimizer. The file
    must run at another batch size within ``tolerance`` of torch, or, given the dense file's
    own error ``dense_error``, within :func:`allowed_error` of it. A ``signature`` (a model
    from an ONNX file) replaces the names, the opset and the dynamic axes by its own; the
    file then runs at another batch size only where its batch axis is dynamic.
    """
    return _export(model, example_inputs, Path(path), exporter, opset, simplify, tolerance,
                   dense_error, signature=signature)[0]


def export_pair(dense: nn.Module, pruned: nn.Module, example_inputs: Sequence[Any],
                dense_path: str | os.PathLike, pruned_path: str | os.PathLike,
                exporter: str = "auto", simplify: bool = False, opset: int = 18,
                tolerance: float = 1e-4, signature: OnnxSignature | None = None,
                ) -> dict[str, Any]:
    """Write the dense and the pruned model as ONNX, and hold the pruned file to the error the
    dense one already has in ONNX Runtime (:func:`allowed_error`): the dense file is the
    model as the exporter gives it, so its error is measured and recorded, not refused.
    ``signature``: both files carry it (see :func:`export_onnx`).

    Returns the figures: ``exporter_dense``, ``exporter_pruned``, ``onnx_dense_rel_error``,
    ``onnx_rel_error`` (the pruned file's), ``onnx_allowed_rel_error`` and
    ``onnx_error_multiple``; both errors on the same random inputs.
    """
    dense_exporter, dense_error = _export(dense, example_inputs, Path(dense_path), exporter,
                                          opset, simplify, tolerance, None, keep_closest=True,
                                          signature=signature)
    allowed = allowed_error(tolerance, dense_error)
    pruned_exporter, pruned_error = _export(pruned, example_inputs, Path(pruned_path), exporter,
                                            opset, simplify, tolerance, dense_error,
                                            signature=signature)
    return {"exporter_dense": dense_exporter, "exporter_pruned": pruned_exporter,
            "onnx_dense_rel_error": dense_error, "onnx_rel_error": pruned_error,
            "onnx_allowed_rel_error": allowed, "onnx_error_multiple": ERROR_MULTIPLE}


def _export(model: nn.Module, example_inputs: Sequence[Any], path: Path, exporter: str,
            opset: int, simplify: bool, tolerance: float, dense_error: float | None,
            keep_closest: bool = False, signature: OnnxSignature | None = None,
            ) -> tuple[str, float]:
    """Write ``model`` with the first exporter whose file is within ``tolerance`` of torch,
    else with the closest one within :func:`allowed_error` (``keep_closest``: whatever its
    error); (exporter, its error)."""
    import onnx

    check = parity_batch(signature)
    # batch 1 would be specialised by torch.export; a fixed batch axis stays as it is
    inputs = random_inputs(example_inputs, batch=2 if check else None)
    # onnx2torch's modules export themselves through the TorchScript exporter
    order = {"auto": ["dynamo", "torchscript"] if signature is None else
             ["torchscript", "dynamo"], "dynamo": ["dynamo"],
             "torchscript": ["torchscript"]}[exporter]
    opset = opset if signature is None else signature.opset

    def write(name: str) -> None:
        (_export_dynamo if name == "dynamo" else _export_torchscript)(model, inputs, path, opset,
                                                                      signature)
        if signature is not None:
            _signed(path, signature)

    errors, measured = [], {}
    with torch.no_grad(), evaluation(model), _quiet():
        for name in order:
            try:
                write(name)
            except Exception as exc:  # noqa: BLE001 - try the next exporter
                errors.append(f"{name}: {type(exc).__name__}: {first_line(exc, 120)}")
                continue
            try:  # the file must run at another batch size: dynamo can fix the batch axis
                measured[name] = parity_error(path, model, example_inputs, batch=check)
            except ExportError as exc:
                errors.append(f"{name}: {exc}")
                continue
            if measured[name] <= tolerance:
                break
            errors.append(f"{name}: {path}: ONNX Runtime differs from torch (relative error "
                          f"{measured[name]:.2e} > {_bound(tolerance, dense_error)})")
        best = min(measured, key=measured.get, default=None)
        if best is None or not math.isfinite(measured[best]) or (
                measured[best] > allowed_error(tolerance, dense_error) and not keep_closest):
            raise ExportError(f"ONNX export failed ({'; '.join(errors)})")
        if best != name:  # a later exporter wrote the file: write the closest one again
            write(best)
    error = measured[best]
    if simplify:  # the file written is measured again
        import onnxscript.optimizer
        proto = onnxscript.optimizer.optimize(onnx.load(str(path)))
        onnx.save(proto, str(path))
        error = parity_error(path, model, example_inputs, batch=check)
        if error > allowed_error(tolerance, dense_error) and not keep_closest:
            raise ExportError(f"{path}: ONNX Runtime differs from torch once simplified "
                              f"(relative error {error:.2e} > {_bound(tolerance, dense_error)})")
    onnx.checker.check_model(str(path), full_check=True)
    return best, error


def parity_batch(signature: OnnxSignature | None) -> int | None:
    """The batch a file is checked at: 3, another than the example inputs', where its batch
    axis is dynamic; else (a fixed batch in the ``signature``) the example inputs' own."""
    return 3 if signature is None or signature.batch_dynamic() else None


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


def parity_error(path: str | os.PathLike, model: nn.Module, example_inputs: Sequence[Any],
                 batch: int | None = 3) -> float:
    """Relative error of ONNX Runtime against torch on random inputs (batch ``batch``; None:
    the example inputs' own); an :class:`ExportError` when the file cannot run there or its
    outputs have other shapes."""
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
    return compare(expected, got).max_rel_error


def onnx_parity(path: str | os.PathLike, model: nn.Module, example_inputs: Sequence[Any],
                batch: int | None = 3, tolerance: float = 1e-4, dense_error: float | None = None,
                ) -> float:
    """Relative error of ONNX Runtime against torch on random inputs (batch ``batch``; None:
    the example inputs' own); an
    :class:`ExportError` beyond ``tolerance``, or, given the dense file's own error
    ``dense_error``, beyond :func:`allowed_error`."""
    error = parity_error(path, model, example_inputs, batch)
    if error > allowed_error(tolerance, dense_error):
        raise ExportError(f"{path}: ONNX Runtime differs from torch (relative error "
                          f"{error:.2e} > {_bound(tolerance, dense_error)})")
    return error
