"""The torch.export capture path, as exact as the fx one: one small model per bug of issue #16.

Each model reproduces what a real model did (ultralytics' anchors, a view sized by an int
attribute, a channel count turned into a tensor, in-place dropout, a dict output, an exporter
that fixes the batch, an error of thousands of characters, NF-Nets' weight-standardised convs).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.core.analyse import RULE_FAILED
from structprune.core.capture import capture
from structprune.core.registry import RuleRegistry
from structprune.core.rules import DEFAULT_REGISTRY
from structprune.core.verify import flatten_outputs
from structprune.deploy.export import ExportError, export_onnx, onnx_parity, run_onnx
from structprune.errors import CaptureError, VerificationError
from structprune.front.cli import main

from .data.tiny_models import LongError
from .fixtures import DATA
from .oracles import outputs, randomize, weight_masked

X = (torch.randn(1, 3, 8, 8),)


def reasons(result: sp.PruneResult) -> list[str]:
    return [r for g in result.analysis.groups for r in g.reasons]


def group_of(result: sp.PruneResult, param: str) -> dict:
    return next(g for g in result.plan.groups if f"{param}:0" in g["members"])


def check_against_oracle(model: nn.Module, result: sp.PruneResult) -> None:
    """The pruned model equals the dense one with removed consumer columns zeroed."""
    fresh = (torch.randn(1, 3, 8, 8),)
    want, got = outputs(weight_masked(model, result.plan), fresh), outputs(result.model, fresh)
    for w, g in zip(flatten_outputs(want), flatten_outputs(got), strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


class TypeAs(nn.Module):
    """``grid.type_as(y)``: a 1-d tensor takes the dtype of a 4-d one (ultralytics'
    ``make_anchors``); control flow on a shape sends it to torch.export."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        grid = torch.arange(y.shape[-1]).type_as(y)
        return self.head(y + grid)


def test_type_as_lends_only_its_dtype():
    model = randomize(TypeAs().eval())
    result = sp.prune(model, X, 0.5, capture_method="export")
    assert result.figures["capture"] == "export"
    assert not [r for r in reasons(result) if RULE_FAILED in r]
    assert group_of(result, "conv.weight")["kept"] == 4
    check_against_oracle(model, result)


class CachedAnchors(nn.Module):
    """A head that caches a tensor on itself in forward, over a class-level default."""

    anchors = None

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = self.out(self.conv(x).relu())
        if self.anchors is None or self.anchors.shape[0] != y.shape[-1]:
            self.anchors = torch.arange(y.shape[-1], dtype=y.dtype)
        return y + self.anchors


def test_export_capture_leaves_nothing_fake_on_the_model():
    model = CachedAnchors().eval()
    result = sp.prune(model, X, 0.5, capture_method="export")
    assert model.anchors is None  # as before the capture: no FakeTensor left behind
    out = result.model(torch.randn(2, 3, 8, 8))  # a real run of the copy works
    assert out.shape == (2, 4, 8, 8)
    assert isinstance(result.model.anchors, torch.Tensor)


class SizeInCode(nn.Module):
    """A view sized by an int attribute (``self.c``), beside a branch it does not touch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.c = 16
        self.side = nn.Conv2d(3, 12, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)
        self.side_head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        b, _, h, w = y.shape
        attention = y.view(b, self.c, h * w).softmax(-1).view(b, self.c, h, w)
        return self.head(attention * y) + self.side_head(self.side(x).relu())


class SizeFromTensor(SizeInCode):
    """The same view sized from the tensor: prunable."""

    def forward(self, x):
        y = self.conv(x)
        b, c, h, w = y.shape
        attention = y.view(b, c, h * w).softmax(-1).view(b, c, h, w)
        return self.head(attention * y) + self.side_head(self.side(x).relu())


def test_a_size_fixed_in_code_keeps_its_channels_on_the_export_path():
    model = randomize(SizeInCode().eval())
    result = sp.prune(model, X, 0.5, capture_method="export", exact_only=True)
    assert result.verification.ok
    conv = group_of(result, "conv.weight")
    assert conv["kept"] == conv["units"] == 16
    assert any("fixed in the model's code" in r for r in reasons(result))
    assert group_of(result, "side.weight")["kept"] == 6  # the rest is still pruned
    check_against_oracle(model, result)


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_size_read_from_the_tensor_is_pruned(method):
    model = randomize(SizeFromTensor().eval())
    result = sp.prune(model, X, 0.5, capture_method=method)
    assert group_of(result, "conv.weight")["kept"] == 8
    assert not any("fixed in the model's code" in r for r in reasons(result))
    check_against_oracle(model, result)


class CountAsTensor(nn.Module):
    """``y / sqrt(torch.tensor(C))``: a channel count made into a tensor."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.side = nn.Conv2d(3, 12, 3, padding=1)
        self.head = nn.Conv2d(16, 4, 1)
        self.side_head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.conv(x)
        y = y / torch.sqrt(torch.tensor(y.shape[1], dtype=y.dtype))
        return self.head(y) + self.side_head(self.side(x))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_channel_count_made_into_a_tensor_keeps_its_channels(method):
    model = randomize(CountAsTensor().eval())
    result = sp.prune(model, X, 0.5, capture_method=method, exact_only=True)
    assert result.verification.ok
    assert group_of(result, "conv.weight")["kept"] == 16
    assert group_of(result, "side.weight")["kept"] == 6
    check_against_oracle(model, result)


class Flip(nn.Module):
    def forward(self, x):
        return x.flip(1)  # reverses channels: no rule may pass them through unchanged


def test_a_failed_check_under_exact_only_does_not_suggest_exact_only():
    registry = RuleRegistry()
    registry.ops = dict(DEFAULT_REGISTRY.ops)
    registry.unknown_rule = DEFAULT_REGISTRY.unknown_rule
    registry.rule(Flip)(lambda ctx, module, x: ctx.result(x.maps))  # a wrong user rule
    model = nn.Sequential(nn.Conv2d(3, 8, 3), Flip(), nn.Conv2d(8, 4, 1)).eval()
    with pytest.raises(VerificationError) as error:
        sp.prune(randomize(model), X, 0.5, exact_only=True, registry=registry,
                 leaf_modules=[Flip])
    assert "--exact-only" not in str(error.value)
    with pytest.raises(VerificationError, match="--exact-only"):
        sp.prune(randomize(model), X, 0.5, registry=registry, leaf_modules=[Flip])


class InPlaceDropout(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout2d(0.2, inplace=True)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        y = F.dropout(self.conv(x), 0.1, training=self.training, inplace=True)
        return self.head(self.drop(y))


def test_in_place_dropout_passes_channels_on_the_export_path():
    model = randomize(InPlaceDropout().eval())
    cap = capture(model, X, method="export")
    targets = {str(n.target) for n in cap.graph.nodes}
    assert {"aten.dropout_.default", "aten.feature_dropout_.default"} <= targets
    result = sp.prune(model, X, 0.5, capture_method="export")
    assert group_of(result, "conv.weight")["kept"] == 4
    assert not any("no channel rule" in r for r in reasons(result))


class DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.boxes = nn.Conv2d(8, 4, 1)
        self.scores = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        y = self.conv(x).relu()
        return {"scores": self.scores(y), "boxes": self.boxes(y).mean((2, 3))}  # not sorted


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_dict_outputs_keep_insertion_order_in_the_onnx_check(exporter, tmp_path):
    model = randomize(DictOut().eval())
    result = sp.prune(model, X, 0.5)
    path = tmp_path / "pruned.onnx"
    export_onnx(result.model, X, path, exporter)
    got = run_onnx(path, X)
    assert [g.shape for g in got] == [(1, 2, 8, 8), (1, 4)]  # "scores" first, as written
    assert onnx_parity(path, result.model, X) < 1e-4


class CatChunkBatch(nn.Module):
    """Concatenates over the batch axis and chunks it back: dynamo fixes the batch size."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        a, b = self.conv(torch.cat([x, x.flip(-1)], 0)).chunk(2, 0)
        return a + b


def test_an_exporter_that_fixes_the_batch_gives_way_to_the_next(tmp_path):
    model = CatChunkBatch().eval()
    with pytest.raises(ExportError, match="cannot run it at batch 3") as error:
        export_onnx(model, X, tmp_path / "a.onnx", "dynamo")
    assert "\n" not in str(error.value)
    assert export_onnx(model, X, tmp_path / "b.onnx", "auto") == "torchscript"
    assert onnx_parity(tmp_path / "b.onnx", model, X, batch=5) < 1e-4


def test_an_untraceable_model_gets_one_short_line_and_verbose_gives_the_detail(capsys):
    with pytest.raises(CaptureError) as error:
        sp.prune(LongError(), X)
    message = str(error.value)
    assert "\n" not in message and len(message) < 500
    assert "torch.fx and torch.export both stop" in message
    spec = f"{DATA}:long_error"
    assert main(["analyze", spec, "--input-shape", "1,3,8,8"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and len(err) < 550
    assert main(["analyze", spec, "--input-shape", "1,3,8,8", "--verbose"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and "s899*s900" in err  # the full message is there


def test_weight_standardised_convs_prune_exactly_on_outputs_approximately_on_inputs():
    timm_layers = pytest.importorskip("timm.layers")
    model = nn.Sequential(timm_layers.ScaledStdConv2d(3, 16, 3, padding=1), nn.ReLU(),
                          timm_layers.ScaledStdConv2d(16, 12, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(12, 4, 1)).eval()
    randomize(model)
    result = sp.prune(model, X, 0.5, exact_only=True)
    first, second = group_of(result, "0.weight"), group_of(result, "2.weight")
    assert first["status"] == "approximate" and first["kept"] == 16  # feeds a standardised conv
    assert second["status"] == "exact" and second["kept"] == 6
    assert result.model[2].gain.shape[0] == result.model[2].out_channels == 6
    # exact: the kept filters are the dense ones, standardised over the same inputs
    keep = next(e["keep"] for e in result.plan.params if e["name"] == "2.weight" and e["dim"] == 0)
    torch.testing.assert_close(outputs(result.model[:3], X), outputs(model[:3], X)[:, keep])
    approximate = sp.prune(model, X, 0.5)
    assert group_of(approximate, "0.weight")["kept"] == 8
    assert approximate.verification.approximate_rel_error is not None


class Correlation(nn.Module):
    """RAFT's correlation: the channel count, made a tensor, divides a product that has
    contracted the channel axis; a side branch stays prunable."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 16, 3, padding=1)
        self.side = nn.Conv2d(3, 12, 3, padding=1)
        self.side_head = nn.Conv2d(12, 4, 1)

    def forward(self, a, b):
        f1, f2 = self.enc(a), self.enc(b)
        n, c, h, w = f1.shape
        corr = torch.matmul(f1.view(n, c, h * w).transpose(1, 2), f2.view(n, c, h * w))
        return corr / torch.sqrt(torch.tensor(c)), self.side_head(self.side(a))


def test_a_count_dividing_a_contracted_product_keeps_the_counted_channels():
    model = randomize(Correlation().eval())
    inputs = (torch.randn(1, 3, 8, 8), torch.randn(1, 3, 8, 8))
    result = sp.prune(model, inputs, 0.5, exact_only=True)
    assert result.figures["capture"] == "export"  # fx cannot trace torch.tensor(c)
    assert result.verification.ok
    assert group_of(result, "enc.weight")["kept"] == 16
    assert group_of(result, "side.weight")["kept"] == 6


class FloatScale(nn.Module):
    """``f / C ** 0.5`` with a shape-dependent branch: a float from a channel count."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Conv2d(3, 16, 3, padding=1)
        self.side = nn.Conv2d(3, 12, 3, padding=1)
        self.out = nn.Conv2d(16, 4, 1)
        self.side_head = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        f = self.enc(x)
        return self.out(f / f.shape[1] ** 0.5) + self.side_head(self.side(x))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_a_float_made_from_a_channel_count_keeps_its_channels(method):
    model = randomize(FloatScale().eval())
    result = sp.prune(model, X, 0.5, exact_only=True, capture_method=method)
    assert result.verification.ok
    assert group_of(result, "enc.weight")["kept"] == 16
    assert group_of(result, "side.weight")["kept"] == 6


def test_instance_norm_passes_channels_on_the_export_path():
    model = randomize(nn.Sequential(nn.Conv2d(3, 16, 3), nn.InstanceNorm2d(16, affine=True),
                                    nn.ReLU(), nn.Conv2d(16, 4, 1)).eval())
    for method in ("fx", "export"):
        result = sp.prune(model, X, 0.5, exact_only=True, capture_method=method)
        assert group_of(result, "0.weight")["kept"] == 8, method
        assert result.model[1].weight.shape == (8,)
        check_against_oracle(model, result)
