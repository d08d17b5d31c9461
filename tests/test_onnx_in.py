"""An ONNX file as the model (issue #27): converted to an fx GraphModule, pruned, and written
back as ``pruned.onnx`` with the original graph's input and output names, opset and dynamic
axes; ONNX Runtime on that file must equal the masked dense model.

The files are exported here from small torch models (random weights, BN statistics and biases
randomised) by torch's two exporters: TorchScript (opset 17: Flatten, Split with a sizes input,
Shape arithmetic) and torch.export (opset 18+: Reshape with allowzero=1 to a constant shape,
ReduceMean with an axes input)."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import warnings

import numpy as np
import onnx
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

import structprune as sp
from structprune.core.verify import compare, flatten_outputs, reference_outputs
from structprune.deploy.export import export_onnx, run_onnx
from structprune.errors import StructPruneError
from structprune.front.cli import main
from structprune.front.models import build_model, default_input_shapes, export_signature
from structprune.tree import random_inputs, resolve_target

from .oracles import outputs, randomize, weight_masked

pytest.importorskip("onnx2torch")


class Residual(nn.Module):
    """conv-bn-relu, a residual add, a concat, an equal split, pooling, flatten, linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.left, self.right = nn.Conv2d(16, 12, 1), nn.Conv2d(16, 12, 3, padding=1)
        self.mix = nn.Conv2d(24, 16, 1)
        self.head = nn.Linear(16 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(self.body(x) + x)
        first, second = torch.cat([self.left(x), self.right(x)], 1).chunk(2, 1)
        x = self.mix(torch.cat([second, F.relu(first)], 1))
        return self.head(F.max_pool2d(x, 4).flatten(1))


class Dense(nn.Module):
    """A dense-prediction head: upsampling (Resize), a transpose to channels-last and a
    linear map over channels there (MatMul with a weight initializer), and back."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.mid = nn.Conv2d(16, 16, 3, padding=1)
        self.channels_last = nn.Linear(16, 12)
        self.out = nn.Conv2d(12, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(self.mid(self.down(x)), scale_factor=2.0, mode="nearest")
        x = self.channels_last(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.out(F.relu(x))


class Shuffle(nn.Module):
    """A channel shuffle by reshape -> transpose -> reshape: its sizes are constants of a
    file torch.export wrote, so the shuffled channels stay; the convs before it still go."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 8, 1))
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        x = self.a(x).view(n, 2, 4, h, w).transpose(1, 2).reshape(n, 8, h, w)
        return self.b(x)


SIZE = 16


def write_onnx(model: nn.Module, path, *, dynamo: bool = False, opset: int | None = None,
               dynamic: bool = True, size: int = SIZE) -> str:
    """Export ``model`` (eval, randomised) to ``path`` with input ``images`` and output
    ``scores``, the batch axis named ``n`` when ``dynamic``; at the exporter's own opset
    unless ``opset`` is given (TorchScript's: 17)."""
    model = randomize(model.eval())
    x = torch.randn(2 if dynamic else 1, 3, size, size)
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            torch.onnx.export(model, (x,), str(path), dynamo=True, opset_version=opset,
                              input_names=["images"], output_names=["scores"],
                              dynamic_shapes=({0: torch.export.Dim("n")},) if dynamic else None)
        else:
            torch.onnx.export(model, (x,), str(path), dynamo=False, opset_version=opset or 17,
                              input_names=["images"], output_names=["scores"],
                              dynamic_axes={"images": {0: "n"}, "scores": {0: "n"}}
                              if dynamic else None)
    return str(path)


def consumers_masked(model: torch.fx.GraphModule, plan: sp.Plan) -> nn.Module:
    """An oracle independent of the analysis: a copy of the dense model with the removed input
    columns of its convs and linear maps zeroed (:func:`weight_masked`), and the removed
    rows of every constant weight a MatMul multiplies by (``x @ W``, Linear on 4-D inputs)."""
    masked = weight_masked(model, plan)
    weights = {n.args[1].target for n in masked.graph.nodes if n.op == "call_module"
               and type(masked.get_submodule(n.target)).__name__ == "OnnxMatMul"
               and getattr(n.args[1], "op", None) == "get_attr"}
    with torch.no_grad():
        for entry in plan.params:
            if entry["name"] in weights and entry["dim"] == 0:
                drop = torch.ones(entry["size"], dtype=torch.bool)
                drop[entry["keep"]] = False
                resolve_target(masked, entry["name"])[drop] = 0
    return masked


def masked_error(result: sp.PruneResult, path, batch: int | None = 2,
                 per_channel: bool = False) -> float:
    """ONNX Runtime on ``path`` against the masked dense model, on fresh inputs (batch
    ``batch``; None: the example's); ``per_channel``: each channel (axis 1) of each output
    relative to its own largest value."""
    inputs = random_inputs(result.analysis.capture.example_inputs, batch=batch, seed=5)
    want = flatten_outputs(reference_outputs(result.analysis, result.plan, inputs))
    got = [torch.from_numpy(np.asarray(v)) for v in run_onnx(path, inputs)]
    if not per_channel:
        return compare(want, got).max_rel_error
    assert [tuple(t.shape) for t in want] == [tuple(t.shape) for t in got]
    return max(compare(w.select(1, c), g.select(1, c)).max_rel_error
               for w, g in zip(want, got, strict=True) for c in range(w.shape[1]))


def prune_file(path, out, **settings) -> sp.PruneResult:
    """Convert the ONNX file ``path``, prune it at 0.5 with exact-only groups (``settings``
    replaced) and write the pruned model to ``out`` with the file's own signature."""
    x = random_inputs(default_input_shapes(path))
    result = sp.prune(build_model(path), x, 0.5, **{"exact_only": True, **settings})
    assert result.verification.ok and result.verification.exact_units_only
    export_onnx(result.model, x, out, signature=export_signature(path))
    return result


CASES = [(Residual, False), (Residual, True), (Dense, False), (Dense, True)]


@pytest.mark.parametrize(("make", "dynamo"), CASES,
                         ids=[f"{m.__name__}-{'dynamo' if d else 'torchscript'}" for m, d in CASES])
def test_prunes_and_matches_the_masked_dense_model_in_onnx_runtime(tmp_path, make, dynamo):
    path = write_onnx(make(), tmp_path / "model.onnx", dynamo=dynamo)
    result = prune_file(path, tmp_path / "pruned.onnx")
    assert result.figures["macs_ratio"] < 0.7, result.figures
    assert masked_error(result, tmp_path / "pruned.onnx") < 1e-4
    fresh = random_inputs(result.analysis.capture.example_inputs, batch=2, seed=6)
    oracle = outputs(consumers_masked(build_model(path), result.plan), fresh)
    assert compare(oracle, outputs(result.model, fresh)).max_rel_error < 1e-4


def test_the_pruned_file_keeps_names_opset_and_dynamic_axes(tmp_path):
    path = write_onnx(Residual(), tmp_path / "model.onnx", opset=16)
    out = tmp_path / "out"
    assert main(["prune", path, "--ratio", "0.5", "--out", str(out)]) == 0
    for name in ("dense.onnx", "pruned.onnx"):
        proto = onnx.load(str(out / name))
        assert [i.name for i in proto.graph.input] == ["images"]
        assert [o.name for o in proto.graph.output] == ["scores"]
        assert proto.opset_import[0].version == 16
        for value in (proto.graph.input[0], proto.graph.output[0]):
            assert value.type.tensor_type.shape.dim[0].dim_param == "n"
    report = json.loads((out / "report.json").read_text())
    assert report["onnx_signature"]["opset"] == 16
    assert report["input_shapes"] == [[1, 3, SIZE, SIZE]]  # from the graph, none given
    result = sp.prune(build_model(path), random_inputs([(1, 3, SIZE, SIZE)]),
                      plan=sp.Plan.load(out / "plan.json"))
    assert masked_error(result, out / "pruned.onnx", batch=3) < 1e-4  # runs at any batch


def test_a_fixed_batch_and_a_newer_opset_stay_as_they_were(tmp_path):
    path = write_onnx(Residual(), tmp_path / "model.onnx", dynamo=True, opset=21,
                      dynamic=False)
    signature = export_signature(path)
    assert signature.opset == 21 and signature.dynamic_axes == {}
    result = prune_file(path, tmp_path / "pruned.onnx")
    proto = onnx.load(str(tmp_path / "pruned.onnx"))
    assert proto.opset_import[0].version == 21
    assert [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim] == \
        [1, 3, SIZE, SIZE]
    assert masked_error(result, tmp_path / "pruned.onnx", batch=None) < 1e-4


def test_a_constant_reshape_that_flattens_follows_the_channels(tmp_path):
    """torch.export writes flatten as Reshape(allowzero=1) to the constant [-1, C*H*W]; the
    conversion makes it nn.Flatten, so the last conv's channels go, as from PyTorch."""
    path = write_onnx(Residual(), tmp_path / "model.onnx", dynamo=True)
    reshapes = [n for n in onnx.load(path).graph.node if n.op_type == "Reshape"]
    assert [a.i for n in reshapes for a in n.attribute if a.name == "allowzero"] == [1]
    x = random_inputs([(1, 3, SIZE, SIZE)])
    from_onnx = sp.prune(build_model(path), x, 0.5)
    from_torch = sp.prune(randomize(Residual().eval()), x, 0.5)
    assert from_onnx.figures["macs_pruned"] == from_torch.figures["macs_pruned"]
    assert any(isinstance(m, nn.Flatten) for m in from_onnx.model.modules())


def test_constant_sizes_keep_their_channels_and_the_plan_says_why(tmp_path):
    path = write_onnx(Shuffle(), tmp_path / "model.onnx", dynamo=True)
    result = prune_file(path, tmp_path / "pruned.onnx")
    reasons = [reason for group in result.plan.groups for reason in group.get("reasons", {})]
    assert "blocked: the target shape is a constant of the ONNX graph" in reasons
    kept = [g for g in result.plan.groups if g["kept"] < g["units"]]
    assert kept, "the first conv's channels still go"
    assert masked_error(result, tmp_path / "pruned.onnx") < 1e-4


def _tensor(name: str, *shape: int, positive: bool = False) -> onnx.TensorProto:
    values = np.random.default_rng(len(name) * 7 + sum(shape)).standard_normal(shape)
    return numpy_helper.from_array((np.abs(values) + 0.5 if positive else values * 0.3)
                                   .astype(np.float32), name)


def keras_like(path) -> str:
    """A file as tf2onnx writes a Keras model (opset 13): an NHWC input named ``input_1:0``
    transposed to NCHW, Clip(0, 6) for ReLU6, a depthwise conv, GlobalAveragePool, Squeeze
    with an axes input, a Dense layer as MatMul + Add, Softmax."""
    node = helper.make_node
    initializers = [_tensor("w1", 8, 3, 3, 3), _tensor("b1", 8), _tensor("dw", 8, 1, 3, 3),
                    _tensor("w2", 12, 8, 1, 1), _tensor("b2", 12), _tensor("dense", 12, 5),
                    _tensor("bias", 5), numpy_helper.from_array(np.float32(0), "zero"),
                    numpy_helper.from_array(np.float32(6), "six"),
                    numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    graph = helper.make_graph([
        node("Transpose", ["input_1:0"], ["nchw"], perm=[0, 3, 1, 2]),
        node("Conv", ["nchw", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1], name="conv1"),
        node("Clip", ["c1", "zero", "six"], ["r1"]),
        node("Conv", ["r1", "dw"], ["c2"], pads=[1, 1, 1, 1], group=8, name="depthwise"),
        node("Relu", ["c2"], ["r2"]),
        node("Conv", ["r2", "w2", "b2"], ["c3"], name="pointwise"),
        node("GlobalAveragePool", ["c3"], ["pooled"]),
        node("Squeeze", ["pooled", "axes"], ["features"]),
        node("MatMul", ["features", "dense"], ["logits"], name="dense/MatMul"),
        node("Add", ["logits", "bias"], ["biased"]),
        node("Softmax", ["biased"], ["Identity:0"], axis=-1)], "keras",
        [helper.make_tensor_value_info("input_1:0", TensorProto.FLOAT, ["unk__1", 16, 16, 3])],
        [helper.make_tensor_value_info("Identity:0", TensorProto.FLOAT, ["unk__1", 5])],
        initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return str(path)


def old_torch_like(path) -> str:
    """A file as PyTorch 1.x wrote one (opset 9): BatchNormalization, Dropout, and
    ``x.view(x.size(0), -1)`` as Shape -> Gather -> Unsqueeze -> Concat -> Reshape before a
    Gemm with a transposed weight."""
    node = helper.make_node
    initializers = [_tensor("w1", 8, 3, 3, 3), _tensor("gamma", 8, positive=True),
                    _tensor("beta", 8), _tensor("mean", 8), _tensor("var", 8, positive=True),
                    _tensor("w2", 6, 8, 3, 3), _tensor("fc", 4, 6 * 4 * 4), _tensor("fcb", 4)]
    graph = helper.make_graph([
        node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["n1"]),
        node("Relu", ["n1"], ["r1"]),
        node("MaxPool", ["r1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Conv", ["p1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        node("Relu", ["c2"], ["r2"]),
        node("MaxPool", ["r2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        node("Dropout", ["p2"], ["d2"], ratio=0.5),
        node("Shape", ["d2"], ["shape"]),
        node("Constant", [], ["zero"], value=numpy_helper.from_array(np.array(0, np.int64))),
        node("Gather", ["shape", "zero"], ["batch"], axis=0),
        node("Unsqueeze", ["batch"], ["batch1"], axes=[0]),
        node("Constant", [], ["rest"], value=numpy_helper.from_array(np.array([-1], np.int64))),
        node("Concat", ["batch1", "rest"], ["target"], axis=0),
        node("Reshape", ["d2", "target"], ["flat"]),
        node("Gemm", ["flat", "fc", "fcb"], ["y"], transB=1)], "torch1",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 4])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 9)]), str(path))
    return str(path)


@pytest.mark.parametrize("write", [keras_like, old_torch_like])
def test_files_other_exporters_write(tmp_path, write):
    path = write(tmp_path / "model.onnx")
    result = prune_file(path, tmp_path / "pruned.onnx")
    assert result.figures["macs_ratio"] < 0.75, result.figures  # every conv's outputs go
    signature = export_signature(path)
    proto = onnx.load(str(tmp_path / "pruned.onnx"))
    assert [i.name for i in proto.graph.input] == list(signature.input_names)
    assert proto.opset_import[0].version == signature.opset
    assert masked_error(result, tmp_path / "pruned.onnx") < 1e-4


def test_integer_constants_are_never_sliced(tmp_path):
    """torch.export writes a pooled tensor's ``as_strided`` as a Gather at offsets computed
    from an integer constant of shape [C]; coupled to nothing, those C entries would look
    like a group of channels the plan may slice."""
    node = helper.make_node
    initializers = [_tensor("w1", 8, 3, 3, 3), _tensor("w2", 8, 8, 3, 3), _tensor("fc", 4, 8),
                    numpy_helper.from_array(np.arange(8, dtype=np.int64), "offsets"),
                    numpy_helper.from_array(np.array(0, np.int64), "start"),
                    numpy_helper.from_array(np.array([-1], np.int64), "flat"),
                    numpy_helper.from_array(np.array([1, 8], np.int64), "rows")]
    graph = helper.make_graph([
        node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]), node("Relu", ["c1"], ["r1"]),
        node("Conv", ["r1", "w2"], ["c2"], pads=[1, 1, 1, 1]),
        node("GlobalAveragePool", ["c2"], ["pooled"]),
        node("Reshape", ["pooled", "flat"], ["vector"]),
        node("Add", ["offsets", "start"], ["indices"]),
        node("Gather", ["vector", "indices"], ["picked"], axis=0),
        node("Reshape", ["picked", "rows"], ["features"]),
        node("Gemm", ["features", "fc"], ["y"], transB=1)], "offsets",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializers)
    path = str(tmp_path / "model.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), path)
    result = prune_file(path, tmp_path / "pruned.onnx", exact_only=False)
    integers = {name for name, t in build_model(path).named_buffers()
                if not t.is_floating_point()}
    assert integers and not integers & {entry["name"] for entry in result.plan.params}
    assert result.figures["groups_pruned"] == 1  # the first conv's outputs
    assert masked_error(result, tmp_path / "pruned.onnx", batch=None) < 1e-4


def unconvertible(path) -> str:
    """A conv followed by Hardmax, which onnx2torch cannot convert."""
    weight = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w"], ["c"], name="conv0", pads=[1, 1, 1, 1]),
         helper.make_node("Hardmax", ["c"], ["y"], name="the_odd_one")], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])], [weight])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def test_an_unconvertible_node_is_named_in_one_line_and_nothing_is_written(tmp_path, capsys):
    path = unconvertible(tmp_path / "odd.onnx")
    out = tmp_path / "out"
    assert main(["prune", path, "--ratio", "0.5", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "'the_odd_one'" in err and "Hardmax" in err
    assert not out.exists()
    with pytest.raises(StructPruneError, match="the_odd_one"):
        build_model(f"onnx:{path}")


def test_dynamic_spatial_axes_need_an_input_shape(tmp_path, capsys):
    model = randomize(Residual().eval())
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, SIZE, SIZE),), str(path), dynamo=False,
                          input_names=["images"], output_names=["scores"],
                          dynamic_axes={"images": {0: "n", 2: "h", 3: "w"}})
    assert main(["analyze", str(path)]) == 2
    assert "--input-shape" in capsys.readouterr().err
    assert main(["analyze", str(path), "--input-shape", f"1,3,{SIZE},{SIZE}"]) == 0
    assert "exact" in capsys.readouterr().out


def test_prune_model_onnx_end_to_end(tmp_path, capsys):
    """``structprune prune model.onnx``, then ``bench`` on the folder; the spec ``onnx:PATH``
    names the same model."""
    path = write_onnx(Dense(), tmp_path / "model.onnx", dynamo=True)
    out = tmp_path / "out"
    assert main(["prune", f"onnx:{path}", "--ratio", "0.5", "--exact-only",
                 "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "verification: OK" in printed and "pruned.onnx matches torch" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["spec"] == f"onnx:{(tmp_path / 'model.onnx').resolve()}"
    assert report["macs_pruned"] < report["macs_dense"]
    result = sp.prune(build_model(path), random_inputs([(1, 3, SIZE, SIZE)]),
                      plan=sp.Plan.load(out / "plan.json"))
    assert masked_error(result, out / "pruned.onnx") < 1e-4
    assert main(["bench", str(out), "--batch", "1", "--threads", "1", "--repeats", "3",
                 "--warmup", "1", "--no-torch", "--no-openvino"]) == 0
    assert "pruned" in capsys.readouterr().out
