"""Figures for reports: parameters and multiply-accumulates counted on a captured graph.

How many multiply-accumulates an op does is registered beside its channel rule
(``RuleRegistry.op(..., macs=...)``); ops without a counter count zero.
"""

from __future__ import annotations

import torch.nn as nn

from .capture import Capture
from .registry import RuleRegistry
from .rules import DEFAULT_REGISTRY
from .types import TensorSpec


def count_macs(capture: Capture, registry: RuleRegistry | None = None) -> int:
    """Multiply-accumulates of convolutions and matrix products, for the example inputs."""
    registry = registry or DEFAULT_REGISTRY
    total = 0
    for node in capture.graph.nodes:
        if not isinstance(capture.values.get(node.name), TensorSpec):
            continue
        module = capture.graph_module.get_submodule(node.target) \
            if node.op == "call_module" else None
        counter = registry.macs_for(node, module)
        if counter is not None:
            total += counter(capture, node, module)
    return int(total)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
