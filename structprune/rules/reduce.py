"""Reductions, softmax, pooling and resampling."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..analyse import ChannelMap, RuleContext, TensorInfo
from .base import channel_passthrough, elementwise, passthrough
from .registry import DEFAULT_REGISTRY as R


def reduce(ctx: RuleContext, x: TensorInfo, dim: Any, keepdim: bool, exact: bool,
           what: str) -> Any:
    """Maps on reduced dims are consumed (``exact``: a sum) or approximate; others pass."""
    if dim is None or dim == ():
        dims = set(range(x.ndim))
    else:
        dims = {d % x.ndim for d in ([dim] if isinstance(dim, int) else dim)}
    maps = []
    for m in x.maps:
        if set(m.dims) & dims:
            if exact:
                ctx.consume(0, x, m)
            else:
                ctx.approx(m, f"{what} over channels")
            continue
        if keepdim:
            maps.append(m)
        else:
            maps.append(ChannelMap(tuple(d - sum(1 for r in dims if r < d) for d in m.dims), m.ids))
    out = ctx.output
    if isinstance(out, tuple):  # (values, indices)
        return tuple(ctx.result(maps, spec) for spec in out)
    return ctx.result(maps)


def _reducer(exact: bool, what: str):
    def rule(ctx: RuleContext, input: TensorInfo, dim: Any = None, keepdim: bool = False,
             *args: Any, **kwargs: Any) -> Any:
        if isinstance(dim, TensorInfo) or isinstance(kwargs.get("other"), TensorInfo):
            return elementwise(ctx, input, dim, kwargs.get("other"))  # torch.max(a, b)
        if isinstance(dim, torch.dtype):
            dim = None
        return reduce(ctx, input, dim, keepdim, exact, what)
    return rule


R.function(torch.sum, torch.nansum)(_reducer(True, "sum"))
R.method("sum", "nansum")(_reducer(True, "sum"))
R.function(torch.mean, torch.nanmean)(_reducer(False, "mean"))
R.method("mean", "nanmean")(_reducer(False, "mean"))
R.function(torch.amax, torch.amin, torch.max, torch.min, torch.argmax, torch.argmin,
           torch.logsumexp, torch.prod, torch.median, torch.all, torch.any)(
    _reducer(False, "max/min/prod"))
R.method("amax", "amin", "max", "min", "argmax", "argmin", "logsumexp", "prod", "median",
         "all", "any")(_reducer(False, "max/min/prod"))


@R.function(torch.std, torch.var)
@R.method("std", "var")
def _moments(ctx: RuleContext, input: TensorInfo, dim: Any = None, *args: Any, keepdim=False,
             **kwargs: Any) -> Any:
    return reduce(ctx, input, dim, keepdim, False, "variance")


@R.function(torch.norm, torch.linalg.vector_norm)
@R.method("norm")
def _norm(ctx: RuleContext, input: TensorInfo, p: Any = 2, dim: Any = None, keepdim=False,
          *args: Any, **kwargs: Any) -> Any:
    if ctx.node.target is torch.linalg.vector_norm:
        dim, keepdim = kwargs.get("dim", p if not isinstance(p, (int, float)) else dim), keepdim
    return reduce(ctx, input, dim, keepdim, False, "norm")


def softmax(ctx: RuleContext, x: TensorInfo, dim: int, what: str) -> TensorInfo:
    dim = dim % x.ndim
    for m in x.maps:
        if dim in m.dims:
            ctx.approx(m, f"{what} over channels")
    return passthrough(ctx, x)


@R.function(F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax)
@R.method("softmax", "log_softmax")
def _softmax(ctx: RuleContext, input: TensorInfo, dim: int | None = None, *args, **kwargs):
    return softmax(ctx, input, -1 if dim is None else dim, "softmax")


@R.module(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def _softmax_module(ctx: RuleContext, module: nn.Module, x: TensorInfo) -> TensorInfo:
    return softmax(ctx, x, -1 if module.dim is None else module.dim, "softmax")


@R.module(nn.Softmax2d)
def _softmax2d(ctx: RuleContext, module: nn.Module, x: TensorInfo) -> TensorInfo:
    return softmax(ctx, x, -3, "softmax")


@R.function(F.normalize)
def _normalize(ctx: RuleContext, input: TensorInfo, p: float = 2.0, dim: int = 1, *args, **kwargs):
    return softmax(ctx, input, dim, "normalize")


@R.function(torch.cumsum, torch.cumprod)
@R.method("cumsum", "cumprod")
def _cumulative(ctx: RuleContext, input: TensorInfo, dim: int, *args, **kwargs) -> TensorInfo:
    dim = dim % input.ndim
    ctx.block(input.map_on(dim), "cumulative op over a channel axis")
    return passthrough(ctx, input, [d for d in range(input.ndim) if d != dim])


_POOL_FUNCTIONS = [
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.lp_pool1d, F.lp_pool2d, F.interpolate,
    F.upsample, F.upsample_nearest, F.upsample_bilinear, F.grid_sample,
    torch.max_pool1d, torch.max_pool2d, torch.avg_pool1d, torch.adaptive_avg_pool1d,
    F.fractional_max_pool2d,
]
_POOL_MODULES = [
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.LPPool1d, nn.LPPool2d, nn.Upsample,
    nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d, nn.FractionalMaxPool2d,
]


@R.function(*_POOL_FUNCTIONS)
def _pool_fn(ctx: RuleContext, input: TensorInfo, *args: Any, **kwargs: Any) -> Any:
    out = ctx.output
    if isinstance(out, tuple):  # return_indices=True
        first = channel_passthrough(ctx, input)
        return tuple(ctx.result(first.maps, spec) for spec in out)
    return channel_passthrough(ctx, input)


@R.module(*_POOL_MODULES)
def _pool_module(ctx: RuleContext, module: nn.Module, x: TensorInfo) -> Any:
    return _pool_fn(ctx, x)


_POOL_DIMS = {nn.MaxPool1d: 1, nn.MaxPool2d: 2, nn.MaxPool3d: 3,
              nn.AvgPool1d: 1, nn.AvgPool2d: 2, nn.AvgPool3d: 3}
_ADAPTIVE_DIMS = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
                  nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3}


def _per_dim(value: Any, n: int) -> tuple:
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _pool_input(module: nn.Module, args: tuple, kwargs: dict, n: int) -> torch.Tensor | None:
    if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor) \
            or getattr(module, "return_indices", False):
        return None
    x = args[0]
    return x if x.ndim in (n + 1, n + 2) and x.is_floating_point() else None


@R.output_shape(*_POOL_DIMS)
def _pool_shape(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    """Max and average pooling, as ATen's ``pooling_output_shape`` computes it."""
    n = _POOL_DIMS[type(module)]
    x = _pool_input(module, args, kwargs, n)
    if x is None:
        return None
    kernel = _per_dim(module.kernel_size, n)
    stride = _per_dim(module.stride or module.kernel_size, n)
    padding = _per_dim(module.padding, n)
    dilation = _per_dim(getattr(module, "dilation", 1), n)
    spatial = []
    for size, k, s, p, d in zip(x.shape[-n:], kernel, stride, padding, dilation, strict=True):
        if 2 * p > k or size < d * (k - 1) + 1:
            return None  # the op may raise its own error: let it
        extra = s - 1 if module.ceil_mode else 0
        out = (size + 2 * p - d * (k - 1) - 1 + extra) // s + 1
        if module.ceil_mode and (out - 1) * s >= size + p:
            out -= 1
        if out < 1:
            return None
        spatial.append(out)
    return (*x.shape[:-n], *spatial)


def _adaptive_output(x: Any, output_size: Any, n: int) -> tuple[int, ...] | None:
    """``x``'s shape with its last ``n`` axes set to ``output_size`` (None keeps one)."""
    if not isinstance(x, torch.Tensor) or x.ndim not in (n + 1, n + 2) \
            or not x.is_floating_point() or min(x.shape[-n:]) < 1:
        return None
    sizes = _per_dim(output_size, n)
    if not all((o is None and n > 1) or (isinstance(o, int) and o >= 1) for o in sizes):
        return None
    return (*x.shape[:-n], *(s if o is None else o
                             for s, o in zip(x.shape[-n:], sizes, strict=True)))


@R.output_shape(*_ADAPTIVE_DIMS)
def _adaptive_pool_shape(module: nn.Module, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
    if len(args) != 1 or kwargs or getattr(module, "return_indices", False):
        return None
    return _adaptive_output(args[0], module.output_size, _ADAPTIVE_DIMS[type(module)])


def _adaptive_fn_shape(n: int):
    """Output shape of ``F.adaptive_avg_pool{n}d(x, output_size)``."""
    def shape(module: None, args: tuple, kwargs: dict) -> tuple[int, ...] | None:
        return _adaptive_output(*args, n) if len(args) == 2 and not kwargs else None
    return shape


for _n, _fn in enumerate((F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d), 1):
    R.output_shape(_fn)(_adaptive_fn_shape(_n))
