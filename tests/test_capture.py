import math
import random

import pytest
import torch
import torch.fx._symbolic_trace as fx_trace
import torch.nn as nn
import torch.nn.functional as F
import torchvision

from structprune.capture import TensorSpec, _Tracer, capture
from structprune.errors import CaptureError
from structprune.rules import DEFAULT_REGISTRY

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


def _random_layer(rng: random.Random) -> tuple[nn.Module | None, object, tuple, torch.Tensor]:
    """A random conv, pool, adaptive pool, linear or flatten with an input it may reject."""
    n = rng.choice([1, 2, 3])
    size = [rng.randint(1, 9) for _ in range(n)]
    channels = rng.randint(1, 4)
    batch = [rng.randint(1, 2)] if rng.random() < 0.8 else []
    x = torch.randn(*batch, channels, *size)
    kind = rng.choice(["conv", "maxpool", "avgpool", "adaptive", "linear", "flatten", "cat"])
    k = rng.randint(1, 4)
    if kind == "conv":
        padding = rng.choice([0, 1, 2, "same", "valid"])
        stride = 1 if padding == "same" else rng.randint(1, 3)
        conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[n - 1]
        groups = rng.choice([g for g in (1, 2) if channels % g == 0])
        return conv(channels, 2 * groups, k, stride, padding, rng.randint(1, 2), groups,
                    padding_mode=rng.choice(["zeros", "replicate"])), None, (x,), x
    if kind in ("maxpool", "avgpool"):
        stride = rng.choice([None, 1, 2, 3])
        padding = rng.randint(0, 2)
        ceil = rng.random() < 0.5
        if kind == "maxpool":
            pool = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)[n - 1]
            return pool(k, stride, padding, rng.randint(1, 2), ceil_mode=ceil), None, (x,), x
        pool = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d)[n - 1]
        return pool(k, stride, padding, ceil_mode=ceil), None, (x,), x
    if kind == "adaptive":
        out = tuple(rng.choice([None, 1, 2, 3]) for _ in range(n))
        if rng.random() < 0.5:
            return None, (F.adaptive_avg_pool1d, F.adaptive_avg_pool2d,
                          F.adaptive_avg_pool3d)[n - 1], (x, out), x
        pool = rng.choice([(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
                           (nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d)])
        return pool[n - 1](out), None, (x,), x
    if kind == "linear":
        return nn.Linear(rng.choice([size[-1], size[-1] + 1]), 3), None, (x,), x
    if kind == "cat":
        other = torch.randn(*batch, rng.randint(1, 3), *size) if rng.random() < 0.8 else \
            torch.randn(*batch, channels, *[s + 1 for s in size])
        return None, torch.cat, ([x, other], rng.randint(-x.ndim, x.ndim - 1)), x
    start, end = rng.randint(-x.ndim, x.ndim - 1), rng.randint(-x.ndim, x.ndim - 1)
    if rng.random() < 0.5:
        return nn.Flatten(start, end), None, (x,), x
    return None, torch.flatten, (x, start, end), x


def test_registered_output_shapes_agree_with_running_the_op():
    """Every shape function the registry gives capture either declines (None) or returns the
    shape a real run returns; where the op raises, the function must decline."""
    from structprune.rules import DEFAULT_REGISTRY

    rng = random.Random(0)
    checked = 0
    for _ in range(3000):
        module, fn, args, _ = _random_layer(rng)
        shape_fn = DEFAULT_REGISTRY.shapes.get(type(module) if module is not None else fn)
        assert callable(shape_fn)
        predicted = shape_fn(module, args, {})
        try:
            real = (module or fn)(*args)
        except (RuntimeError, ValueError, TypeError):
            assert predicted is None, (module or fn, [a.shape for a in args
                                                     if isinstance(a, torch.Tensor)])
            continue
        if predicted is not None:
            assert predicted == tuple(real.shape), (module or fn, args[0].shape)
            checked += 1
    assert checked > 1500  # most configurations are computed, not declined


class CountingGate(nn.Module):
    """Keeps channels one to one; counts how often it really runs."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x * torch.sigmoid(x)


def test_a_registered_output_shape_spares_the_run_and_gives_the_same_plan():
    import structprune as sp
    from structprune.rules import DEFAULT_REGISTRY, passthrough

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(3, 8, 3), CountingGate(), nn.Conv2d(8, 4, 3))

    x = (torch.randn(1, 3, 12, 12),)
    plans = []
    for with_shape in (False, True):
        registry = DEFAULT_REGISTRY.copy()
        registry.module(CountingGate)(lambda ctx, module, t: passthrough(ctx, t))
        if with_shape:
            registry.output_shape(CountingGate)(lambda module, args, kwargs: tuple(args[0].shape))
        model = build()
        cap = capture(model, x, registry=registry)
        assert model[1].calls == (0 if with_shape else 1)  # on meta tensors, without one
        gate = next(n for n in cap.graph.nodes if n.op == "call_module" and n.target == "1")
        assert cap.values[gate.name].shape == (1, 8, 10, 10)
        result = sp.prune(model, x, 0.5, registry=registry)
        assert result.verification.ok and result.model[0].out_channels == 4
        plans.append(result.plan.params)
    assert plans[0] == plans[1]


def test_importing_structprune_leaves_timm_unimported_until_the_user_imports_it():
    """timm's 700 module classes slow every fx trace; its rules wait for the user's import."""
    import subprocess
    import sys

    pytest.importorskip("timm")
    code = ("import sys, structprune\n"
            "from structprune.rules import DEFAULT_REGISTRY as R\n"
            "assert 'timm' not in sys.modules and 'timm' in R.pending\n"
            "from timm.layers.mixed_conv2d import MixedConv2d\n"
            "conv = MixedConv2d(8, 8, [3, 5])\n"
            "assert R.resizer_for(conv) is not None and not R.pending\n"
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


def _graph_dump(graph):
    return [(n.name, n.op, str(n.target), repr(n.args), repr(n.kwargs),
             list((n.meta.get("nn_module_stack") or {}).items())) for n in graph.nodes]


class _StockTracer(_Tracer):
    trace = torch.fx.Tracer.trace  # fx's own, patching nn.Module itself
    getattr = torch.fx.Tracer.getattr


@pytest.mark.parametrize("build", [TracerCorners, torchvision.models.resnet18,
                                   torchvision.models.mobilenet_v3_small])
def test_fast_trace_gives_fx_own_graph(build):
    torch.manual_seed(0)
    ours = _Tracer((), DEFAULT_REGISTRY).trace(build().eval())
    stock = _StockTracer((), DEFAULT_REGISTRY).trace(build().eval())
    assert _graph_dump(ours) == _graph_dump(stock)
    assert ours.python_code("self").src == stock.python_code("self").src


def test_fast_trace_leaves_no_patch_behind_even_when_tracing_fails():
    classes = (DataDependent, TracerCorners, nn.Conv2d, nn.Sequential, nn.BatchNorm2d, nn.ReLU)
    before = {cls: dict(vars(cls)) for cls in classes}
    _Tracer((), DEFAULT_REGISTRY).trace(TracerCorners())
    with pytest.raises(torch.fx.proxy.TraceError):
        _Tracer((), DEFAULT_REGISTRY).trace(DataDependent())
    assert {cls: dict(vars(cls)) for cls in classes} == before
    assert nn.Module.__call__ is fx_trace._orig_module_call
    assert not fx_trace._get_is_fx_tracing() if hasattr(fx_trace, "_get_is_fx_tracing") \
        else not fx_trace._is_fx_tracing_flag
    # fx's own tracer, which patches nn.Module itself, still reaches every class
    gm = torch.fx.symbolic_trace(TracerCorners())
    assert sum(n.op == "call_module" for n in gm.graph.nodes) == 5


class OwnCall(nn.Conv2d):
    def __call__(self, *args, **kwargs):  # a class of its own call: fx's own trace handles it
        return super().__call__(*args, **kwargs)


def test_a_module_with_its_own_call_is_traced_by_fx_itself():
    model = nn.Sequential(OwnCall(3, 4, 1), nn.ReLU())
    graph = _Tracer((), DEFAULT_REGISTRY).trace(model)
    assert [n.op for n in graph.nodes] == ["placeholder", "call_module", "call_module", "output"]
    assert "__call__" not in vars(nn.Conv2d) and "__call__" not in vars(nn.ReLU)


class AssignsTensor(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        self.mask = torch.ones(1, 3, 1, 1)
        y = self.conv(x) * self.mask
        self.mask = torch.ones(1, 3, 5, 5)  # reassigned after use: the graph keeps the first
        return y


class InlineModule(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return nn.Hardtanh()(self.conv(x))  # built in forward: not a submodule


class TracesInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 1)
        self.inner = nn.Sequential(nn.Conv2d(3, 3, 1), nn.ReLU())

    def forward(self, x):
        self.inner_graph = torch.fx.symbolic_trace(self.inner).graph  # fx's own, inside ours
        return self.conv(x)


class BareContainer(nn.Module):
    def __init__(self):
        super().__init__()
        self.box = nn.Module()  # a bare nn.Module: its class is the one fx patches
        self.box.conv = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        return self.box.conv(x)


@pytest.mark.parametrize("build", [AssignsTensor, InlineModule, TracesInside, BareContainer])
def test_fast_trace_matches_fx_where_fx_is_particular(build):
    def traced(tracer):
        model = build()
        try:
            graph = tracer((), DEFAULT_REGISTRY).trace(model)
        except NameError as exc:  # fx refuses modules outside the tree
            return str(exc)
        inner = getattr(model, "inner_graph", None)
        return _graph_dump(graph), inner and [n.op for n in inner.nodes]

    ours, stock = traced(_Tracer), traced(_StockTracer)
    assert ours == stock
    if build is AssignsTensor:
        assert "_tensor_constant0" in str(ours)  # frozen, not a read of the attribute
    if build is InlineModule:
        assert ours == "module is not installed as a submodule"
    if build is TracesInside:
        assert ours[1] == ["placeholder", "call_module", "call_module", "output"]
