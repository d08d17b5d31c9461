"""Figures for reports: parameters and multiply-accumulates counted on a captured graph.

How many multiply-accumulates an op does is registered beside its channel rule
(``RuleRegistry.op(..., macs=...)``); ops without a counter count zero.
"""

from __future__ import annotations

import torch.nn as nn

from structprune.core.capture import Capture
from structprune.core.cost import count_node_macs
from structprune.core.registry import RuleRegistry


def node_macs(capture: Capture, registry: RuleRegistry | None = None) -> dict[str, int]:
    """Multiply-accumulates per node name, for the example inputs: the nodes with a counter
    and a nonzero count, in graph order."""
    return count_node_macs(capture, registry)


def count_macs(capture: Capture, registry: RuleRegistry | None = None) -> int:
    """Multiply-accumulates of convolutions and matrix products, for the example inputs."""
    return int(sum(node_macs(capture, registry).values()))


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
