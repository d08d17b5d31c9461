"""Rules for layers of model zoos (torchvision, timm, ultralytics) whose traced form would
hide them.

A LayerNorm over channels written as permute -> F.layer_norm -> permute bakes the channel
count into the traced code; as a leaf with its own rule it stays resizable. A mixed conv
splits by sizes it keeps as an attribute; its resizer recomputes them, as ultralytics'
C2f's resizer recomputes the half width another of its forwards reads.
"""

from __future__ import annotations

from structprune.core.registry import DEFAULT_REGISTRY as R
from structprune.core.rules.base import project, same_shape
from structprune.core.rules.layers import conv_module, layer_norm
from structprune.core.rules.shape import permute
from structprune.types import RuleContext, TensorInfo


def layer_norm_2d(ctx: RuleContext, module, x: TensorInfo) -> TensorInfo:
    """LayerNorm over dim 1 of an NCHW tensor (affine parameters of shape [C])."""
    order = [0, *range(2, x.ndim), 1]
    channels_last = permute(ctx, x, order)
    layer_norm(ctx, channels_last, 1, ctx.module_param("weight"), ctx.module_param("bias"),
               "LayerNorm over channels")
    return ctx.result(x.maps)


try:
    from torchvision.models.convnext import LayerNorm2d as _TvLayerNorm2d
except ImportError:  # pragma: no cover - torchvision is a dependency
    _TvLayerNorm2d = None

if _TvLayerNorm2d is not None:
    R.rule(_TvLayerNorm2d)(layer_norm_2d)


def _stochastic_depth(ctx: RuleContext, input: TensorInfo, *args, **kwargs) -> TensorInfo:
    """Scales whole samples: channels pass through."""
    return ctx.result(input.maps)


try:
    from torchvision.ops import StochasticDepth as _TvStochasticDepth
    from torchvision.ops import stochastic_depth as _tv_stochastic_depth
except ImportError:  # pragma: no cover
    _tv_stochastic_depth = _TvStochasticDepth = None

if _tv_stochastic_depth is not None:
    R.op(_tv_stochastic_depth, rule=_stochastic_depth, shape=same_shape)
    R.op(_TvStochasticDepth, rule=lambda ctx, module, x: _stochastic_depth(ctx, x),
         shape=same_shape)


def _resize_mixed_conv(module) -> None:
    """timm's MixedConv2d splits its input by ``splits``: one part per child conv."""
    convs = list(module.values())
    module.splits = [conv.in_channels for conv in convs]
    module.in_channels = sum(module.splits)
    module.out_channels = sum(conv.out_channels for conv in convs)


def standardized_conv(ctx: RuleContext, module, x: TensorInfo) -> TensorInfo:
    """A weight-standardised conv (timm's StdConv2d, ScaledStdConv2d: NF-Nets): each
    filter is normalised over its own inputs inside ``forward``. Output channels (and the
    per-filter ``gain``) go exactly; removing an input channel changes the others' mean and
    variance, so input channels go approximately."""
    cdim = x.ndim - len(module.kernel_size) - 1
    x_ids = project(ctx, x, cdim, "conv input")
    out = conv_module(ctx, module, x)
    gain = ctx.module_param("gain")
    if isinstance(gain, TensorInfo) and out.map_on(cdim) is not None:
        ctx.unify(project(ctx, gain, 0, "conv gain"), out.map_on(cdim).ids)
    if x_ids is not None:
        ctx.approx(x_ids, "the conv's weight is standardised over its input channels")
    return out


def _register_timm(registry) -> None:
    from timm.layers import std_conv
    from timm.layers.mixed_conv2d import MixedConv2d

    registry.op(MixedConv2d, resize=_resize_mixed_conv, maintains=("splits",))
    for name in ("StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"):
        if hasattr(std_conv, name):
            registry.op(getattr(std_conv, name), rule=standardized_conv)


def _resize_c2f(module) -> None:
    """ultralytics' C2f family (C2f, C3k2, C2fAttn, ...) chunks ``cv1``'s output in halves,
    whose width its ``forward_split`` (what ultralytics' exporter runs) reads from ``c``."""
    module.c = module.cv1.conv.out_channels // 2


def _register_ultralytics(registry) -> None:
    from ultralytics.nn.modules.block import C2f

    registry.op(C2f, resize=_resize_c2f)


R.when_imported("ultralytics", _register_ultralytics)


# timm is optional, and importing it adds some 700 module classes, which slow every fx trace
# (tracing patches nn.Module, and Python updates each subclass): its rules wait until the
# user has imported it, as anyone holding a timm model has
R.when_imported("timm", _register_timm)
