"""ONNX files as a model source: ``onnx:model.onnx`` or a bare ``model.onnx``.

The file is converted to a ``torch.fx.GraphModule`` by onnx2torch, and the rest of the pass
runs on that as on any model; the ONNX files written afterwards carry the original graph's
input and output names, opset and dynamic axes (:class:`~structprune.config.OnnxSignature`,
:func:`signature`).

onnx2torch (1.5.15) converts the ops of opsets up to 17; what it lacks is added through its
public converter registry (``add_converter``), once, when a file is first read
(:func:`register_converters`):

- a version of an op that changed only the types it accepts (Conv 22, Reshape 19, Shape 19,
  Gemm 7, ...) reuses the converter of the nearest version onnx2torch knows, when the two
  versions' schemas have the same attributes, inputs and outputs;
- Reshape 19+ and ``allowzero=1`` where the target shape is a constant without zeros;
  ReduceMean & co. 18+ with constant axes; Split 18 (``num_outputs``); Resize 18/19, Pad
  18+, AveragePool 19+ and Cast 19+ where they use nothing the older version lacks;
  BatchNormalization 7 and Upsample 9 of older files; Gelu and Mish.

The graph is tidied before conversion (constants and identities of initializers become
initializers, as onnx2torch wants a conv's weight as an initializer) and rewritten after it
(:func:`_rewrite`), so that more channels stay prunable and every module writes itself back
to ONNX. The converted model must match ONNX Runtime on the file before anything else runs.
A node that cannot be converted is named in one line (:class:`StructPruneError`).
"""

from __future__ import annotations

import copy
import functools
import math
import operator
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from structprune.config import OnnxSignature
from structprune.errors import StructPruneError, first_line
from structprune.tree import random_inputs, resolve_target

PREFIX = "onnx:"
# what the converted model may differ from ONNX Runtime on the file, relative to the outputs,
# or this multiple of its own float32 rounding error where that is larger
CONVERSION_TOLERANCE = 1e-4
NOISE_MULTIPLE = 4.0


# the other model sources (structprune.front.models), whose names may end in .onnx too
OTHER_SOURCES = ("torchvision:", "timm:", "ultralytics:", "structprune:")


def is_onnx_spec(spec: str) -> bool:
    """Whether a model spec names an ONNX file (``onnx:PATH`` or ``PATH.onnx``)."""
    return spec.startswith(PREFIX) or (spec.lower().endswith(".onnx")
                                       and not spec.startswith(OTHER_SOURCES))


def onnx_path(spec: str) -> Path:
    """The file an ONNX spec names; a one-line error when it does not exist."""
    path = Path(spec.removeprefix(PREFIX))
    if not path.is_file():
        raise StructPruneError(f"ONNX file {path} does not exist")
    return path


@functools.lru_cache(maxsize=8)
def _read_graph(path: str, mtime: float) -> Any:
    import onnx

    try:  # the graph without the weights an external data file holds
        return onnx.load(path, load_external_data=False)
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line
        raise StructPruneError(f"{path} is not an ONNX model: {first_line(exc, 160)}") from exc


def read_graph(spec: str) -> Any:
    """The ``onnx.ModelProto`` of an ONNX spec, read once per file and change, without the
    weights an external data file holds: what its names and shapes are read from."""
    path = onnx_path(spec)
    return _read_graph(str(path.resolve()), os.path.getmtime(path))


def read_onnx(spec: str) -> Any:
    """The whole ``onnx.ModelProto`` of an ONNX spec (a fresh copy), checked by
    ``onnx.checker``."""
    import onnx

    path = onnx_path(spec)
    try:
        onnx.checker.check_model(str(path))
        return onnx.load(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: one line
        raise StructPruneError(f"{path} is not a valid ONNX model: {first_line(exc, 160)}") from exc


def _opset(proto: Any) -> int:
    return next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)


def _graph_inputs(proto: Any) -> list[Any]:
    """The graph's real inputs (old files also list their initializers as inputs)."""
    initializers = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in initializers]


def _dims(value_info: Any) -> list[int | str]:
    """An input's or output's axes: sizes, or the name of a dynamic axis."""
    dims = []
    for i, d in enumerate(value_info.type.tensor_type.shape.dim):
        if d.HasField("dim_value") and d.dim_value > 0:
            dims.append(d.dim_value)
        else:
            dims.append(d.dim_param or f"{value_info.name}_dim{i}")
    return dims


def signature(spec: str) -> OnnxSignature:
    """The input and output names, opset and dynamic axes of an ONNX spec's graph: the ONNX
    files written from its model carry them."""
    proto = read_graph(spec)
    values = [*_graph_inputs(proto), *proto.graph.output]
    axes = {v.name: {i: d for i, d in enumerate(_dims(v)) if isinstance(d, str)}
            for v in values}
    return OnnxSignature(tuple(v.name for v in _graph_inputs(proto)),
                         tuple(v.name for v in proto.graph.output), _opset(proto),
                         {name: dims for name, dims in axes.items() if dims})


def input_shapes(spec: str) -> list[tuple[int, ...]]:
    """The graph's input shapes, a dynamic batch axis taken as 1; a one-line error naming the
    input whose other axes are dynamic (then ``--input-shape`` says them)."""
    import onnx

    shapes = []
    for value in _graph_inputs(read_graph(spec)):
        kind = value.type.tensor_type.elem_type
        if kind != onnx.TensorProto.FLOAT:
            raise StructPruneError(
                f"input {value.name!r} of {spec} is of type "
                f"{onnx.TensorProto.DataType.Name(kind) if kind else 'unknown'}: structprune "
                "prunes ONNX models whose inputs are float32 tensors")
        dims = _dims(value)
        dynamic = [f"{i} ({d})" for i, d in enumerate(dims) if isinstance(d, str) and i > 0]
        if dynamic or not dims:
            raise StructPruneError(
                f"input {value.name!r} of {spec} has dynamic axes {', '.join(dynamic) or 'all'}: "
                "give its shape with --input-shape, e.g. 1,3,224,224")
        shapes.append((1 if isinstance(dims[0], str) else dims[0], *dims[1:]))
    return shapes


def load_onnx(spec: str, example_inputs: tuple | None = None) -> fx.GraphModule:
    """The model of an ONNX spec as an ``fx.GraphModule`` (eval mode), checked against ONNX
    Runtime on ``example_inputs`` (default: random inputs of :func:`input_shapes`)."""
    if example_inputs is None:
        example_inputs = random_inputs(input_shapes(spec), seed=0)
    proto = read_onnx(spec)
    _tidy(proto)
    proto = _with_shapes(proto, [tuple(x.shape) for x in example_inputs])
    gm = _convert(proto, spec).eval()  # BatchNorm in training mode would learn
    del proto  # the weights are the model's now
    _rewrite(gm, example_inputs, spec)
    _check_conversion(gm, onnx_path(spec), example_inputs, spec)
    return gm


# before conversion


def _tidy(proto: Any) -> None:
    """Make the constants and identities of initializers in ``proto`` initializers (onnx2torch
    reads a conv's weight, a clip's bounds, a reshape's shape from those), and say
    ``allowzero=0`` on reshapes with ``allowzero=1`` to a constant shape without zeros (the
    same reshape, which onnx2torch's Reshape 14 converts)."""
    import onnx
    from onnx import numpy_helper

    graph = proto.graph
    constants = {i.name: i for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:
        tensor = None
        if node.op_type == "Constant" and node.output[0] not in outputs:
            tensor = _constant_tensor(node)
        elif node.op_type == "Identity" and node.input[0] in constants \
                and node.output[0] not in outputs:
            tensor = constants[node.input[0]]
        if tensor is not None:
            named = onnx.TensorProto()
            named.CopyFrom(tensor)
            named.name = node.output[0]
            graph.initializer.append(named)
            constants[named.name] = named
            continue
        if node.op_type == "Reshape" and len(node.input) > 1 and node.input[1] in constants:
            shape = numpy_helper.to_array(constants[node.input[1]])
            for attribute in node.attribute:
                if attribute.name == "allowzero" and attribute.i == 1 and not (shape == 0).any():
                    attribute.i = 0
        kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)


def _with_shapes(proto: Any, shapes: list[tuple[int, ...]]) -> Any:
    """``proto`` with every shape inferred for the example's input shapes, sizes computed
    from Shape included: onnx2torch reads a LayerNorm's normalized shape, a pool's rank, from
    them (the files written keep the original dynamic axes)."""
    from onnx import shape_inference

    for value, shape in zip(_graph_inputs(proto), shapes, strict=False):
        dims = value.type.tensor_type.shape.dim
        if len(dims) == len(shape):
            for dim, size in zip(dims, shape, strict=True):
                dim.dim_value = size
    try:
        return shape_inference.infer_shapes(proto, data_prop=True)
    except Exception:  # noqa: BLE001 - a graph ONNX cannot infer: onnx2torch infers its own
        return proto


def _constant_tensor(node: Any) -> Any:
    """The tensor a Constant node holds, or None for a kind onnx2torch converts itself."""
    from onnx import helper, numpy_helper

    if len(node.attribute) != 1:
        return None
    attribute = node.attribute[0]
    if attribute.name == "value":
        return attribute.t
    dtypes = {"value_float": np.float32, "value_floats": np.float32, "value_int": np.int64,
              "value_ints": np.int64}
    if attribute.name not in dtypes:
        return None
    return numpy_helper.from_array(np.asarray(helper.get_attribute_value(attribute),
                                              dtype=dtypes[attribute.name]))


# conversion


def _convert(proto: Any, spec: str) -> fx.GraphModule:
    """onnx2torch's conversion, with the converters it lacks registered; a node it cannot
    convert is named in one line."""
    register_converters()
    from onnx2torch import convert

    try:
        gm = convert(proto, attach_onnx_mapping=True)
    except Exception as exc:  # noqa: BLE001 - find and name the node
        raise StructPruneError(_unconvertible(proto, spec, exc)) from exc
    _outputs_by_name(gm, proto)
    return gm


def _unconvertible(proto: Any, spec: str, exc: BaseException) -> str:
    """One line naming the first node onnx2torch cannot convert, and why."""
    from onnx2torch.node_converters import get_converter
    from onnx2torch.onnx_graph import OnnxGraph
    from onnx2torch.utils.safe_shape_inference import safe_shape_inference

    opset = _opset(proto)
    versions = {o.domain: o.version for o in proto.opset_import}
    graph = OnnxGraph(safe_shape_inference(proto).graph)
    for node in graph.nodes.values():
        version = versions.get(node.domain, opset)
        try:
            converter = get_converter(node.operation_type, version, node.domain)
        except NotImplementedError:
            why = "onnx2torch has no converter for it"
        else:
            try:
                converter(node, graph)
                continue
            except Exception as failure:  # noqa: BLE001 - this node is the one
                why = first_line(failure, 120)
        op = f"{node.domain}:{node.operation_type}" if node.domain else node.operation_type
        return (f"{spec}: cannot convert node {node.name or node.unique_name!r} (op {op}, "
                f"opset {version}) to torch: {why}")
    return f"{spec}: onnx2torch cannot convert it: {type(exc).__name__}: {first_line(exc, 160)}"


def _outputs_by_name(gm: fx.GraphModule, proto: Any) -> None:
    """Return the graph's outputs in its own order, each by its value: onnx2torch returns a
    multi-output node whole and drops repeated outputs."""
    produced: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "call_module":
            mapping = getattr(gm.get_submodule(node.target), "onnx_mapping", None)
            if mapping is None:
                continue
            if len(mapping.outputs) == 1:
                produced[mapping.outputs[0]] = node
            else:
                with gm.graph.inserting_after(node):
                    for index, name in enumerate(mapping.outputs):
                        produced.setdefault(name, gm.graph.call_function(
                            operator.getitem, (node, index)))
    names = [o.name for o in proto.graph.output]
    placeholders = {i.name: n for i, n in zip(_graph_inputs(proto), [
        n for n in gm.graph.nodes if n.op == "placeholder"], strict=False)}
    missing = [name for name in names if name not in produced and name not in placeholders]
    if missing:
        raise StructPruneError(f"output {missing[0]!r} is no node's output (an initializer): "
                               "structprune prunes graphs whose outputs are computed")
    values = [produced.get(name, placeholders.get(name)) for name in names]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    output.args = (values[0] if len(values) == 1 else tuple(values),)
    gm.graph.eliminate_dead_code()
    for module in gm.modules():
        if hasattr(module, "onnx_mapping"):
            del module.onnx_mapping
    gm.recompile()


# after conversion


def _rewrite(gm: fx.GraphModule, example_inputs: tuple, spec: str) -> None:
    """Rewrite the converted graph, each op into the same function of its input on the file's
    shapes, where the rewritten op follows a channel count that the original fixes in a
    constant, or writes itself back to ONNX where onnx2torch's module cannot (its export
    reads the opset from where torch no longer keeps it):

    - a Reshape that only flattens a run of axes, to a constant shape or one computed from
      sizes: ``nn.Flatten``;
    - a Split into equal constant parts: a split into equal parts of its input;
    - Resize: its input's batch and channel axes are kept (the constant sizes' first two
      entries, which must equal them, are not read);
    - Shape, Gather, and Slice and Squeeze by constants: ``torch.onnx.operators
      .shape_as_tensor``, indexing and ``torch.squeeze`` (whose sizes the analysis reads).

    A module left that cannot be written back to ONNX is refused, naming its node.
    """
    from onnx2torch import node_converters as ops
    from torch.fx.passes.shape_prop import ShapeProp

    with torch.no_grad():
        ShapeProp(gm).propagate(*example_inputs)
    for node in list(gm.graph.nodes):
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, ops.reshape.OnnxReshape):
            flatten = _as_flatten(node)
            if flatten is not None:
                gm.add_submodule(node.target, flatten)
                node.args = node.args[:1]
        elif isinstance(module, ops.split.OnnxSplit13) and len(node.args) > 1:
            sizes = _attr_value(gm, node.args[1])
            if sizes is not None and len(set(sizes.tolist())) == 1 \
                    and len(sizes) == module.num_splits:
                node.args = node.args[:1]
        elif isinstance(module, ops.split.OnnxSplit) and module.split is not None \
                and len(set(module.split)) == 1:
            module.split = None
        elif isinstance(module, ops.resize.OnnxResize):
            module.ignore_bs_ch_size = True
        elif module is not None:
            _as_torch_ops(gm, node, module, ops)
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    for node in gm.graph.nodes:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        if isinstance(module, _unwritable(ops)):
            raise StructPruneError(
                f"{spec}: cannot write node {node.target!r} ({type(module).__name__}) back "
                "to ONNX: onnx2torch's export of it does not run with this torch")
    _tidy_initializers(gm, ops)
    gm.recompile()


def _tidy_initializers(gm: fx.GraphModule, ops: Any) -> None:
    """Drop the constants only rewritten ops read, and make parameters of the float ones
    that arithmetic reads (a MatMul's weight, an added bias, a layer scale): weights in
    the model they came from, trained with the convs' when the pruned model is."""
    constants = getattr(gm, "initializers", None)  # onnx2torch's container, when still used
    if constants is None:
        return
    readers: dict[str, list[Any]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target.startswith("initializers."):
            readers[node.target.removeprefix("initializers.")] = [
                gm.get_submodule(u.target) if u.op == "call_module" else None
                for u in node.users]
    arithmetic = (ops.matmul.OnnxMatMul, ops.gemm.OnnxGemm,
                  ops.binary_math_operations.OnnxBinaryMathOperation)
    for name, tensor in list(constants.named_buffers()):
        if name not in readers:
            delattr(constants, name)
        elif tensor.is_floating_point() and tensor.numel() > 1 \
                and all(isinstance(m, arithmetic) for m in readers[name]):
            delattr(constants, name)
            constants.register_parameter(name, nn.Parameter(tensor))


def _unwritable(ops: Any) -> tuple[type, ...]:
    """onnx2torch's modules whose export reads the opset as torch no longer keeps it."""
    return (ops.shape.OnnxShape, ops.gather.OnnxGather, ops.gather.OnnxGatherND,
            ops.squeeze.OnnxSqueezeStaticAxes, ops.reduce.OnnxReduceSumDynamicAxes,
            ops.scatter_nd.OnnxScatterND, ops.nms.OnnxNonMaxSuppression,
            ops.roialign.OnnxRoiAlign)


def _as_torch_ops(gm: fx.GraphModule, node: fx.Node, module: nn.Module, ops: Any) -> None:
    """Shape, Gather, and Slice and Squeeze by constants, as torch ops in the graph."""
    from torch.onnx.operators import shape_as_tensor

    graph, x = gm.graph, node.args[0] if node.args else None
    new = None
    with graph.inserting_before(node):
        if isinstance(module, ops.shape.OnnxShape):
            new = graph.call_function(shape_as_tensor, (x,))
            if (module._start, module._end) != (0, None):
                new = graph.call_function(operator.getitem,
                                          (new, slice(module._start, module._end)))
        elif isinstance(module, ops.gather.OnnxGather) and len(node.args) == 2:
            indices = _attr_value(gm, node.args[1])  # constant ones as literals, for the rules
            index = node.args[1] if indices is None or indices.ndim > 1 else \
                indices.item() if indices.ndim == 0 else indices.tolist()
            new = graph.call_function(operator.getitem, (x, _along(module._axis, index)))
        elif isinstance(module, ops.slice.OnnxSlice):
            new = _sliced(gm, node, x)
        elif isinstance(module, ops.squeeze.OnnxSqueezeStaticAxes):
            new = _squeezed(graph, x, module.axes)
        elif isinstance(module, ops.squeeze.OnnxSqueezeDynamicAxes) and len(node.args) == 2:
            axes = _attr_value(gm, node.args[1])
            if axes is not None:
                new = _squeezed(graph, x, axes.tolist())
    if new is not None:
        node.replace_all_uses_with(new)
        graph.erase_node(node)


def _squeezed(graph: fx.Graph, x: fx.Node, axes: list[int] | None) -> fx.Node:
    """Squeeze ``axes`` (all axes of size 1 when none), one axis at a time from the last:
    TorchScript's exporter takes one."""
    if not axes:
        return graph.call_function(torch.squeeze, (x,))
    ndim = len(_shape(x) or ())
    for axis in sorted((a % ndim if ndim else a for a in axes), reverse=True):
        x = graph.call_function(torch.squeeze, (x, axis))
    return x


def _along(axis: int, index: Any) -> Any:
    """The getitem index that takes ``index`` along ``axis`` (numpy.take, as Gather)."""
    if axis < 0:
        return (Ellipsis, index, *(slice(None),) * (-axis - 1))
    return index if axis == 0 else (*(slice(None),) * axis, index)


def _sliced(gm: fx.GraphModule, node: fx.Node, x: Any) -> fx.Node | None:
    """A Slice by constant bounds (and axes and positive steps) as indexing."""
    names = ("starts", "ends", "axes", "steps")
    given = dict(zip(names, node.args[1:], strict=False)) | dict(node.kwargs)
    values = {k: _attr_value(gm, v) for k, v in given.items()}
    if any(v is None for v in values.values()) or "starts" not in values \
            or "ends" not in values:
        return None
    starts, ends = values["starts"].tolist(), values["ends"].tolist()
    axes = values["axes"].tolist() if "axes" in values else list(range(len(starts)))
    steps = values["steps"].tolist() if "steps" in values else [1] * len(starts)
    ndim = len(_shape(x) or ())
    if not ndim or any(s <= 0 for s in steps):
        return None
    index = [slice(None)] * ndim
    for axis, start, end, step in zip(axes, starts, ends, steps, strict=True):
        index[axis % ndim] = slice(start, end, step)
    return gm.graph.call_function(operator.getitem, (x, tuple(index)))


def _attr_value(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    """The constant a ``get_attr`` argument reads, or None for a computed one."""
    if not isinstance(arg, fx.Node) or arg.op != "get_attr":
        return None
    value = resolve_target(gm, arg.target)
    return value if isinstance(value, torch.Tensor) else None


def _shape(node: Any) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _as_flatten(node: fx.Node) -> nn.Module | None:
    """``nn.Flatten(start, end)`` when a reshape merges one run of axes of its input and
    keeps the others (checked on the example's shapes), else None: its target shape, a
    constant or computed from sizes (``[N, -1]`` from Shape), then follows the channels."""
    if len(node.args) != 2:
        return None
    before, after = _shape(node.args[0]), _shape(node)
    if before is None or after is None:
        return None
    if before == after:
        return nn.Identity()
    for start in range(len(before)):
        for end in range(start + 1, len(before)):
            merged = (*before[:start], math.prod(before[start:end + 1]), *before[end + 1:])
            if merged == after:
                return nn.Flatten(start, end)
    return None


def _check_conversion(gm: fx.GraphModule, path: Path, example_inputs: tuple, spec: str) -> None:
    """The converted model must compute what ONNX Runtime computes on the file."""
    import onnxruntime as ort

    from structprune.core.verify import compare, flatten_outputs

    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        feeds = {i.name: x.numpy() for i, x in zip(session.get_inputs(), example_inputs,
                                                  strict=False)}
        expected = [torch.from_numpy(np.asarray(v)) for v in session.run(None, feeds)]
    except Exception as exc:  # noqa: BLE001 - the file itself does not run
        raise StructPruneError(f"{spec} does not run in ONNX Runtime on inputs of shape "
                               f"{[tuple(x.shape) for x in example_inputs]}: "
                               f"{first_line(exc, 160)}") from exc
    with torch.no_grad():
        got = flatten_outputs(gm(*example_inputs))
    shapes = [tuple(t.shape) for t in got], [tuple(t.shape) for t in expected]
    if shapes[0] != shapes[1]:
        raise StructPruneError(f"{spec}: the converted model's outputs {shapes[0]} differ from "
                               f"ONNX Runtime's {shapes[1]}")
    error = compare(expected, got).max_rel_error
    allowed = CONVERSION_TOLERANCE if error <= CONVERSION_TOLERANCE else \
        max(CONVERSION_TOLERANCE, NOISE_MULTIPLE * _float32_noise(gm, example_inputs, got))
    if not error <= allowed:
        raise StructPruneError(f"{spec}: onnx2torch's conversion differs from ONNX Runtime "
                               f"(relative error {error:.2e} > {allowed:.1e})")


def _float32_noise(gm: fx.GraphModule, example_inputs: tuple, got: list[torch.Tensor]) -> float:
    """How far the model's own float32 outputs are from its float64 ones: a deep model with
    random weights can amplify rounding until ONNX Runtime and torch disagree in the first
    digit, which is no conversion error. 0 when the model cannot run in float64."""
    from structprune.core.verify import compare

    try:
        wide = copy.deepcopy(gm).double()
        with torch.no_grad():
            exact = wide(*(x.double() for x in example_inputs))
    except Exception:  # noqa: BLE001 - a dtype fixed in the graph: no yardstick
        return 0.0
    return compare(exact, got).max_rel_error


# converters onnx2torch lacks


@functools.cache
def register_converters() -> None:
    """Add to onnx2torch's registry, once, the converters it lacks (see the module doc)."""
    from onnx2torch.node_converters.registry import add_converter

    for op, versions, converter in _EXPLICIT:
        for version in versions:
            add_converter(operation_type=op, version=version)(converter)
    for op, version, converter in _same_schema_versions():
        add_converter(operation_type=op, version=version)(converter)


@functools.cache
def _schemas() -> dict[str, dict[int, Any]]:
    from onnx import defs

    found: dict[str, dict[int, Any]] = {}
    for schema in defs.get_all_schemas_with_history():
        if schema.domain in ("", "ai.onnx"):
            found.setdefault(schema.name, {})[schema.since_version] = schema
    return found


def _converter(op: str, version: int) -> Any:
    """onnx2torch's converter registered for exactly this version of ``op``, or None."""
    from onnx2torch.node_converters.registry import get_converter

    try:
        converter = get_converter(op, version)
    except NotImplementedError:
        return None
    schema = _schemas()[op]
    since = max(v for v in schema if v <= version)
    return converter if since == version else None


def _same_schema_versions() -> list[tuple[str, int, Any]]:
    """(op, version, converter) for each version newer than onnx2torch's newest of that op
    (or older than its oldest) whose schema has the same attributes, inputs and outputs as
    that one: the versions differ only in the types the op accepts, and its converter
    applies."""
    def form(schema: Any) -> tuple:
        return (sorted(schema.attributes), [i.name for i in schema.inputs],
                [o.name for o in schema.outputs])

    found = []
    for op, versions in _schemas().items():
        known = [v for v in versions if _converter(op, v) is not None]
        if not known:
            continue
        for nearest, others in ((max(known), [v for v in versions if v > max(known)]),
                                (min(known), [v for v in versions if v < min(known)])):
            for version in others:
                if form(versions[version]) == form(versions[nearest]) \
                        and _converter(op, version) is None:
                    found.append((op, version, _converter(op, nearest)))
    return found


def _result(module: nn.Module, node: Any, inputs: tuple[str, ...] | None = None) -> Any:
    from onnx2torch.utils.common import OnnxMapping, OperationConverterResult

    return OperationConverterResult(
        torch_module=module,
        onnx_mapping=OnnxMapping(inputs=tuple(node.input_values if inputs is None else inputs),
                                 outputs=tuple(node.output_values)))


def _constant_input(node: Any, graph: Any, position: int) -> np.ndarray | None:
    """A node input that is a graph constant, as an array; None when absent or computed."""
    from onnx2torch.utils.common import get_const_value

    if len(node.input_values) <= position or not node.input_values[position]:
        return None
    try:
        value = get_const_value(node.input_values[position], graph)
    except KeyError:
        return None
    return np.asarray(value.numpy() if isinstance(value, torch.Tensor) else value)


def _has_input(node: Any, position: int) -> bool:
    return len(node.input_values) > position and bool(node.input_values[position])


def _reshape(node: Any, graph: Any) -> Any:
    """Reshape 19+; ``allowzero=1`` where the constant target shape holds no zero (then it
    is the plain reshape)."""
    from onnx2torch.node_converters.reshape import OnnxReshape

    if node.attributes.get("allowzero", 0) == 1:
        shape = _constant_input(node, graph, 1)
        if shape is None or (shape == 0).any():
            raise NotImplementedError("allowzero=1 with a zero in the target shape (or a "
                                      "computed one) is not supported")
    return _result(OnnxReshape(), node)


def _reduce(node: Any, graph: Any) -> Any:
    """ReduceMean, ReduceMax & co. 18+, whose axes became an input: constant axes."""
    from onnx2torch.node_converters.reduce import OnnxReduceStaticAxes

    keepdims = node.attributes.get("keepdims", 1)
    axes = _constant_input(node, graph, 1)
    if _has_input(node, 1) and axes is None:
        raise NotImplementedError("axes computed at run time are not supported")
    if (axes is None or axes.size == 0) and node.attributes.get("noop_with_empty_axes", 0):
        return _result(nn.Identity(), node, node.input_values[:1])
    axes_list = None if axes is None or axes.size == 0 else [int(a) for a in axes.ravel()]
    return _result(OnnxReduceStaticAxes(node.operation_type, axes_list, keepdims), node,
                   node.input_values[:1])


def _split(node: Any, graph: Any) -> Any:
    """Split 18: sizes as an input, or ``num_outputs`` parts (the last one smaller when the
    axis does not divide; those sizes are read from the graph's shapes)."""
    from onnx2torch.node_converters.split import OnnxSplit, OnnxSplit13
    from onnx2torch.utils.common import get_shape_from_value_info

    axis, parts = node.attributes.get("axis", 0), len(node.output_values)
    if _has_input(node, 1):
        return _result(OnnxSplit13(num_splits=parts, axis=axis), node)
    sizes = []
    for name in node.output_values:
        info = graph.value_info.get(name)
        shape = get_shape_from_value_info(info) if info is not None else []
        sizes.append(shape[axis] if len(shape) > abs(axis) or 0 <= axis < len(shape) else 0)
    if all(s > 0 for s in sizes) and len(set(sizes)) > 1:
        return _result(OnnxSplit(num_splits=parts, axis=axis, split=sizes), node)
    return _result(OnnxSplit13(num_splits=parts, axis=axis), node, node.input_values[:1])


def _older(op: str, version: int, unsupported: dict[str, Any]) -> Any:
    """A converter for a newer version of ``op`` that added attributes: the converter of
    ``version`` when the node leaves each of ``unsupported`` (attribute -> the value that
    means "as before", or an input position that must be absent) as before."""
    def convert(node: Any, graph: Any) -> Any:
        for name, default in unsupported.items():
            if isinstance(name, int):
                if _has_input(node, name):
                    raise NotImplementedError(f"{op} with input {name} is not supported")
            elif node.attributes.get(name, default) not in (default, [default] * 8):
                value = node.attributes.get(name)
                raise NotImplementedError(f"{op} with {name}={value} is not supported")
        return _converter(op, version)(node, graph)
    return convert


def _resize_v18(node: Any, graph: Any) -> Any:
    if node.attributes.get("coordinate_transformation_mode") == "half_pixel_symmetric":
        raise NotImplementedError("Resize with half_pixel_symmetric is not supported")
    return _older("Resize", 13, {"antialias": 0, "axes": None,
                                 "keep_aspect_ratio_policy": "stretch"})(node, graph)


def _pad_v18(node: Any, graph: Any) -> Any:
    if node.attributes.get("mode") == "wrap":
        raise NotImplementedError("Pad with mode=wrap is not supported")
    return _older("Pad", 13, {3: None})(node, graph)


def _average_pool_v19(node: Any, graph: Any) -> Any:
    dilations = node.attributes.get("dilations")
    if dilations is not None and any(d != 1 for d in dilations):
        raise NotImplementedError(f"AveragePool with dilations={list(dilations)} is not "
                                  "supported")
    return _converter("AveragePool", 11)(node, graph)


def _cast_v19(node: Any, graph: Any) -> Any:
    from onnx import TensorProto

    if node.attributes.get("to") in (getattr(TensorProto, n, -1) for n in (
            "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")):
        raise NotImplementedError("Cast to float8 is not supported")
    return _converter("Cast", 13)(node, graph)


def _batch_norm_v7(node: Any, graph: Any) -> Any:
    if node.attributes.get("spatial", 1) != 1:
        raise NotImplementedError("BatchNormalization with spatial=0 is not supported")
    return _converter("BatchNormalization", 9)(node, graph)


def _gelu(node: Any, graph: Any) -> Any:
    return _result(nn.GELU(approximate=node.attributes.get("approximate", "none")), node)


def _mish(node: Any, graph: Any) -> Any:
    return _result(nn.Mish(), node)


_REDUCE = ("ReduceL1", "ReduceL2", "ReduceLogSum", "ReduceLogSumExp", "ReduceMax", "ReduceMean",
           "ReduceMin", "ReduceProd", "ReduceSumSquare")
# (op, versions, converter): versions whose semantics changed, or ops onnx2torch lacks
_EXPLICIT = [
    ("Reshape", (19, 21, 23, 24, 25), _reshape),
    *((op, (18, 20) if op in ("ReduceMax", "ReduceMin") else (18,), _reduce) for op in _REDUCE),
    ("Split", (18,), _split),
    ("Resize", (18, 19), _resize_v18),
    ("Pad", (18, 19, 21, 23, 24, 25), _pad_v18),
    ("AveragePool", (19, 22), _average_pool_v19),
    ("Cast", (19, 21, 23, 24, 25), _cast_v19),
    ("BatchNormalization", (7,), _batch_norm_v7),
    ("Upsample", (9,), lambda node, graph: _converter("Resize", 10)(node, graph)),
    ("Gelu", (20,), _gelu),
    ("Mish", (18, 22), _mish),
]
