"""ONNX export: checker-clean files with a dynamic batch, matching torch in ONNX Runtime."""

import onnx
import pytest
import torch
import torch.nn as nn
import torchvision

import structprune as sp
from structprune.deploy.export import ExportError, export_onnx, onnx_parity, run_onnx

from .oracles import randomize


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_pruned_resnet_exports_with_dynamic_batch(exporter, tmp_path):
    model = randomize(torchvision.models.resnet18(num_classes=10))
    x = (torch.randn(1, 3, 32, 32),)
    pruned = sp.prune(model, x, 0.5).model
    path = tmp_path / "m.onnx"
    assert export_onnx(pruned, x, path, exporter=exporter) == exporter
    onnx.checker.check_model(str(path))
    for batch in (1, 5):
        err = onnx_parity(path, pruned, x, batch=batch)
        assert err < 1e-4
    proto = onnx.load(str(path))
    dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert dim.dim_param and not dim.dim_value


def test_simplified_export_folds_and_still_matches(tmp_path):
    model = randomize(torchvision.models.mobilenet_v3_small(num_classes=10))
    x = (torch.randn(1, 3, 32, 32),)
    plain, simple = tmp_path / "plain.onnx", tmp_path / "simple.onnx"
    export_onnx(model, x, plain, exporter="dynamo")
    export_onnx(model, x, simple, exporter="dynamo", simplify=True)
    assert len(onnx.load(str(simple)).graph.node) <= len(onnx.load(str(plain)).graph.node)
    assert onnx_parity(simple, model, x) < 1e-4


def test_parity_failure_is_an_error(tmp_path):
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU())
    x = (torch.randn(1, 3, 8, 8),)
    path = tmp_path / "m.onnx"
    export_onnx(model, x, path, exporter="torchscript")
    with torch.no_grad():
        model[0].bias += 1.0  # torch changes after export: ONNX no longer matches
    with pytest.raises(ExportError, match="differs from torch"):
        onnx_parity(path, model, x)
    assert run_onnx(path, x)[0].shape == (1, 4, 6, 6)
