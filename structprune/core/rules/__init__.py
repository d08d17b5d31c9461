"""The built-in op declarations (importing this package makes them) and the helpers rules
are built from. Declare your own op::

    from structprune.core.rules import register_rule, passthrough

    @register_rule(MyActivation)
    def my_activation(ctx, module, x):
        return passthrough(ctx, x)

or all it needs at once: ``register_op(MyConv, rule=..., macs=..., resize=...)``.
"""

from __future__ import annotations

from structprune.core.registry import DEFAULT_REGISTRY, RuleRegistry
from structprune.core.rules import (  # noqa: F401 - the declarations
    aten,
    elementwise,
    layers,
    onnx2torch,
    reduce,
    shape,
    zoo,
)
from structprune.core.rules.base import (
    block_except,
    broadcast_shape,
    channel_passthrough,
    filled,
    merge_elementwise,
    passthrough,
    project,
    same_shape,
    unknown,
)
from structprune.core.rules.base import (
    elementwise as elementwise_rule,
)
from structprune.core.rules.layers import convolution, layer_norm, linear, per_channel
from structprune.core.rules.shape import channel_shuffle, glu, pixel_shuffle, reshape, split_equal

DEFAULT_REGISTRY.unknown_rule = unknown

register_op = DEFAULT_REGISTRY.op
register_rule = DEFAULT_REGISTRY.rule

__all__ = [
    "DEFAULT_REGISTRY", "RuleRegistry", "block_except", "broadcast_shape", "channel_passthrough",
    "channel_shuffle",
    "convolution", "elementwise_rule", "filled", "glu", "layer_norm", "linear",
    "merge_elementwise", "passthrough", "per_channel", "pixel_shuffle", "project",
    "register_op", "register_rule", "reshape", "same_shape", "split_equal",
]
