"""Figures for reports: parameters and multiply-accumulates counted on a captured graph."""

from __future__ import annotations

import math
import operator

import torch
import torch.nn as nn
import torch.nn.functional as F

from .capture import Capture, TensorSpec

_CONV_FUNCTIONS = {F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d,
                   F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d}
_MATMULS = {torch.matmul, operator.matmul, torch.mm, torch.bmm, F.linear}
_aten = torch.ops.aten
_CONV_FUNCTIONS |= {_aten.conv1d.default, _aten.conv2d.default, _aten.conv3d.default,
                    _aten.convolution.default}
_MATMULS |= {_aten.linear.default, _aten.mm.default, _aten.bmm.default, _aten.matmul.default,
             _aten.addmm.default}


def _spec(capture: Capture, arg) -> TensorSpec | None:
    if hasattr(arg, "name"):
        value = capture.values.get(arg.name)
        return value if isinstance(value, TensorSpec) else None
    return None


def count_macs(capture: Capture) -> int:
    """Multiply-accumulates of convolutions and matrix products, for the example inputs."""
    modules = dict(capture.graph_module.named_modules())
    total = 0
    for node in capture.graph.nodes:
        out = capture.values.get(node.name)
        if not isinstance(out, TensorSpec):
            continue
        n_out = math.prod(out.shape)
        if node.op == "call_module":
            m = modules[node.target]
            if isinstance(m, nn.modules.conv._ConvNd):
                w = m.weight
                if m.transposed:
                    x = _spec(capture, node.args[0])
                    total += math.prod(x.shape) * math.prod(w.shape[1:]) if x else 0
                else:
                    total += n_out * math.prod(w.shape[1:])
            elif isinstance(m, nn.Linear):
                total += n_out * m.in_features
        elif node.op == "call_function":
            if node.target in _CONV_FUNCTIONS:
                w = _spec(capture, node.args[1] if len(node.args) > 1 else node.kwargs.get("weight"))
                if w is not None:
                    total += n_out * math.prod(w.shape[1:])
            elif node.target in _MATMULS:
                position = 1 if node.target is _aten.addmm.default else 0
                first = node.args[position] if len(node.args) > position else \
                    node.kwargs.get("input")
                a = _spec(capture, first)
                if a is not None:
                    total += n_out * a.shape[-1]
        elif node.op == "call_method" and node.target in ("matmul", "mm", "bmm"):
            a = _spec(capture, node.args[0])
            if a is not None:
                total += n_out * a.shape[-1]
    return int(total)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
