import pytest
import torch
import torch.nn as nn
import torchvision

from structprune.capture import TensorSpec, capture
from structprune.errors import CaptureError

from .data.tiny_models import ShapeBranch


def test_meta_shapes_match_a_real_forward():
    model = torchvision.models.resnet18().eval()
    x = torch.randn(2, 3, 64, 64)
    cap = capture(model, (x,))
    seen = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o.shape))
    model(x)
    nodes = {n.target: n.name for n in cap.graph.nodes if n.op == "call_module"}
    for name, shape in seen.items():
        spec = cap.values[nodes[name]]
        assert isinstance(spec, TensorSpec) and spec.shape == tuple(shape)


def test_capture_does_not_touch_bn_statistics():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).train()
    before = model[1].running_mean.clone()
    capture(model, (torch.randn(2, 3, 8, 8),))
    assert torch.equal(model[1].running_mean, before)
    assert model[1].num_batches_tracked.item() == 0


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.sum() > 0:  # control flow on data: fx cannot trace it
            return self.conv(x)
        return x


def test_untraceable_model_names_the_line():
    with pytest.raises(CaptureError) as err:
        capture(DataDependent(), (torch.randn(1, 3, 8, 8),))
    assert "test_capture.py" in str(err.value) and "x.sum() > 0" in str(err.value)


def test_forward_failure_on_wrong_shape():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with pytest.raises(CaptureError, match="fails on the example inputs"):
        capture(model, (torch.randn(1, 3, 9, 9),))


def test_export_fallback_gives_the_same_plan_as_fx():
    import structprune as sp

    model = torchvision.models.resnet18(num_classes=10).eval()
    x = (torch.randn(1, 3, 32, 32),)
    via_fx = sp.prune(model, x, 0.5, capture_method="fx")
    via_export = sp.prune(model, x, 0.5, capture_method="export")
    assert via_fx.figures["capture"] == "fx" and via_export.figures["capture"] == "export"
    assert via_fx.plan.params == via_export.plan.params
    assert via_export.verification.ok


def test_auto_capture_falls_back_to_export():
    import structprune as sp

    with pytest.raises(CaptureError, match="cannot trace"):
        capture(ShapeBranch(), (torch.randn(1, 3, 8, 8),), method="fx")
    cap = capture(ShapeBranch(), (torch.randn(1, 3, 8, 8),))
    assert cap.method == "export"
    result = sp.prune(ShapeBranch(), (torch.randn(1, 3, 8, 8),), 0.5)
    assert result.verification.ok and result.model.a.out_channels == 4


class Arithmetic(nn.Module):
    def forward(self, x):
        counts = (x > 0).long()
        return counts * 0.5, counts + counts, x * 2, x.add(x[:, :1]), torch.relu(x).half()


def test_shape_shortcuts_keep_dtypes_and_broadcasting_right():
    x = torch.randn(2, 3, 4, 4)
    cap = capture(Arithmetic(), (x,))
    output = next(n for n in cap.graph.nodes if n.op == "output")
    specs = [cap.values[node.name] for node in output.args[0]]
    real = Arithmetic()(x)
    assert [(s.shape, s.dtype) for s in specs] == [(tuple(t.shape), t.dtype) for t in real]
