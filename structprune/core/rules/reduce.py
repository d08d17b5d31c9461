"""Reductions, softmax, pooling and resampling."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from structprune.core.registry import DEFAULT_REGISTRY as R
from structprune.core.rules.base import (
    channel_passthrough,
    elementwise,
    only_tensor_input,
    passthrough,
)
from structprune.types import ChannelMap, RuleContext, TensorInfo


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


R.rule(torch.sum, torch.nansum)(_reducer(True, "sum"))
R.rule("sum", "nansum")(_reducer(True, "sum"))
R.rule(torch.mean, torch.nanmean)(_reducer(False, "mean"))
R.rule("mean", "nanmean")(_reducer(False, "mean"))
R.rule(torch.amax, torch.amin, torch.max, torch.min, torch.argmax, torch.argmin,
           torch.logsumexp, torch.prod, torch.median, torch.all, torch.any)(
    _reducer(False, "max/min/prod"))
R.rule("amax", "amin", "max", "min", "argmax", "argmin", "logsumexp", "prod", "median",
         "all", "any")(_reducer(False, "max/min/prod"))


@R.rule(torch.std, torch.var)
@R.rule("std", "var")
def _moments(ctx: RuleContext, input: TensorInfo, dim: Any = None, *args: Any, keepdim=False,
             **kwargs: Any) -> Any:
    return reduce(ctx, input, dim, keepdim, False, "variance")


@R.rule(torch.norm, torch.linalg.vector_norm)
@R.rule("norm")
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


@R.rule(F.softmax, F.log_softmax, F.softmin, torch.softmax, torch.log_softmax)
@R.rule("softmax", "log_softmax")
def _softmax(ctx: RuleContext, input: TensorInfo, dim: int | None = None, *args, **kwargs):
    return softmax(ctx, input, -1 if dim is None else dim, "softmax")


@R.rule(nn.Softmax, nn.LogSoftmax, nn.Softmin)
def _softmax_module(ctx: RuleContext, module: nn.Module, x: TensorInfo) -> TensorInfo:
    return softmax(ctx, x, -1 if module.dim is None else module.dim, "softmax")


@R.rule(nn.Softmax2d)
def _softmax2d(ctx: RuleContext, module: nn.Module, x: TensorInfo) -> TensorInfo:
    return softmax(ctx, x, -3, "softmax")


@R.rule(F.normalize)
def _normalize(ctx: RuleContext, input: TensorInfo, p: float = 2.0, dim: int = 1, *args, **kwargs):
    return softmax(ctx, input, dim, "normalize")


@R.rule(torch.cumsum, torch.cumprod)
@R.rule("cumsum", "cumprod")
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
    nn.LPPool1d, nn.LPPool2d, nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d,
    nn.FractionalMaxPool2d,
]
_ADAPTIVE_POOLS = {  # module type -> spatial dims
    nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool1d: 1, nn.AdaptiveMaxPool2d: 2, nn.AdaptiveMaxPool3d: 3,
}


@R.rule(*_POOL_FUNCTIONS)
def pool(ctx: RuleContext, input: TensorInfo, *args: Any, **kwargs: Any) -> Any:
    out = ctx.output
    if isinstance(out, tuple):  # return_indices=True
        first = channel_passthrough(ctx, input)
        return tuple(ctx.result(first.maps, spec) for spec in out)
    return channel_passthrough(ctx, input)


@R.rule(*_POOL_MODULES)
def _pool_module(ctx: RuleContext, module: nn.Module, x: TensorInfo) -> Any:
    return pool(ctx, x)


def adaptive_pool_shape(module: nn.Module, args: tuple, kwargs: dict,
                        ) -> tuple[tuple[int, ...], Any] | None:
    """An adaptive pool module's output: the input with its spatial axes set to
    ``output_size`` (None keeps an axis); None with indices or an unexpected input. Declared
    because the meta kernel of adaptive average pooling costs about 1 ms a call: EfficientNet-B0
    pools in each of its 16 squeeze-excitation blocks."""
    x = only_tensor_input(args, kwargs)
    n = _ADAPTIVE_POOLS[type(module)]
    if x is None or x.ndim not in (n + 1, n + 2) \
            or not x.is_floating_point() or 0 in x.shape[-n:] \
            or getattr(module, "return_indices", False):
        return None
    size = module.output_size
    sizes = (size,) * n if isinstance(size, int) else tuple(size) if size is not None else ()
    if len(sizes) != n or (n == 1 and None in sizes) or not all(
            s is None or (isinstance(s, int) and s > 0) for s in sizes):
        return None
    spatial = tuple(x.shape[-n + i] if s is None else s for i, s in enumerate(sizes))
    return (*x.shape[:-n], *spatial), x.dtype


R.op(*_ADAPTIVE_POOLS, rule=_pool_module, shape=adaptive_pool_shape)
