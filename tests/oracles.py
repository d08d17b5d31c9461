"""Shared oracles for the tests: realistic random weights, independent masked models."""

from __future__ import annotations

import copy

import torch
import torch.nn as nn

import structprune as sp
from structprune.core.verify import compare, evaluation, flatten_outputs


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics, affine parameters and biases (random init has identity BN)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._NormBase) and m.track_running_stats \
                    and m.running_mean is not None:
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 0.2)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) + 0.5)
            for name, p in m.named_parameters(recurse=False):
                vector_like = p.numel() == max(p.shape, default=1)  # biases, BN/LN, layer scales
                if name == "bias" or vector_like:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2 + (name != "bias"))
    return model


def weight_masked(model: nn.Module, plan: sp.Plan) -> nn.Module:
    """Independent oracle from the plan alone: zero removed input columns of every
    ungrouped Conv/Linear weight (the consumers), in a copy of the dense model."""
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for entry in plan.params:
            owner, _, attr = entry["name"].rpartition(".")
            m = modules.get(owner)
            if attr != "weight" or entry["dim"] != 1:
                continue
            if isinstance(m, nn.Linear) or (isinstance(m, nn.modules.conv._ConvNd)
                                            and not m.transposed and m.groups == 1):
                drop = torch.ones(entry["size"], dtype=torch.bool)
                drop[entry["keep"]] = False
                m.weight[:, drop] = 0
    return masked


def outputs(model: nn.Module, inputs) -> object:
    with torch.no_grad(), evaluation(model):
        return model(*inputs)


def check_pruned(model: nn.Module, inputs, ratio=0.5, weight_oracle=True, **settings):
    """Prune and check against both oracles; returns the result."""
    result = sp.prune(model, inputs, ratio, **settings)
    assert result.verification.ok, result.verification
    fresh = tuple(torch.randn_like(x) for x in inputs)
    dense_out, pruned_out = outputs(model, fresh), outputs(result.model, fresh)
    for d, p in zip(flatten_outputs(dense_out), flatten_outputs(pruned_out),
                    strict=True):
        assert d.shape == p.shape
    if weight_oracle and result.verification.exact_units_only:
        oracle = outputs(weight_masked(model, result.plan), fresh)
        cmp = compare(oracle, pruned_out)
        assert cmp.ok, f"pruned differs from weight-masked dense model: {cmp}"
    return result




def export_and_check(model: nn.Module, inputs, path) -> float:
    """Export with the faster TorchScript exporter, or dynamo where TorchScript cannot
    (e.g. adaptive pooling to a size that does not divide the input); returns the parity."""
    from structprune.deploy.export import ExportError, export_onnx, onnx_parity

    try:
        export_onnx(model, inputs, path, exporter="torchscript")
    except ExportError:
        export_onnx(model, inputs, path, exporter="dynamo")
    return onnx_parity(path, model, inputs)


def digits_factory(directory, train_batches: int, val_batches: int, batch_size: int = 32,
                   labels: bool = True) -> str:
    """A ``--data file.py:make`` spec for a small, fast slice of scikit-learn's digits: the
    first ``train_batches`` training and ``val_batches`` validation batches (their images
    alone without ``labels``)."""
    from pathlib import Path

    path = Path(directory) / ("small_digits.py" if labels else "small_digits_unlabeled.py")
    keep = "batch" if labels else "batch[0]"
    path.write_text(
        "import itertools\n"
        "from structprune.accuracy.data import digits\n\n\n"
        "def make():\n"
        f"    splits = digits(batch_size={batch_size})\n"
        f"    return ([{keep} for batch in itertools.islice(splits.train, {train_batches})],\n"
        f"            [{keep} for batch in itertools.islice(splits.val, {val_batches})])\n")
    return f"{path}:make"
