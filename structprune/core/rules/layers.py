"""Layers with weights: convolutions, linear maps, matmul and normalisations, and resizers."""

from __future__ import annotations

import math
import operator
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from structprune.core.registry import DEFAULT_REGISTRY as R
from structprune.core.rules.base import (
    block_except,
    filled,
    merge_elementwise,
    only_tensor_input,
    passthrough,
    project,
    same_shape,
)
from structprune.types import ChannelMap, RuleContext, TensorInfo

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSES = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NO_INPUT = "input channels come from a tensor that cannot be pruned"
_NOT_SLICEABLE = "the weight is computed, not a parameter that can be sliced"


# Multiply-accumulates, for the reports


def conv_macs(capture: Any, node: fx.Node, x: Any, weight: Any, transposed: bool) -> int:
    """A conv's output elements times its weight's fan-in; a transposed conv's input elements
    times its weight's fan-out. ``x`` and ``weight`` are node arguments or tensors."""
    w_shape = weight.shape if isinstance(weight, torch.Tensor) else \
        getattr(capture.tensor_spec(weight), "shape", None)
    if w_shape is None:
        return 0
    if transposed:
        x_spec = capture.tensor_spec(x)
        return math.prod(x_spec.shape) * math.prod(w_shape[1:]) if x_spec else 0
    return math.prod(capture.values[node.name].shape) * math.prod(w_shape[1:])


def matmul_macs(capture: Any, node: fx.Node, a: Any) -> int:
    """Output elements times the contracted size (the last axis of ``a``)."""
    a_spec = capture.tensor_spec(a)
    return math.prod(capture.values[node.name].shape) * a_spec.shape[-1] if a_spec else 0


def _arg(node: fx.Node, position: int, name: str) -> Any:
    return node.args[position] if len(node.args) > position else node.kwargs.get(name)


def _conv_module_macs(capture, node: fx.Node, module: nn.Module) -> int:
    return conv_macs(capture, node, _arg(node, 0, "input"), module.weight, module.transposed)


def _conv_fn_macs(capture, node: fx.Node, module: None) -> int:
    return conv_macs(capture, node, _arg(node, 0, "input"), _arg(node, 1, "weight"), False)


def _conv_t_fn_macs(capture, node: fx.Node, module: None) -> int:
    return conv_macs(capture, node, _arg(node, 0, "input"), _arg(node, 1, "weight"), True)


def _linear_module_macs(capture, node: fx.Node, module: nn.Linear) -> int:
    return math.prod(capture.values[node.name].shape) * module.in_features


def _matmul_macs(capture, node: fx.Node, module: None) -> int:
    return matmul_macs(capture, node, _arg(node, 0, "input"))



def convolution(ctx: RuleContext, x: TensorInfo, weight: TensorInfo, bias: TensorInfo | None,
                groups: int, transposed: bool, groups_resizable: bool) -> TensorInfo:
    """Conv and transposed conv. Grouped convs lose whole groups (inputs and outputs)."""
    cdim = x.ndim - (weight.ndim - 2) - 1  # 1 when batched, 0 when not
    block_except(ctx, x, range(cdim + 1), "channels spread over a spatial axis")
    for m in weight.maps:
        if set(m.dims) - {0, 1}:
            ctx.kernel_taps(m)
    x_ids = project(ctx, x, cdim, "conv input")
    w_in = project(ctx, weight, 0 if transposed else 1, "conv weight")
    w_out = project(ctx, weight, 1 if transposed else 0, "conv weight")
    b = project(ctx, bias, 0, "conv bias") if isinstance(bias, TensorInfo) else None
    c_in, c_out = x.shape[cdim], ctx.out_shape[cdim]
    ctx.consume(0, x, x.map_on(cdim))
    if groups == 1:
        if w_in is not None:
            if w_in is not x_ids:  # else: the weight took the input's atoms
                ctx.unify(filled(ctx, x_ids, c_in, _NO_INPUT), w_in)
        elif c_in > 1:
            ctx.block(x_ids, _NOT_SLICEABLE)
        out = w_out
    elif not groups_resizable:
        reason = f"conv with groups={groups} fixed in forward()"
        for ids in (x_ids, w_in, w_out, b):
            ctx.block(ids, reason)
        return ctx.result([ChannelMap((cdim,), w_out)] if w_out is not None and not transposed
                          else [])
    else:
        inputs = filled(ctx, x_ids, c_in, _NO_INPUT)
        if transposed:  # W is [in, out/groups, ...]: dim 0 follows the input
            ctx.block(w_out, "inside a conv group")
            if w_in is not None:
                ctx.unify(inputs, w_in)
            out = ctx.fresh((c_out,))
        else:  # W is [out, in/groups, ...]: dim 0 follows the output
            ctx.block(w_in, "inside a conv group")
            out = w_out if w_out is not None else ctx.fresh((c_out,))
        group_atoms = ctx.unify_along(inputs.reshape(groups, c_in // groups), [1])
        ctx.unify(out.reshape(groups, c_out // groups), group_atoms)
    if b is not None:
        ctx.unify(b, filled(ctx, out, c_out, "conv output"))
    return ctx.result([ChannelMap((cdim,), out)] if out is not None else [])


def conv_module(ctx: RuleContext, module: nn.Module, x: TensorInfo, *output_size) -> TensorInfo:
    """An ``nn.ConvNd`` or ``nn.ConvTransposeNd`` module (its own forward)."""
    transposed = isinstance(module, _CONV_TRANSPOSES)
    cdim = x.ndim - len(module.kernel_size) - 1
    x_ids = project(ctx, x, cdim, "conv input") if cdim >= 0 else None
    # a plain conv's input columns carry the input's channel atoms
    same_as = {1: x_ids} if x_ids is not None and module.groups == 1 and not transposed else None
    return convolution(ctx, x, ctx.module_param("weight", same_as), ctx.module_param("bias"),
                       module.groups, transposed, True)


def groups_owned(ctx: RuleContext, weight: TensorInfo, groups: int) -> bool:
    """A literal ``groups`` is resizable when it is the weight's own conv module's attribute
    (as in a Conv2d subclass calling F.conv2d, or any conv in a torch.export graph)."""
    owner = ctx.owner(weight)
    return isinstance(owner, nn.modules.conv._ConvNd) and owner.groups == groups


@R.rule(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
        macs=_conv_fn_macs)
def _conv_fn(ctx: RuleContext, input: TensorInfo, weight: TensorInfo, bias=None, stride=1,
             padding=0, dilation=1, groups=1) -> TensorInfo:
    return convolution(ctx, input, weight, bias, groups, False, groups_owned(ctx, weight, groups))


@R.rule(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d, macs=_conv_t_fn_macs)
def _conv_t_fn(ctx: RuleContext, input: TensorInfo, weight: TensorInfo, bias=None, stride=1,
               padding=0, output_padding=0, groups=1, dilation=1) -> TensorInfo:
    return convolution(ctx, input, weight, bias, groups, True, groups_owned(ctx, weight, groups))


def _resize_conv(module: nn.Module) -> None:
    out = module.weight.shape[0]
    if module.groups > 1:
        module.groups = module.groups * out // module.out_channels
    module.out_channels = out
    module.in_channels = module.weight.shape[1] * module.groups


def _resize_conv_t(module: nn.Module) -> None:
    c_in = module.weight.shape[0]
    if module.groups > 1:
        module.groups = module.groups * c_in // module.in_channels
    module.in_channels = c_in
    module.out_channels = module.weight.shape[1] * module.groups


def conv_shape(module: nn.Module, args: tuple, kwargs: dict,
               ) -> tuple[tuple[int, ...], Any] | None:
    """A conv module's output shape by the formula in ``nn.Conv2d``'s docs; None for anything
    else (the op then runs on meta tensors and raises its own error). Declared because
    convolution's meta kernel costs about 120 us a call: 10% of capturing DenseNet-201."""
    x = only_tensor_input(args, kwargs)
    n = len(module.kernel_size)
    weight = module.weight
    if x is None or x.ndim not in (n + 1, n + 2) \
            or weight.ndim != n + 2 or x.shape[-n - 1] != weight.shape[1] * module.groups \
            or x.dtype != weight.dtype:
        return None
    spatial = x.shape[-n:]
    if module.padding == "same":
        out = tuple(spatial)
    else:
        padding = (0,) * n if module.padding == "valid" else module.padding
        out = tuple((size + 2 * p - d * (k - 1) - 1) // s + 1 for size, p, d, k, s in zip(
            spatial, padding, module.dilation, module.kernel_size, module.stride, strict=True))
    if min(out, default=1) < 1:
        return None
    return (*x.shape[:-n - 1], weight.shape[0], *out), x.dtype


R.op(*_CONVS, rule=conv_module, macs=_conv_module_macs, resize=_resize_conv, shape=conv_shape)
R.op(*_CONV_TRANSPOSES, rule=conv_module, macs=_conv_module_macs, resize=_resize_conv_t)


def linear(ctx: RuleContext, x: TensorInfo, weight: TensorInfo, bias: TensorInfo | None,
           ) -> TensorInfo:
    """``x @ W.T + b`` over the last axis; other axes pass through."""
    x_ids = project(ctx, x, -1, "linear input")
    w_in = project(ctx, weight, 1, "linear weight") if weight.ndim == 2 else None
    w_out = project(ctx, weight, 0, "linear weight")
    if w_in is not None:
        ctx.unify(filled(ctx, x_ids, x.shape[-1], _NO_INPUT), w_in)
    elif weight.ndim == 2 and weight.shape[1] > 1:
        ctx.block(x_ids, _NOT_SLICEABLE)
    b = project(ctx, bias, 0, "linear bias") if bias is not None else None
    if b is not None and w_out is not None:
        ctx.unify(b, w_out)
    ctx.consume(0, x, x.map_on(-1))
    last = x.ndim - 1
    maps = [m for m in x.maps if last not in m.dims]
    if w_out is not None and weight.ndim == 2:
        maps.append(ChannelMap((last,), w_out))
    return ctx.result(maps)


def _resize_linear(module: nn.Linear) -> None:
    module.out_features, module.in_features = module.weight.shape


def linear_shape(module: nn.Module, args: tuple, kwargs: dict,
                 ) -> tuple[tuple[int, ...], Any] | None:
    """A linear module's output: the input's last axis becomes ``out_features``; None for
    anything else. Declared because the meta kernel costs about 1 ms a call."""
    x = only_tensor_input(args, kwargs)
    weight = module.weight
    if x is None or x.ndim == 0 or weight.ndim != 2 \
            or x.shape[-1] != weight.shape[1] or x.dtype != weight.dtype:
        return None
    return (*x.shape[:-1], weight.shape[0]), x.dtype


@R.rule(nn.Linear, nn.LazyLinear, macs=_linear_module_macs, resize=_resize_linear,
        shape=linear_shape)
def _linear_module(ctx: RuleContext, module: nn.Linear, x: TensorInfo) -> TensorInfo:
    return linear(ctx, x, ctx.module_param("weight"), ctx.module_param("bias"))


@R.rule(F.linear, macs=_matmul_macs)
def _linear_fn(ctx: RuleContext, input: TensorInfo, weight: TensorInfo, bias=None) -> TensorInfo:
    return linear(ctx, input, weight, bias)


@R.rule(torch.matmul, operator.matmul, torch.mm, torch.bmm, "matmul", "mm", "bmm",
        "__matmul__", macs=_matmul_macs)
def matmul(ctx: RuleContext, a: TensorInfo, b: TensorInfo) -> TensorInfo:
    """Contraction over a's last and b's second-to-last axis: a sum, so masking is exact."""
    if not isinstance(a, TensorInfo) or not isinstance(b, TensorInfo) or a.ndim < 2 or b.ndim < 2:
        ctx.block([a, b], "matmul with a vector operand")
        return ctx.result()
    a_ids = project(ctx, a, -1, "matmul")
    b_ids = project(ctx, b, -2, "matmul")
    if a_ids is not None or b_ids is not None:
        ctx.unify(filled(ctx, a_ids, a.shape[-1], _NO_INPUT), filled(ctx, b_ids, b.shape[-2], _NO_INPUT))
    ctx.consume(0, a, a.map_on(-1))
    n = len(ctx.out_shape)
    maps, batches = [], []
    # a's rows land on output dim n-2, b's columns on n-1; batch dims broadcast together
    for t, contracted, kept, out_dim in ((a, a.ndim - 1, a.ndim - 2, n - 2),
                                         (b, b.ndim - 2, b.ndim - 1, n - 1)):
        batch_maps = []
        for m in t.maps:
            if contracted in m.dims:
                if len(m.dims) > 1:  # the contraction would also remove other positions
                    ctx.block(m, "matmul over a channel axis merged with another axis")
                continue  # unified above
            if m.dims == (kept,):
                maps.append(ChannelMap((out_dim,), m.ids))
            elif all(d < t.ndim - 2 for d in m.dims):
                batch_maps.append(m)
            else:
                ctx.block(m, "matmul over a channel axis merged with a matrix axis")
        batches.append(TensorInfo(t.shape[:-2], tuple(batch_maps)))
    maps += merge_elementwise(ctx, batches, ctx.out_shape[:-2])
    return ctx.result(maps)



# Normalisations


def per_channel(ctx: RuleContext, x: TensorInfo, params: list[TensorInfo | None],
                cdim: int = 1, channels: np.ndarray | None = None) -> np.ndarray | None:
    """Unify the channel axis of ``x`` with dim 0 of every per-channel parameter.

    ``channels`` are the atoms of that axis when the caller already made them (``filled``);
    parameters that took them through ``module_param(same_as=...)`` need no unifying.
    """
    x_ids = project(ctx, x, cdim, "norm input") if x.ndim > cdim else None
    for p in params:
        if not isinstance(p, TensorInfo):
            continue
        p_ids = project(ctx, p, 0, "norm parameter")
        if p_ids is not None:
            if channels is None:
                channels = filled(ctx, x_ids, x.shape[cdim], _NO_INPUT)
            if p_ids is not channels:  # else: the parameter took these atoms
                ctx.unify(channels, p_ids)
        elif p.shape and p.shape[0] > 1:
            ctx.block(x_ids, _NOT_SLICEABLE)
    return x_ids


_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm,
                nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)


def _resize_batch_norm(module: nn.Module) -> None:
    for attr in ("weight", "running_mean"):
        t = getattr(module, attr, None)
        if isinstance(t, torch.Tensor):
            module.num_features = t.shape[0]
            return


@R.rule(*_BATCH_NORMS, resize=_resize_batch_norm, shape=same_shape)
def _batch_norm(ctx: RuleContext, module: nn.Module, x: TensorInfo) -> TensorInfo:
    cdim = 1 if x.ndim > 1 and not (isinstance(module, nn.InstanceNorm1d) and x.ndim == 2) else 0
    if isinstance(module, (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)):
        spatial = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2, nn.InstanceNorm3d: 3}[type(module)]
        cdim = x.ndim - spatial - 1
    channels = None
    if 0 <= cdim < x.ndim:  # the four vectors take the input's channel atoms
        channels = filled(ctx, project(ctx, x, cdim, "norm input"), x.shape[cdim], _NO_INPUT)
    params = [ctx.module_param(a, {0: channels} if channels is not None else None)
              for a in ("weight", "bias", "running_mean", "running_var")]
    x_ids = per_channel(ctx, x, params, cdim, channels)
    if all(p is None for p in params):  # no tensor records the channel count: the plan does
        ctx.sized_attribute("num_features", x_ids)
    return passthrough(ctx, x)


@R.rule(F.batch_norm, F.instance_norm)
def _batch_norm_fn(ctx: RuleContext, input: TensorInfo, running_mean=None, running_var=None,
                   weight=None, bias=None, *rest, **kwargs) -> TensorInfo:
    per_channel(ctx, input, [running_mean, running_var, weight, bias])
    return passthrough(ctx, input)


def _resize_group_norm(module: nn.GroupNorm) -> None:
    channels = module.weight.shape[0]
    if module.num_groups > 1:
        module.num_groups = module.num_groups * channels // module.num_channels
    module.num_channels = channels


@R.rule(nn.GroupNorm, resize=_resize_group_norm, shape=same_shape)
def _group_norm(ctx: RuleContext, module: nn.GroupNorm, x: TensorInfo) -> TensorInfo:
    return _group_norm_channels(ctx, x, module.num_groups, ctx.module_param("weight"),
                                ctx.module_param("bias"))


def _group_norm_channels(ctx: RuleContext, x: TensorInfo, groups: int, weight, bias,
                         ) -> TensorInfo:
    x_ids = project(ctx, x, 1, "group norm")
    if weight is None:
        ctx.block(x_ids, "GroupNorm without affine parameters cannot be resized")
    elif groups == 1:
        ctx.approx(x_ids, "GroupNorm with one group normalises over all channels")
        per_channel(ctx, x, [weight, bias])
    elif x_ids is not None:
        ctx.unify_along(x_ids.reshape(groups, -1), [1])  # whole groups only
        per_channel(ctx, x, [weight, bias])
    return passthrough(ctx, x)


def layer_norm(ctx: RuleContext, x: TensorInfo, n_axes: int, weight, bias,
               what: str = "LayerNorm") -> TensorInfo:
    """Normalises over the last ``n_axes`` axes: removing channels there changes the stats."""
    first = x.ndim - n_axes
    for m in x.maps:
        if any(d >= first for d in m.dims):
            if weight is None:
                ctx.block(m, f"{what} without affine parameters cannot be resized")
            else:
                ctx.approx(m, f"{what} normalises over channels")
    for p in (weight, bias):
        if p is None:
            continue
        for axis in range(p.ndim):
            p_ids = project(ctx, p, axis, what)
            x_ids = project(ctx, x, first + axis, what)
            if p_ids is not None:
                ctx.unify(filled(ctx, x_ids, x.shape[first + axis], _NO_INPUT), p_ids)
    return passthrough(ctx, x)


def _resize_layer_norm(module: nn.Module) -> None:
    if getattr(module, "weight", None) is not None:
        module.normalized_shape = tuple(module.weight.shape)


@R.rule(nn.LayerNorm, nn.RMSNorm, resize=_resize_layer_norm, shape=same_shape)
def _layer_norm(ctx: RuleContext, module: nn.Module, x: TensorInfo) -> TensorInfo:
    shape = module.normalized_shape
    return layer_norm(ctx, x, len(shape), ctx.module_param("weight"), ctx.module_param("bias"))


@R.rule(F.layer_norm, F.rms_norm)
def functional_layer_norm(ctx: RuleContext, input: TensorInfo, normalized_shape, weight=None, bias=None,
                   *rest, **kwargs) -> TensorInfo:
    out = layer_norm(ctx, input, len(normalized_shape), weight,
                     bias if isinstance(bias, TensorInfo) else None)
    owner = ctx.owner(weight)
    if isinstance(owner, nn.LayerNorm | nn.RMSNorm) and \
            tuple(owner.normalized_shape) == tuple(normalized_shape):
        return out  # the shape is the module's attribute, which the resizer updates
    first = input.ndim - len(normalized_shape)
    for m in input.maps:  # the size is a literal in forward(): it cannot shrink
        if any(d >= first for d in m.dims):
            ctx.block(m, "normalized_shape fixed in forward()")
    return out


@R.rule(F.group_norm)
def functional_group_norm(ctx: RuleContext, input: TensorInfo, num_groups: int, weight=None, bias=None,
                   eps: float = 1e-5) -> TensorInfo:
    owner = ctx.owner(weight)
    if isinstance(owner, nn.GroupNorm) and owner.num_groups == num_groups:
        return _group_norm_channels(ctx, input, num_groups, weight, bias)
    ctx.block(input.map_on(1) if input.ndim > 1 else None, "num_groups fixed in forward()")
    return passthrough(ctx, input)


@R.rule(nn.LocalResponseNorm, nn.CrossMapLRN2d)
def _lrn(ctx: RuleContext, module: nn.Module, x: TensorInfo) -> TensorInfo:
    for m in x.maps:
        if 1 in m.dims:
            ctx.approx(m, "LocalResponseNorm mixes neighbouring channels")
    return passthrough(ctx, x)


@R.rule(F.local_response_norm)
def _lrn_fn(ctx: RuleContext, input: TensorInfo, *args, **kwargs) -> TensorInfo:
    return _lrn(ctx, None, input)
