"""Rules for the modules onnx2torch converts ONNX ops into (an ONNX file as a model source,
:mod:`structprune.front.onnx_in`).

Most ONNX ops become torch layers with rules of their own (Conv -> ``nn.Conv2d``, Gemm ->
``nn.Linear``, BatchNormalization -> ``nn.BatchNorm2d``, Relu, MaxPool, ...); the rest become
onnx2torch's ``Onnx*`` modules, declared here, each a leaf of the trace. Their sizes, axes,
indices and scales arrive as tensors: graph constants (initializers, which onnx2torch keeps
as buffers) or tensors the graph computes from sizes. Such an operand carries no channels
(:func:`not_channels`), and where its values fix a channel count the channels stay:

- Reshape keeps the channels of every axis whose target size is a constant other than -1
  and 0 (a computed target shape: every axis), unless the conversion turned it into
  ``nn.Flatten`` (a reshape that only flattens axes follows any channel count);
- Split keeps the channels of its axis when its sizes are constants (a split into equal
  constant parts became a split into equal parts, which follows the count);
- Shape (``shape_as_tensor`` once converted) keeps the channels of the axes whose sizes the
  graph reads; Gather and Slice by constants, converted to indexing, keep the channels of
  an axis they pick from, as indexing does.
"""

from __future__ import annotations

import functools
import operator
from typing import Any

import numpy as np
import torch

from structprune.core.registry import DEFAULT_REGISTRY as R
from structprune.core.registry import RuleRegistry
from structprune.core.rules.base import (
    broadcast_shape,
    channel_passthrough,
    elementwise,
    merge_elementwise,
    passthrough,
    same_shape,
)
from structprune.core.rules.layers import matmul, matmul_macs
from structprune.core.rules.reduce import reduce
from structprune.core.rules.shape import (
    cat,
    cat_shape,
    literal_split,
    pad,
    permute,
    reshape,
    split_equal,
)
from structprune.types import RuleContext, TensorInfo, spec_to_info, tensor_infos

CONSTANT_SHAPE = "the target shape is a constant of the ONNX graph"
COMPUTED_SHAPE = "the target shape is computed by the ONNX graph"
# a reduction whose result with removed channels zeroed equals its result without them
_EXACT_REDUCTIONS = ("ReduceSum", "ReduceSumSquare", "ReduceL1", "ReduceL2")


def not_channels(ctx: RuleContext, *operands: Any) -> None:
    """Sizes, axes, indices, scales: operands with no channel axis at all, never listed in a
    group (onnx2torch keeps the constant ones as buffers, which would otherwise be)."""
    for info in operands:
        if isinstance(info, TensorInfo):
            ctx.kernel_taps(info)


def _constant_tensor(ctx: RuleContext, info: Any) -> torch.Tensor | None:
    owner = ctx.owner(info)
    return None if owner is None else getattr(owner, info.param.rsplit(".", 1)[-1])


def constant(ctx: RuleContext, info: Any) -> np.ndarray | None:
    """The value of an operand that is a graph constant (a buffer of onnx2torch's initializer
    container); None for a tensor the graph computes."""
    tensor = _constant_tensor(ctx, info)
    return None if tensor is None else tensor.detach().cpu().numpy()


def integers_are_sizes(rule: Any) -> Any:
    """``rule``, first marking its integer constant operands as no channels: in an ONNX graph
    they are sizes, axes and indices (a Gather's flat offsets are ``[1, C, 1, 1]``), which
    the plan must never slice."""
    @functools.wraps(rule)
    def checked(ctx: RuleContext, module: Any, *args: Any, **kwargs: Any) -> Any:
        for info in tensor_infos((args, kwargs)):
            tensor = _constant_tensor(ctx, info)
            if tensor is not None and not tensor.is_floating_point():
                ctx.kernel_taps(info)
        return rule(ctx, module, *args, **kwargs)
    return checked


@integers_are_sizes
def _binary(ctx: RuleContext, module: Any, first: Any, second: Any) -> TensorInfo:
    """Add, Sub, Mul, Div: broadcasting arithmetic (opset < 7 broadcast along an axis too)."""
    if module.broadcast == 1 and module.axis is not None:
        ctx.block(tensor_infos((first, second)), "broadcast along an axis (ONNX opset < 7)")
        return spec_to_info(ctx.output)
    return elementwise(ctx, first, second)


@integers_are_sizes
def _variadic(ctx: RuleContext, module: Any, *operands: Any) -> TensorInfo:
    """Where, Max, Min, Mean, Sum, Pow, comparisons: channels at one position go together."""
    return elementwise(ctx, *operands)


@integers_are_sizes
def _unary(ctx: RuleContext, module: Any, x: TensorInfo) -> TensorInfo:
    return passthrough(ctx, x)


@integers_are_sizes
def _concat(ctx: RuleContext, module: Any, *tensors: Any) -> TensorInfo:
    return cat(ctx, list(tensors), module.axis)


def _concat_shape(module: Any, args: tuple, kwargs: dict) -> Any:
    return None if kwargs else cat_shape(None, (list(args), module.axis), {})


@integers_are_sizes
def _transpose(ctx: RuleContext, module: Any, x: TensorInfo) -> TensorInfo:
    return permute(ctx, x, module.perm or list(range(x.ndim))[::-1])


def _transpose_shape(module: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0] if len(args) == 1 and not kwargs else None
    if not isinstance(x, torch.Tensor):
        return None
    perm = module.perm or list(range(x.ndim))[::-1]
    return tuple(x.shape[p] for p in perm), x.dtype


def _reshape(ctx: RuleContext, module: Any, x: TensorInfo, shape: Any) -> TensorInfo:
    """A constant target shape fixes every axis but those of -1 (inferred) and 0 (the
    input's own size); a computed one, every axis."""
    not_channels(ctx, shape)
    target = constant(ctx, shape)
    if target is None:
        return reshape(ctx, x, set(range(len(ctx.out_shape))), COMPUTED_SHAPE)
    literal = {i for i, size in enumerate(target.ravel().tolist()) if size not in (-1, 0)}
    return reshape(ctx, x, literal, CONSTANT_SHAPE)


def _split13(ctx: RuleContext, module: Any, x: TensorInfo, split: Any = None) -> tuple:
    """Split into equal parts (no sizes), or into the sizes of a constant (channels kept)."""
    if split is None:
        return split_equal(ctx, x, module.num_splits, module.axis, "Split")
    not_channels(ctx, split)
    sizes = constant(ctx, split)
    return literal_split(ctx, x, None if sizes is None else sizes.tolist(), module.axis,
                         "split sizes are constants of the ONNX graph")


def _split(ctx: RuleContext, module: Any, x: TensorInfo) -> tuple:
    """Split (opsets < 13), its sizes an attribute."""
    if module.split is None:
        return split_equal(ctx, x, module.num_splits, module.axis, "Split")
    return literal_split(ctx, x, list(module.split), module.axis,
                         "split sizes are constants of the ONNX graph")


def _resize(ctx: RuleContext, module: Any, x: TensorInfo, roi: Any = None, scales: Any = None,
            sizes: Any = None) -> TensorInfo:
    """Resampling over the spatial axes; target sizes whose channel entry is read fix it."""
    not_channels(ctx, roi, scales, sizes)
    if sizes is not None and not getattr(module, "ignore_bs_ch_size", True):
        return passthrough(ctx, x, [0], "Resize's target sizes fix the channel count")
    return channel_passthrough(ctx, x)


def _resize_v10(ctx: RuleContext, module: Any, x: TensorInfo, scales: Any) -> TensorInfo:
    not_channels(ctx, scales)
    return channel_passthrough(ctx, x)


def _global_pool(ctx: RuleContext, module: Any, x: TensorInfo) -> TensorInfo:
    return channel_passthrough(ctx, x)


def _global_pool_shape(module: Any, args: tuple, kwargs: dict) -> Any:
    x = args[0] if len(args) == 1 and not kwargs else None
    if not isinstance(x, torch.Tensor) or x.ndim < 3:
        return None
    return (*x.shape[:2], *(1,) * (x.ndim - 2)), x.dtype


@integers_are_sizes
def _reduce(ctx: RuleContext, module: Any, x: TensorInfo) -> Any:
    return reduce(ctx, x, module.axes, module.keepdims,
                  module.operation_type in _EXACT_REDUCTIONS, module.operation_type)


@integers_are_sizes
def _matmul(ctx: RuleContext, module: Any, a: TensorInfo, b: TensorInfo) -> TensorInfo:
    return matmul(ctx, a, b)


def _matmul_macs(capture: Any, node: Any, module: Any) -> int:
    return matmul_macs(capture, node, node.args[0])


@integers_are_sizes
def _gemm(ctx: RuleContext, module: Any, a: TensorInfo, b: TensorInfo,
          c: Any = None) -> TensorInfo:
    """``alpha * A @ B + beta * C`` with a computed B (constant ones became nn.Linear)."""
    if module.trans_a or module.trans_b:
        ctx.block(tensor_infos((a, b, c)), "Gemm with a transposed operand")
        return spec_to_info(ctx.output)
    product = matmul(ctx, a, b)
    if not isinstance(c, TensorInfo):
        return product
    return ctx.result(merge_elementwise(ctx, [product, c], ctx.out_shape))


def _shape_of(ctx: RuleContext, input: TensorInfo) -> TensorInfo:
    """The sizes of ``input`` as a tensor (an ONNX Shape): the channels of every axis whose
    size the graph reads stay, as the graph may do anything with their count. The axes
    read are those its users index with constants; any other use reads all."""
    read: set[int] = set()
    for user in ctx.node.users:
        index = user.args[1] if user.target is operator.getitem and len(user.args) == 2 \
            else None
        if isinstance(index, int):
            read.add(index % input.ndim)
        elif isinstance(index, slice):
            read.update(range(input.ndim)[index])
        else:
            read = set(range(input.ndim))
            break
    for dim in sorted(read):
        ctx.block(input.map_on(dim), "its size is read by a Shape op of the ONNX graph")
    return spec_to_info(ctx.output)


def _slice(ctx: RuleContext, module: Any, x: TensorInfo, starts: Any, ends: Any,
           axes: Any = None, steps: Any = None) -> TensorInfo:
    """A slice along constant axes: an axis it cuts keeps its channels."""
    not_channels(ctx, starts, ends, axes, steps)
    values = [constant(ctx, v) if isinstance(v, TensorInfo) else None
              for v in (starts, ends, axes, steps)]
    first, last, along, step = values
    if first is None or last is None or (axes is not None and along is None) \
            or (steps is not None and step is None):
        return passthrough(ctx, x, [], "a Slice with bounds computed by the ONNX graph")
    along = range(len(first)) if along is None else along.tolist()
    step = [1] * len(first) if step is None else step.tolist()
    cut = [axis % x.ndim for axis, a, b, s in zip(along, first.tolist(), last.tolist(), step,
                                                    strict=True)
           if slice(a, b, s).indices(x.shape[axis % x.ndim]) != (0, x.shape[axis % x.ndim], 1)]
    return passthrough(ctx, x, [d for d in range(x.ndim) if d not in cut],
                       "a Slice with fixed bounds over a channel axis")


def _pad(ctx: RuleContext, module: Any, x: TensorInfo, pads: Any,
         constant_value: Any = None) -> TensorInfo:
    """Pad by constant amounts (ONNX order: all begins, then all ends)."""
    not_channels(ctx, pads, constant_value)
    amounts = constant(ctx, pads)
    if amounts is None:
        return passthrough(ctx, x, [], "padding computed by the ONNX graph")
    half = len(amounts) // 2
    torch_order = [int(v) for begin, end in zip(amounts[:half][::-1], amounts[half:][::-1],
                                                strict=True) for v in (begin, end)]
    return pad(ctx, x, torch_order)


def declare(registry: RuleRegistry) -> None:
    """The declarations, made once onnx2torch is imported (by an ONNX model source)."""
    from onnx2torch import node_converters as ops  # each converter module, by op
    from torch.onnx.operators import shape_as_tensor  # what the conversion makes of Shape

    registry.op(ops.binary_math_operations.OnnxBinaryMathOperation, rule=_binary,
                shape=broadcast_shape)
    registry.op(ops.base_element_wise.OnnxBaseElementWise, ops.where.OnnxWhere,
                ops.pow.OnnxPow, ops.comparisons.OnnxCompare, rule=_variadic)
    registry.op(ops.activations.OnnxErf, ops.activations.OnnxHardSigmoid, ops.clip.OnnxClip,
                ops.neg.OnnxNeg, ops.pow.OnnxSqrt, ops.reciprocal.OnnxReciprocal,
                ops.identity.OnnxCopyIdentity, rule=_unary, shape=same_shape)
    registry.op(ops.cast.OnnxCast, rule=_unary)
    registry.op(ops.concat.OnnxConcat, rule=_concat, shape=_concat_shape)
    registry.op(ops.transpose.OnnxTranspose, rule=_transpose, shape=_transpose_shape)
    registry.op(ops.reshape.OnnxReshape, rule=_reshape)
    registry.op(ops.split.OnnxSplit13, rule=_split13)
    registry.op(ops.split.OnnxSplit, rule=_split)
    registry.op(ops.resize.OnnxResize, rule=_resize)
    registry.op(ops.resize.OnnxResizeV10, rule=_resize_v10)
    registry.op(ops.global_average_pool.OnnxGlobalAveragePool,
                ops.global_average_pool.OnnxGlobalAveragePoolWithKnownInputShape,
                rule=_global_pool, shape=_global_pool_shape)
    registry.op(ops.reduce.OnnxReduceStaticAxes, rule=_reduce)
    registry.op(ops.matmul.OnnxMatMul, rule=_matmul, macs=_matmul_macs)
    registry.op(ops.gemm.OnnxGemm, rule=_gemm, macs=_matmul_macs)
    registry.op(ops.slice.OnnxSlice, rule=_slice)
    registry.op(ops.pad.OnnxPadDynamic, rule=_pad)
    registry.op(shape_as_tensor, rule=_shape_of)


R.when_imported("onnx2torch", declare)
