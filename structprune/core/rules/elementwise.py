"""Elementwise ops: channels pass through unchanged and are unified across operands.

The fx spellings of each op are declared here once; :data:`FAMILIES` hands the same lists to
:mod:`structprune.core.rules.aten`, which derives their torch.export (ATen) twins from them, so
the two capture paths know the same ops.
"""

from __future__ import annotations

import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from structprune.core.registry import DEFAULT_REGISTRY as R
from structprune.core.registry import Rule
from structprune.core.rules.base import (
    broadcast_shape,
    elementwise,
    merge_elementwise,
    metadata,
    passthrough,
    project,
    same_shape,
)
from structprune.types import RuleContext, TensorInfo

_UNARY_FUNCTIONS = [
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.abs,
    torch.neg, torch.sqrt, torch.rsqrt, torch.square, torch.sign, torch.clamp, torch.clip,
    torch.erf, torch.sin, torch.cos, torch.reciprocal, torch.floor, torch.ceil, torch.round,
    torch.nan_to_num, torch.detach, torch.clone, torch.zeros_like, torch.ones_like,
    torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like, torch.logit,
    F.relu, F.relu6, F.elu, F.selu, F.celu, F.gelu, F.silu, F.mish, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.leaky_relu, F.softplus, F.softsign, F.tanhshrink, F.logsigmoid, F.sigmoid,
    F.tanh, F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
    F.feature_alpha_dropout, F.threshold, F.rrelu, F.hardshrink, F.softshrink,
    operator.neg, operator.pos, operator.invert, operator.abs,
]
_UNARY_METHODS = [
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "abs", "neg", "sqrt",
    "rsqrt", "square", "sign", "clamp", "clamp_", "clip", "clamp_min", "clamp_max", "erf",
    "reciprocal", "floor", "ceil", "round", "detach", "clone", "contiguous", "float", "half",
    "double", "bfloat16", "cpu", "cuda", "requires_grad_", "exp_", "nan_to_num", "sin", "cos",
    "pow_", "zero_", "fill_", "bool", "int", "long", "abs_", "neg_", "clamp_min_",
]
_UNARY_MODULES = [
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Softsign, nn.Identity,
    nn.Hardtanh, nn.Threshold, nn.Tanhshrink, nn.LogSigmoid, nn.Hardshrink, nn.Softshrink,
    nn.RReLU, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.FeatureAlphaDropout,
]
_BINARY_FUNCTIONS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
    operator.mod, operator.iadd, operator.isub, operator.imul, operator.itruediv,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    operator.and_, operator.or_, operator.xor,
    torch.add, torch.sub, torch.subtract, torch.mul, torch.multiply, torch.div, torch.divide,
    torch.true_divide, torch.pow, torch.maximum, torch.minimum, torch.fmax, torch.fmin,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge, torch.where, torch.lerp,
    torch.addcmul, torch.addcdiv, torch.masked_fill, torch.atan2, torch.remainder,
    torch.logical_and, torch.logical_or, torch.hypot,
]
_BINARY_METHODS = [
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "maximum", "minimum",
    "eq", "ne", "lt", "le", "gt", "ge", "masked_fill", "masked_fill_", "where", "lerp",
    "addcmul", "addcmul_", "addcdiv", "copy_", "__add__", "__mul__", "__radd__",
    "__rmul__", "__sub__", "__truediv__", "fmod", "remainder",
]

# outputs capture computes from the inputs instead of running the op on meta tensors
_KEEP_SHAPE = {
    torch.relu, torch.sigmoid, torch.tanh, F.relu, F.relu6, F.silu, F.gelu, F.hardswish,
    F.hardsigmoid, F.sigmoid, F.tanh, F.leaky_relu, F.elu, F.mish, F.dropout, F.hardtanh,
    F.softplus, "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone",
    "detach", "mul_", "add_", "clamp", "clamp_",
}
_BROADCAST = {
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.imul,
    operator.isub, torch.add, torch.mul, torch.sub, "add", "mul", "sub", "div",
}
ELEMENTWISE = list(dict.fromkeys([*_UNARY_FUNCTIONS, *_BINARY_FUNCTIONS, *_UNARY_METHODS,
                                  *_BINARY_METHODS]))
CONVERSIONS = ["to", "type_as", "type"]
PRELU = [F.prelu, torch.prelu]
METADATA = ["size", "dim", "numel", "ndimension", "nelement", "get_device", "is_contiguous",
            "element_size", "is_floating_point", getattr, len, torch.numel, torch.is_tensor,
            torch.is_floating_point]

for _target in ELEMENTWISE:
    R.op(_target, rule=elementwise, shape=same_shape if _target in _KEEP_SHAPE else
         broadcast_shape if _target in _BROADCAST else None)


@R.rule("expand_as")
def _expand_as(ctx: RuleContext, x: TensorInfo, other: TensorInfo) -> TensorInfo:
    return ctx.result(merge_elementwise(ctx, [x, other], ctx.out_shape))


@R.rule(*CONVERSIONS)
def _convert(ctx: RuleContext, x: TensorInfo, *args, **kwargs) -> TensorInfo:
    """Dtype/device conversion: another tensor argument only lends its dtype."""
    return passthrough(ctx, x)


@R.rule(*_UNARY_MODULES, shape=same_shape)
def _unary_module(ctx: RuleContext, module: nn.Module, x: TensorInfo, *rest) -> TensorInfo:
    return passthrough(ctx, x)


def _resize_prelu(module: nn.PReLU) -> None:
    module.num_parameters = module.weight.numel()


@R.rule(nn.PReLU, resize=_resize_prelu, shape=same_shape)
def _prelu(ctx: RuleContext, module: nn.PReLU, x: TensorInfo) -> TensorInfo:
    weight = ctx.module_param("weight")
    return _prelu_channels(ctx, x, weight)


@R.rule(*PRELU)
def _prelu_fn(ctx: RuleContext, x: TensorInfo, weight: TensorInfo) -> TensorInfo:
    return _prelu_channels(ctx, x, weight)


def _prelu_channels(ctx: RuleContext, x: TensorInfo, weight: TensorInfo | None) -> TensorInfo:
    if weight is not None and weight.shape and weight.shape[0] > 1:
        w = project(ctx, weight, 0, "prelu")
        xc = project(ctx, x, 1 if x.ndim > 1 else 0, "prelu")
        if xc is None:
            ctx.block(w, "PReLU on channels that cannot be pruned")
        else:
            ctx.unify(xc, w)
    return passthrough(ctx, x)


R.rule(*METADATA)(metadata)

# (rule, fx spellings) of every function and method declared above, for rules/aten.py
FAMILIES: list[tuple[Rule, list]] = [
    (elementwise, ELEMENTWISE), (_convert, CONVERSIONS), (_expand_as, ["expand_as"]),
    (_prelu_fn, PRELU), (metadata, METADATA),
]
