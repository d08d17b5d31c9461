"""Figures for reports: parameters and multiply-accumulates counted on a captured graph.

How many multiply-accumulates an op does is registered beside its channel rule
(``RuleRegistry.macs``); ops without a counter count zero.
"""

from __future__ import annotations

from typing import Any

import torch.nn as nn

from .capture import Capture, TensorSpec


def count_macs(capture: Capture, registry: Any = None) -> int:
    """Multiply-accumulates of convolutions and matrix products, for the example inputs."""
    from .rules import DEFAULT_REGISTRY

    registry = registry or DEFAULT_REGISTRY
    modules = dict(capture.graph_module.named_modules())
    total = 0
    for node in capture.graph.nodes:
        if not isinstance(capture.values.get(node.name), TensorSpec):
            continue
        module = modules[node.target] if node.op == "call_module" else None
        counter = registry.counter_for(node, module)
        if counter is not None:
            total += counter(capture, node, module)
    return int(total)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
