import math

import pytest
import torch
import torch.nn as nn
import torchvision

from structprune.core.capture import capture
from structprune.errors import CaptureError
from structprune.types import TensorSpec

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


def test_shapes_and_dtypes_follow_arithmetic_and_broadcasting():
    x = torch.randn(2, 3, 4, 4)
    cap = capture(Arithmetic(), (x,))
    output = next(n for n in cap.graph.nodes if n.op == "output")
    specs = [cap.values[node.name] for node in output.args[0]]
    real = Arithmetic()(x)
    assert [(s.shape, s.dtype) for s in specs] == [(tuple(t.shape), t.dtype) for t in real]


def test_importing_structprune_leaves_timm_unimported_until_the_user_imports_it():
    """timm's 700 module classes slow every fx trace; its rules wait for the user's import."""
    import subprocess
    import sys

    pytest.importorskip("timm")
    code = ("import sys, structprune\n"
            "from structprune.core.rules import DEFAULT_REGISTRY as R\n"
            "assert 'timm' not in sys.modules and 'timm' in R.pending\n"
            "from timm.layers.mixed_conv2d import MixedConv2d\n"
            "conv = MixedConv2d(8, 8, [3, 5])\n"
            "assert R.resizer_for(conv) is not None and 'timm' not in R.pending\n"
            "assert R.maintained_attributes(conv) == ('splits',)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


class InPlaceReshape(nn.Module):
    def forward(self, x):
        y = torch.relu(x)  # a shape-preserving op: on meta its input may stand for it...
        y.unsqueeze_(0)  # ...unless a method reshapes it in place, as here
        return x + 1, y


def test_shapes_stay_right_when_a_method_reshapes_a_tensor_in_place():
    x = torch.randn(2, 3, 4, 4)
    cap = capture(InPlaceReshape(), (x,))
    shapes = {n.name: cap.values[n.name].shape for n in cap.graph.nodes
              if n.op in ("call_function", "call_method")}
    real_sum, real_y = InPlaceReshape()(x.clone())
    assert shapes["add"] == tuple(real_sum.shape)  # x itself was not reshaped
    assert shapes["unsqueeze_"] == tuple(real_y.shape)


def _wrapped_scale(x, k):  # a leaf function for fx (torch.fx.wrap below)
    return x * k


torch.fx.wrap("_wrapped_scale")


class TracerCorners(nn.Module):
    """What the tracer must route: a module called twice, a buffer and a plain tensor
    attribute read in forward, a parameter used directly, an fx.wrap leaf and math."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.block = nn.Sequential(nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3), nn.ReLU())
        self.register_buffer("shift", torch.ones(1, 3, 1, 1))
        self.plain = torch.full((1, 3, 1, 1), 2.0)  # neither parameter nor buffer
        self.gain = nn.Parameter(torch.ones(1, 3, 1, 1))

    def forward(self, x):
        y = self.conv(self.conv(x)) + self.shift
        y = self.block(y) * self.gain + self.plain
        return _wrapped_scale(y, math.sqrt(y.shape[1]))


def test_capture_is_a_graph_module_that_computes_the_model():
    """The captured graph is a real fx.GraphModule over the user's own modules: running it
    gives the model's output, and its targets are the model's objects (no copies)."""
    model = TracerCorners().eval()
    x = torch.randn(2, 3, 5, 5)
    cap = capture(model, (x,))
    assert isinstance(cap.graph_module, torch.fx.GraphModule)
    with torch.no_grad():
        assert torch.equal(cap.graph_module(x), model(x))
    assert cap.graph_module.get_submodule("conv") is model.conv
    convs = [n for n in cap.graph.nodes if n.op == "call_module" and n.target == "conv"]
    assert len(convs) == 2  # a module called twice stays two calls
    assert not [a for a in vars(model) if a.startswith("_tensor_constant")]


@pytest.mark.parametrize("method", ["fx", "export"])
def test_every_node_records_its_value_in_meta_on_both_paths(method):
    model = torchvision.models.resnet18(num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    cap = capture(model, (x,), method=method)
    real = {}
    interpreter = torch.fx.Interpreter(cap.graph_module)
    original = interpreter.run_node
    interpreter.run_node = lambda n: real.setdefault(n.name, original(n))
    with torch.no_grad():
        interpreter.run(x)
    compared = 0
    for node in cap.graph.nodes:
        value = real.get(node.name)
        if isinstance(value, torch.Tensor):
            spec = cap.values[node.name]
            assert isinstance(node.meta["val"], torch.Tensor)
            assert (spec.shape, spec.dtype) == (tuple(value.shape), value.dtype), node.name
            compared += 1
    assert compared > 50


class VarArgs(nn.Module):
    def __init__(self, two_inputs: bool):
        super().__init__()
        self.two_inputs = two_inputs
        self.conv = nn.Conv2d(3, 8, 3)
        self.side = nn.Conv2d(1, 8, 3)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x, *rest):
        y = self.conv(x)
        if self.two_inputs:
            y = y + self.side(rest[0])
        return self.head(y)


@pytest.mark.parametrize("count", [1, 2])
def test_a_forward_with_varargs_takes_any_number_of_example_inputs(count):
    import structprune as sp

    inputs = (torch.randn(1, 3, 8, 8), torch.randn(1, 1, 8, 8))[:count]
    result = sp.prune(VarArgs(count == 2).eval(), inputs, 0.5)
    assert result.verification.ok and result.model.conv.out_channels == 4
    assert result.figures["capture"] == "fx"
    with pytest.raises(CaptureError, match="takes 1 or more inputs"):
        capture(VarArgs(count == 2), (), method="fx")


CONVS = [
    nn.Conv2d(4, 6, 3),
    nn.Conv2d(4, 6, 3, stride=2, padding=1),
    nn.Conv2d(4, 6, (3, 5), stride=(2, 1), padding=(0, 2), dilation=(2, 1)),
    nn.Conv2d(4, 6, 3, padding="same", dilation=2),
    nn.Conv2d(4, 6, 4, padding="valid", stride=3),
    nn.Conv2d(4, 8, 3, padding=1, groups=2, padding_mode="reflect"),
    nn.Conv1d(4, 6, 5, stride=2, padding=2),
    nn.Conv3d(4, 6, 3, stride=(1, 2, 2), padding=1),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda m: repr(m))
@pytest.mark.parametrize("batched", [True, False])
def test_declared_conv_shapes_equal_the_meta_kernel(conv, batched):
    """Capture skips the conv's meta kernel where the registry declares its shape: the
    declaration must give what the kernel gives, batched and unbatched, every padding."""
    from structprune.core.rules.layers import conv_shape

    spatial = (9, 11, 7)[:len(conv.kernel_size)]
    x = torch.empty((2, 4, *spatial) if batched else (4, *spatial), device="meta")
    want = torch.func.functional_call(
        conv, {k: v.to("meta") for k, v in conv.state_dict().items()}, (x,))
    assert conv_shape(conv, (x,), {}) == (tuple(want.shape), want.dtype)


def test_a_conv_shape_the_formula_cannot_give_is_left_to_the_kernel():
    from structprune.core.rules.layers import conv_shape

    conv = nn.Conv2d(4, 6, 5)
    assert conv_shape(conv, (torch.empty(1, 3, 9, 9, device="meta"),), {}) is None  # channels
    assert conv_shape(conv, (torch.empty(1, 4, 3, 9, device="meta"),), {}) is None  # too small
    assert conv_shape(conv, (torch.empty(1, 4, 9, 9, dtype=torch.half, device="meta"),),
                      {}) is None  # dtype mismatch: the kernel raises its own error


@pytest.mark.parametrize("shapes, dim", [
    ([(2, 3, 4), (2, 5, 4)], 1), ([(2, 3, 4), (2, 3, 1), (2, 3, 2)], -1), ([(6,), (2,)], 0),
    ([(1, 2, 3)], 2)])
def test_declared_cat_shapes_equal_the_meta_kernel(shapes, dim):
    from structprune.core.rules.shape import cat_shape

    tensors = [torch.empty(s, device="meta") for s in shapes]
    want = torch.cat(tensors, dim)
    assert cat_shape(None, (tensors, dim), {}) == (tuple(want.shape), want.dtype)
    assert cat_shape(None, (tensors,), {"dim": dim}) == (tuple(want.shape), want.dtype)


def test_a_cat_the_formula_cannot_give_is_left_to_the_kernel():
    from structprune.core.rules.shape import cat_shape

    a, b = torch.empty(2, 3, device="meta"), torch.empty(2, 4, device="meta")
    assert cat_shape(None, ([a, b], 0), {}) is None  # mismatched: torch raises
    assert cat_shape(None, ([a, b.half()], 1), {}) is None  # type promotion
    assert cat_shape(None, ([a, torch.empty(0, device="meta")], 0), {}) is None  # legacy empty
    assert cat_shape(None, ([], 0), {}) is None


class ConstantInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x) * torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1, 1)


def test_tensor_constants_stay_off_the_model_and_resolve_through_the_capture():
    """fx parks a tensor made in forward on the traced module; capture takes it back off the
    user's model and keeps it where the graph (and its lazily built GraphModule) find it."""
    model = ConstantInForward().eval()
    x = torch.randn(1, 3, 4, 4)
    cap = capture(model, (x,))
    assert not [a for a in vars(model) if a.startswith("_tensor_constant")]
    [node] = [n for n in cap.graph.nodes if n.op == "get_attr"]
    want = torch.tensor([1.0, 2.0, 3.0, 4.0]).reshape(1, 4, 1, 1)  # fx ran the reshape
    assert torch.equal(cap.resolve(node.target), want)
    with torch.no_grad():
        assert torch.equal(cap.graph_module(x), model(x))


POOLS = [nn.AdaptiveAvgPool2d(1), nn.AdaptiveAvgPool2d((3, None)), nn.AdaptiveMaxPool2d((2, 5)),
         nn.AdaptiveAvgPool1d(4), nn.AdaptiveAvgPool3d((1, 2, None))]


@pytest.mark.parametrize("pool", POOLS, ids=lambda m: repr(m))
@pytest.mark.parametrize("batched", [True, False])
def test_declared_adaptive_pool_shapes_equal_the_meta_kernel(pool, batched):
    from structprune.core.rules.reduce import adaptive_pool_shape

    n = {nn.AdaptiveAvgPool1d: 1, nn.AdaptiveAvgPool3d: 3}.get(type(pool), 2)
    spatial = (9, 11, 7)[:n]
    x = torch.empty((2, 4, *spatial) if batched else (4, *spatial), device="meta")
    want = pool(x)
    assert adaptive_pool_shape(pool, (x,), {}) == (tuple(want.shape), want.dtype)
    assert adaptive_pool_shape(nn.AdaptiveMaxPool2d(2, return_indices=True), (x,), {}) is None


@pytest.mark.parametrize("shape", [(5, 8), (8,), (2, 3, 8)])
def test_declared_linear_shapes_equal_the_meta_kernel(shape):
    from structprune.core.rules.layers import linear_shape

    linear = nn.Linear(8, 6)
    x = torch.empty(shape, device="meta")
    want = torch.func.functional_call(
        linear, {k: v.to("meta") for k, v in linear.state_dict().items()}, (x,))
    assert linear_shape(linear, (x,), {}) == (tuple(want.shape), want.dtype)
    assert linear_shape(linear, (torch.empty(5, 7, device="meta"),), {}) is None


class HiddenBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(4)
        self.bn.register_buffer("extra", torch.ones(4), persistent=False)
        self.lin = nn.Conv2d(4, 4, 1)
        self.lin.mask = torch.ones(1, 4, 1, 1)  # a plain tensor attribute

    def forward(self, x):
        return self.lin(self.bn(x) + self.bn.extra.view(1, 4, 1, 1)) * self.lin.mask


def test_the_graph_module_leaves_the_users_modules_as_they_were():
    model = HiddenBuffer().eval()
    keys = set(model.state_dict())
    x = torch.randn(1, 4, 3, 3)
    cap = capture(model, (x,))
    with torch.no_grad():
        assert torch.equal(cap.graph_module(x), model(x))
    assert set(model.state_dict()) == keys  # the non-persistent buffer stays non-persistent


def test_declared_shapes_follow_the_weight_not_the_attributes():
    from structprune.core.rules.layers import conv_shape, linear_shape

    linear = nn.Linear(3, 4, bias=False)
    linear.weight = nn.Parameter(torch.randn(2, 3))
    assert linear_shape(linear, (torch.empty(5, 3, device="meta"),), {})[0] == (5, 2)
    conv = nn.Conv2d(3, 4, 1, bias=False)
    conv.weight = nn.Parameter(torch.randn(6, 3, 1, 1))
    assert conv_shape(conv, (torch.empty(1, 3, 5, 5, device="meta"),), {})[0] == (1, 6, 5, 5)


def test_adaptive_pool_inputs_torch_refuses_are_left_to_the_kernel():
    from structprune.core.rules.reduce import adaptive_pool_shape

    x = torch.empty(1, 4, 5, 5, device="meta")
    assert adaptive_pool_shape(nn.AdaptiveAvgPool1d((None,)), (x[0],), {}) is None
    assert adaptive_pool_shape(nn.AdaptiveAvgPool2d(None), (x,), {}) is None
    assert adaptive_pool_shape(nn.AdaptiveAvgPool2d(2), (x[..., :0],), {}) is None
    assert adaptive_pool_shape(nn.AdaptiveAvgPool2d(2), (x.long(),), {}) is None


def test_a_lazy_module_is_refused_in_one_line_and_left_uninitialised():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.Flatten(), nn.LazyLinear(2))
    with pytest.raises(CaptureError, match="lazy module"):
        capture(model, (torch.randn(1, 3, 2, 2),))
    assert isinstance(model[2].weight, nn.parameter.UninitializedParameter)
