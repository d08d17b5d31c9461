"""Rules for the ATen ops of torch.export graphs, mapped onto the functional rules.

A torch.export graph (the fallback capture) calls ``torch.ops.aten.*`` overloads instead of
``torch.nn.functional``; most take the same arguments as their functional twins. The
elementwise families are not listed here: :func:`twins` derives their ATen overloads from the
fx spellings that :mod:`structprune.core.rules.elementwise` declares, so both capture paths
know the same ops.
"""

from __future__ import annotations

import inspect
import operator
from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F

from structprune.core.registry import DEFAULT_REGISTRY as R
from structprune.core.rules import elementwise as fx_elementwise
from structprune.core.rules import layers, reduce, shape
from structprune.core.rules.base import elementwise, metadata, passthrough
from structprune.types import ChannelMap, RuleContext, TensorInfo

aten = torch.ops.aten

# fx spellings whose ATen ops have other names; every other spelling calls the ATen op of its
# own name (a method's name, a function's ``__name__``)
ATEN_NAMES: dict[Any, tuple[str, ...]] = {
    operator.truediv: ("div",), operator.floordiv: ("floor_divide",),
    operator.mod: ("remainder",), operator.pos: ("positive",), operator.invert: ("bitwise_not",),
    operator.and_: ("__and__",), operator.or_: ("__or__",), operator.xor: ("__xor__",),
    operator.iadd: ("add_",), operator.isub: ("sub_",), operator.imul: ("mul_",),
    operator.itruediv: ("div_",),
    operator.sub: ("sub", "rsub"),  # ``1 - x`` is rsub
    "__add__": ("add",), "__radd__": ("add",), "__sub__": ("sub",), "__mul__": ("mul",),
    "__rmul__": ("mul",), "__truediv__": ("div",),
    F.threshold: ("threshold",),  # defined as ``_threshold``
    F.dropout1d: ("feature_dropout",), F.dropout2d: ("feature_dropout",),
    F.dropout3d: ("feature_dropout",),
    "to": ("to", "_to_copy"),
    "size": ("size", "sym_size"),
    getattr: (), len: (),  # Python's own, evaluated while exporting
}


def _overloads(*names: str) -> list:
    """Every overload of the named ATen ops that this torch build has."""
    found = []
    for name in names:
        packet = getattr(aten, name, None)
        if packet is None:
            continue
        for overload in packet.overloads():
            found.append(getattr(packet, overload))
    return found


def _takes_inplace(fn: Any) -> bool:
    """A function with an ``inplace`` flag, which calls the op's in-place form (``relu_``)."""
    try:
        return "inplace" in inspect.signature(fn).parameters
    except (TypeError, ValueError):  # a builtin without a signature, or a method name
        return False


def twins(spellings: Iterable[Any]) -> list:
    """The ATen overloads that the fx spellings of ops (functions, method names) become in a
    torch.export graph."""
    names: list[str] = []
    for spelling in spellings:
        own = ATEN_NAMES.get(spelling, (spelling if isinstance(spelling, str)
                                        else spelling.__name__,))
        names += own
        if _takes_inplace(spelling):
            names += [f"{name}_" for name in own]
    return _overloads(*dict.fromkeys(names))


for _rule, _spellings in fx_elementwise.FAMILIES:
    R.rule(*twins(_spellings))(_rule)


# What the exporter writes on its own, with no fx spelling


@R.rule(*_overloads("alias", "lift_fresh_copy"))
def _exporter_copy(ctx: RuleContext, input, *rest, **kwargs):
    """A view (``x[...]``) or a lifted constant: the same values."""
    return passthrough(ctx, input)


@R.rule(*_overloads("_assert_tensor_metadata", "_assert_scalar"))
def _exporter_check(ctx: RuleContext, *args, **kwargs):
    """The exporter's checks of a dtype (beside each ``.to``) or a size read no data."""
    return metadata(ctx)


# Multiply-accumulates


def _conv_macs(capture, node, module):
    return layers.conv_macs(capture, node, node.args[0], node.args[1], False)


def _conv_t_macs(capture, node, module):
    return layers.conv_macs(capture, node, node.args[0], node.args[1], True)


def _convolution_macs(capture, node, module):
    transposed = bool(node.args[6]) if len(node.args) > 6 else False
    return layers.conv_macs(capture, node, node.args[0], node.args[1], transposed)


def _matmul_macs(capture, node, module):
    return layers.matmul_macs(capture, node, node.args[0])


def _addmm_macs(capture, node, module):
    return layers.matmul_macs(capture, node, node.args[1])


@R.rule(*_overloads("conv1d", "conv2d", "conv3d"), macs=_conv_macs)
def _conv(ctx: RuleContext, input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):
    return layers.convolution(ctx, input, weight, bias, groups, False,
                              layers.groups_owned(ctx, weight, groups))


@R.rule(*_overloads("conv_transpose1d", "conv_transpose2d", "conv_transpose3d"),
        macs=_conv_t_macs)
def _conv_t(ctx: RuleContext, input, weight, bias=None, stride=1, padding=0, output_padding=0,
            groups=1, dilation=1):
    return layers.convolution(ctx, input, weight, bias, groups, True,
                              layers.groups_owned(ctx, weight, groups))


@R.rule(*_overloads("convolution"), macs=_convolution_macs)
def _convolution(ctx: RuleContext, input, weight, bias, stride, padding, dilation, transposed,
                 output_padding, groups):
    return layers.convolution(ctx, input, weight, bias, groups, transposed,
                              layers.groups_owned(ctx, weight, groups))


@R.rule(*_overloads("linear"), macs=_matmul_macs)
def _linear(ctx: RuleContext, input, weight, bias=None):
    return layers.linear(ctx, input, weight, bias)


@R.rule(*_overloads("batch_norm", "_native_batch_norm_legit_no_training",
                        "_native_batch_norm_legit", "native_batch_norm", "instance_norm"))
def _batch_norm(ctx: RuleContext, input, weight=None, bias=None, running_mean=None,
                running_var=None, *rest, **kwargs):
    layers.per_channel(ctx, input, [weight, bias, running_mean, running_var])
    out = ctx.output
    if isinstance(out, tuple):  # (output, saved statistics...)
        return (ctx.result(input.maps, out[0]),) + tuple(ctx.result([], o) for o in out[1:])
    return ctx.result(input.maps)


@R.rule(*_overloads("layer_norm"))
def _layer_norm(ctx: RuleContext, input, normalized_shape, weight=None, bias=None, *rest):
    return layers.functional_layer_norm(ctx, input, normalized_shape, weight, bias)


@R.rule(*_overloads("group_norm"))
def _group_norm(ctx: RuleContext, input, num_groups, weight=None, bias=None, *rest):
    return layers.functional_group_norm(ctx, input, num_groups, weight, bias)


@R.rule(*_overloads("mm", "bmm", "matmul"), macs=_matmul_macs)
def _matmul(ctx: RuleContext, a, b):
    return layers.matmul(ctx, a, b)


@R.rule(*_overloads("addmm"), macs=_addmm_macs)
def _addmm(ctx: RuleContext, bias, a, b, *rest, **kwargs):
    return elementwise(ctx, layers.matmul(ctx, a, b), bias)


R.rule(*_overloads("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d",
                       "avg_pool3d", "adaptive_avg_pool1d", "adaptive_avg_pool2d",
                       "adaptive_avg_pool3d", "adaptive_max_pool2d", "max_pool2d_with_indices",
                       "upsample_nearest2d", "upsample_bilinear2d", "_adaptive_avg_pool2d",
                       "upsample_nearest1d", "upsample_linear1d", "upsample_bicubic2d"))(
    reduce.pool)


@R.rule(*_overloads("mean"))
def _mean(ctx: RuleContext, input, dim=None, keepdim=False, *rest, **kwargs):
    return reduce.reduce(ctx, input, dim, keepdim, False, "mean")


@R.rule(*_overloads("sum"))
def _sum(ctx: RuleContext, input, dim=None, keepdim=False, *rest, **kwargs):
    return reduce.reduce(ctx, input, dim, keepdim, True, "sum")


@R.rule(*_overloads("amax", "amin", "max", "min"))
def _amax(ctx: RuleContext, input, dim=None, keepdim=False, *rest, **kwargs):
    return reduce.reduce(ctx, input, dim, keepdim, False, "max/min")


@R.rule(*_overloads("_softmax", "softmax", "_log_softmax", "log_softmax"))
def _softmax(ctx: RuleContext, input, dim, *rest, **kwargs):
    return reduce.softmax(ctx, input, dim, "softmax")


@R.rule(*_overloads("view", "reshape", "_unsafe_view"))
def _view(ctx: RuleContext, input, size):
    # a torch.export graph holds every size as a literal: the reshape can only stay exact
    # if it keeps the channel axis in place, so sizes of the input's own axes count as free
    literal = {i for i, s in enumerate(size) if s != -1 and s not in input.shape}
    return shape.reshape(ctx, input, literal)


@R.rule(*_overloads("flatten"))
def _flatten(ctx: RuleContext, input, start_dim=0, end_dim=-1):
    return shape.reshape(ctx, input, set())


@R.rule(*_overloads("squeeze", "unsqueeze", "squeeze_", "unsqueeze_"))
def _squeeze(ctx: RuleContext, input, *dims):
    return shape.reshape(ctx, input, set())


@R.rule(*_overloads("permute"))
def _permute(ctx: RuleContext, input, dims):
    return shape.permute(ctx, input, dims)


@R.rule(*_overloads("transpose"))
def _transpose(ctx: RuleContext, input, dim0, dim1):
    return shape.transpose(ctx, input, dim0, dim1)


@R.rule(*_overloads("cat", "concat"))
def _cat(ctx: RuleContext, tensors, dim=0):
    return shape.cat(ctx, tensors, dim)


@R.rule(*_overloads("stack"))
def _stack(ctx: RuleContext, tensors, dim=0):
    return shape.stack(ctx, tensors, dim)


@R.rule(*_overloads("chunk"))
def _chunk(ctx: RuleContext, input, chunks, dim=0):
    return shape.split_equal(ctx, input, chunks, dim, "chunk")


@R.rule(*_overloads("split", "split_with_sizes", "unsafe_split"))
def _split(ctx: RuleContext, input, split_size, dim=0):
    return shape.literal_split(ctx, input, split_size, dim,
                               "split sizes are fixed in the exported graph")


@R.rule(*_overloads("pad", "constant_pad_nd"))
def _pad(ctx: RuleContext, input, pad, *rest):
    return shape.pad(ctx, input, pad)


@R.rule(*_overloads("pixel_shuffle"))
def _pixel_shuffle(ctx: RuleContext, input, upscale_factor):
    return shape.pixel_shuffle(ctx, input, upscale_factor)


@R.rule(*_overloads("expand"))
def _expand(ctx: RuleContext, input, size, *rest):
    return shape.expand(ctx, input, size)


@R.rule(*_overloads("index"))
def _index(ctx: RuleContext, input, indices):
    """``x[i, j]`` with index tensors (RT-DETR's query selection, ``features[b, topk]``): the
    indexed axes select entries, so their maps are kept whole; every other axis keeps its map,
    moved where advanced indexing moves it (the index shape takes the place of adjacent
    indexed axes, else it comes first)."""
    indices = list(indices)
    for index in indices:
        if isinstance(index, TensorInfo):
            ctx.block(index, "its values index another tensor")
    indexed = [d for d, index in enumerate(indices) if index is not None]
    if not indexed:
        return passthrough(ctx, input)
    rest = [d for d in range(input.ndim) if d not in indexed]
    out = ctx.out_shape
    width = len(out) - len(rest)  # axes of the broadcast index shape
    if indexed == list(range(indexed[0], indexed[-1] + 1)):
        where = {d: d if d < indexed[0] else d - len(indexed) + width for d in rest}
    else:
        where = {d: width + k for k, d in enumerate(rest)}
    if width < 0 or any(out[where[d]] != input.shape[d] for d in rest):  # a boolean mask
        ctx.block(input, "advanced indexing that this rule cannot follow")
        return ctx.result()
    maps = []
    for m in input.maps:
        if set(m.dims) & set(indexed):
            ctx.block(m, "advanced indexing over a channel axis")
        else:
            maps.append(ChannelMap(tuple(where[d] for d in m.dims), m.ids))
    return ctx.result(maps)
