"""Per-op channel rules. Importing this package registers the built-in rules.

Extend it for your own module::

    from structprune.rules import register_module, passthrough

    @register_module(MyActivation)
    def my_activation(ctx, module, x):
        return passthrough(ctx, x)
"""

from __future__ import annotations

from . import aten, elementwise, layers, reduce, shape, zoo  # noqa: F401 - registers the rules
from .base import (
    block_except,
    channel_passthrough,
    filled,
    merge_elementwise,
    passthrough,
    project,
    unknown,
)
from .base import (
    elementwise as elementwise_rule,
)
from .layers import convolution, layer_norm, linear, per_channel
from .registry import DEFAULT_REGISTRY, RuleRegistry
from .shape import channel_shuffle, glu, pixel_shuffle, reshape, split_equal

DEFAULT_REGISTRY.unknown_rule = unknown

register_function = DEFAULT_REGISTRY.function
register_method = DEFAULT_REGISTRY.method
register_module = DEFAULT_REGISTRY.module
register_resizer = DEFAULT_REGISTRY.resizer
register_output_shape = DEFAULT_REGISTRY.output_shape

__all__ = [
    "DEFAULT_REGISTRY", "RuleRegistry", "block_except", "channel_passthrough", "channel_shuffle",
    "convolution", "elementwise_rule", "filled", "glu", "layer_norm", "linear",
    "merge_elementwise", "passthrough", "per_channel", "pixel_shuffle", "project",
    "register_function", "register_method", "register_module", "register_output_shape",
    "register_resizer", "reshape",
    "split_equal",
]
