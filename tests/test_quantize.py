"""INT8: the quantized file against the FP32 model, the layers left in FP32 by measurement,
the CLI paths (quantize, prune --quantize int8, bench with INT8 rows) and the refusals."""

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.nn as nn

from structprune.config import QuantizeConfig
from structprune.deploy import bench
from structprune.deploy.quantize import (
    OnnxModel,
    QuantizeError,
    int8_path,
    nncf_available,
    quantize_onnx,
    rank_activations,
)
from structprune.errors import PlanError
from structprune.front.cli import main

from .fixtures import TINY


def run(*args):
    return main([str(a) for a in args])


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """BN statistics, affine parameters and biases away from their identity defaults."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def _export(model: nn.Module, path, shape=(2, 3, 16, 16)) -> None:
    torch.onnx.export(model.eval(), (torch.randn(*shape),), str(path), dynamo=False,
                      input_names=["input"], dynamic_axes={"input": {0: "batch"}},
                      opset_version=18)


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _batches(count: int, size: int = 16, shape=(3, 16, 16), seed: int = 0, classes=None):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        x = torch.randn(size, *shape, generator=g)
        out.append(x if classes is None else (x, torch.randint(0, classes, (size,), generator=g)))
    return out


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return _randomise(nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 24, 3, padding=1), nn.BatchNorm2d(24), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(24, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10)))


def test_int8_file_is_close_to_the_torch_model_and_leaves_fp32_alone(tmp_path):
    model = _small_cnn()
    fp32 = tmp_path / "m.onnx"
    _export(model, fp32)
    before = _digest(fp32)
    record = quantize_onnx(fp32, _batches(4), QuantizeConfig(samples=48))
    int8 = tmp_path / "m.int8.onnx"
    assert record["file"] == "m.int8.onnx" and int8.is_file() and _digest(fp32) == before
    assert record["calibration"] == {"method": "minmax", "samples": 48}
    assert record["excluded"] == [] and record["drop"] is None and record["trials"] == []
    # the file is QDQ with per-channel weight scales: one scale per output channel
    graph = onnx.load(str(int8)).graph
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer}
    weight_scales = [inits[n.input[1]] for n in graph.node if n.op_type == "DequantizeLinear"
                     and n.input[0] in inits and inits[n.input[0]].dtype == np.int8
                     and inits[n.input[0]].ndim == 4]
    assert sorted(s.size for s in weight_scales) == [16, 24, 32]
    # its outputs against torch's own (the FP32 reference, independent of ONNX Runtime)
    x = torch.randn(32, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        want = model(x).numpy()
    session = ort.InferenceSession(str(int8), providers=["CPUExecutionProvider"])
    got = session.run(None, {"input": x.numpy()})[0]
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert 1e-4 < rel < 0.05  # quantized (not a copy), and close
    assert np.mean(got.argmax(1) == want.argmax(1)) >= 0.9
    assert OnnxModel(int8)(x).numpy() == pytest.approx(got)


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_calibration_methods(tmp_path, method):
    model = _small_cnn()
    fp32 = tmp_path / "m.onnx"
    _export(model, fp32)
    record = quantize_onnx(fp32, _batches(2), QuantizeConfig(method=method, samples=16),
                           out=tmp_path / "q.onnx")
    assert record["calibration"]["method"] == method and (tmp_path / "q.onnx").is_file()
    x = torch.randn(8, 3, 16, 16)
    with torch.no_grad():
        want = model(x).numpy()
    got = OnnxModel(tmp_path / "q.onnx")(x).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 0.1


class HugeChannel(nn.Module):
    """Channel 0 of ``b``'s output is 1000 times the others, and ``c`` scales it back: with
    one range for the whole tensor, INT8 rounds the other channels of that activation away."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            self.b.weight[0] *= 1000
            self.b.bias[0] *= 1000
            self.c.weight[:, 0] /= 1000

    def forward(self, x):
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.c(x))
        return self.fc(x.mean((2, 3)))


def test_the_layers_around_a_hard_activation_are_found_and_left_in_fp32(tmp_path):
    model = HugeChannel().eval()
    fp32 = tmp_path / "h.onnx"
    _export(model, fp32)
    val = torch.randn(64, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        want = model(val).numpy()

    def drop(path):  # percent relative output error against torch, numpy only
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
            None, {"input": val.numpy()})[0]
        return 100 * np.linalg.norm(got - want) / np.linalg.norm(want)

    plain = quantize_onnx(fp32, _batches(2), QuantizeConfig(samples=32), drop=drop,
                          out=tmp_path / "plain.onnx")
    assert plain["drop"] == pytest.approx(drop(tmp_path / "plain.onnx")) and plain["drop"] > 5
    # the activation between b and c is the noisiest by its channels' signal to noise
    ranked = rank_activations(tmp_path / "plain.onnx", [{"input": val[:8].numpy()}])
    assert ranked[0][0] == "/Relu_1_output_0"
    record = quantize_onnx(fp32, _batches(2), QuantizeConfig(samples=32, max_drop=1.0),
                           drop=drop)
    assert record["met"] and record["drop"] <= 1.0
    assert record["drop"] == pytest.approx(drop(int8_path(fp32)), rel=1e-6)
    assert {"/b/Conv", "/c/Conv"} <= set(record["excluded"])
    assert "/a/Conv" not in record["excluded"]
    assert record["trials"][0] == {"excluded": [], "drop": plain["drop"], "why": "all"}
    # the nodes left out run in FP32: the weights of b and c are not quantized, a's are
    graph = onnx.load(str(int8_path(fp32))).graph
    dequantized = [n.input[0] for n in graph.node if n.op_type == "DequantizeLinear"]
    assert [name.split("_")[0] for name in dequantized if ".weight" in name] == ["a.weight",
                                                                              "fc.weight"]


def test_a_max_drop_already_met_leaves_every_layer_quantized(tmp_path):
    model = _small_cnn()
    fp32 = tmp_path / "m.onnx"
    _export(model, fp32)
    calls = []

    def drop(path):
        calls.append(path)
        return 0.25

    record = quantize_onnx(fp32, _batches(2), QuantizeConfig(samples=16, max_drop=0.5),
                           drop=drop)
    assert len(calls) == 1 and record["excluded"] == [] and record["met"]


def _labelled_data(tmp_path, labelled=True):
    path = tmp_path / "data5.py"
    path.write_text(
        "import torch\n\n\n"
        "def make():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    def batch():\n"
        "        x = torch.randn(16, 3, 16, 16, generator=g)\n"
        f"        return (x, torch.randint(0, 5, (16,), generator=g)) if {labelled} else x\n"
        "    return [batch() for _ in range(4)], [batch() for _ in range(3)]\n")
    return f"{path}:make"


def _ort_accuracy(path, batches):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    hits = [session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].argmax(1) == y.numpy()
            for x, y in batches]
    return float(np.mean(np.concatenate(hits)))


def test_prune_with_quantize_writes_both_int8_files_and_the_report_block(tmp_path, capsys):
    data = _labelled_data(tmp_path)
    out = tmp_path / "run"
    assert run("prune", TINY, "--ratio", "0.5", "--out", out, "--input-shape", "1,3,16,16",
               "--exporter", "torchscript", "--data", data, "--quantize", "int8",
               "--calibration-samples", "32") == 0
    printed = capsys.readouterr().out
    assert (out / "dense.int8.onnx").is_file() and (out / "pruned.int8.onnx").is_file()
    block = json.loads((out / "report.json").read_text())["quantize"]
    assert block["settings"]["samples"] == 32 and block["settings"]["runtime"] == "ort-cpu"
    import importlib.util
    spec = importlib.util.spec_from_file_location("data5", tmp_path / "data5.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    val = module.make()[1]
    for name in ("dense", "pruned"):
        r = block["models"][name]
        assert r["file"] == f"{name}.int8.onnx" and r["calibration"]["samples"] == 32
        # accuracy through the runtime, against a direct count over the same batches
        assert r["int8_metrics"]["accuracy"] == pytest.approx(
            _ort_accuracy(out / f"{name}.int8.onnx", val))
        assert r["fp32_metrics"]["accuracy"] == pytest.approx(
            _ort_accuracy(out / f"{name}.onnx", val))
        assert r["fidelity"]["samples"] == 48 and 0 < r["fidelity"]["rel_error"]["output0"] < 0.1
        assert r["latency"]["recommended"] in (f"{name}.onnx", f"{name}.int8.onnx")
        assert f"{name}.int8.onnx: accuracy" in printed
    # eval measures the INT8 files too
    assert run("eval", out, "--data", data) == 0
    printed = capsys.readouterr().out
    found = json.loads((out / "eval.json").read_text())
    for name in ("dense", "pruned"):
        assert found[f"{name}_int8"]["accuracy"] == pytest.approx(
            _ort_accuracy(out / f"{name}.int8.onnx", val))
        assert f"{name}.int8.onnx: top-1 accuracy" in printed


def test_quantize_command_on_unlabelled_data_then_bench_times_four_models(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("prune", TINY, "--ratio", "0.5", "--out", out, "--input-shape", "1,3,16,16",
               "--exporter", "torchscript") == 0
    digests = {n: _digest(out / f"{n}.onnx") for n in ("dense", "pruned")}
    assert run("quantize", out, "--data", _labelled_data(tmp_path, labelled=False),
               "--calibration-samples", "16", "--max-drop", "100") == 0
    printed = capsys.readouterr().out
    assert "top-1 agreement with FP32" in printed
    report = json.loads((out / "report.json").read_text())
    r = report["quantize"]["models"]["pruned"]
    assert "int8_metrics" not in r and r["fidelity"]["top1_agreement"] is not None
    assert r["trials"][0]["drop"] == pytest.approx(100 * (1 - r["fidelity"]["top1_agreement"]))
    assert {n: _digest(out / f"{n}.onnx") for n in ("dense", "pruned")} == digests
    assert run("eval", out, "--data", _labelled_data(tmp_path, labelled=False)) == 0
    assert "pruned.int8.onnx: top-1 agreement with pruned.onnx" in capsys.readouterr().out
    fidelity = json.loads((out / "eval.json").read_text())["pruned_int8"]["fidelity_to_fp32"]
    assert fidelity["top1_agreement"] == r["fidelity"]["top1_agreement"]  # same files, batches
    assert fidelity["rel_error"]["output0"] == pytest.approx(r["fidelity"]["rel_error"]["output0"])
    assert run("bench", out, "--batch", "1", "--threads", "1", "--repeats", "3",
               "--warmup", "1") == 0
    cell = json.loads((out / "bench.json").read_text())["cells"][0]
    for name in ("dense", "pruned"):
        assert len(cell[f"{name}_int8_ms"]["runs"]) == 3
        assert cell["recommended"][name] in (f"{name}.onnx", f"{name}.int8.onnx")
    assert "pruned INT8 ms" in (out / "bench.md").read_text()


def test_bench_leaves_out_an_int8_file_older_than_its_fp32_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert run("prune", TINY, "--ratio", "0.5", "--out", out, "--input-shape", "1,3,16,16",
               "--exporter", "torchscript") == 0
    (out / "pruned.int8.onnx").write_bytes((out / "pruned.onnx").read_bytes())
    import os
    os.utime(out / "pruned.int8.onnx", (1, 1))
    assert run("bench", out, "--batch", "1", "--threads", "1", "--repeats", "3",
               "--warmup", "0") == 0
    assert "pruned.int8.onnx is older than pruned.onnx" in capsys.readouterr().out
    assert "pruned_int8_ms" not in json.loads((out / "bench.json").read_text())["cells"][0]


def test_the_guard_keeps_fp32_where_int8_is_slower():
    cell = bench.Cell("ort-cpu", 1, 1, [10, 10, 10], [5, 5, 5],
                      {"dense": [4, 4, 4], "pruned": [6, 6, 6]}).to_json(ideal=2.0)
    assert cell["dense_int8_speedup"] == pytest.approx(2.5)
    assert cell["pruned_int8_speedup"] == pytest.approx(10 / 6)
    assert cell["int8_over_fp32"] == pytest.approx({"dense": 2.5, "pruned": 5 / 6})
    assert cell["recommended"] == {"dense": "dense.int8.onnx", "pruned": "pruned.onnx"}
    text = "\n".join(bench.int8_lines([cell]))
    assert "pruned INT8 is not faster than FP32 (0.83x): keep pruned.onnx" in text
    assert "dense INT8 is not faster" not in text


def _folder_of(tmp_path, model, shape=(1, 3, 16, 16)):
    """A run folder with report.json and both ONNX files of ``model``."""
    out = tmp_path / "folder"
    out.mkdir()
    (out / "report.json").write_text(json.dumps({"spec": "x", "input_shapes": [list(shape)]}))
    for name in ("dense", "pruned"):
        _export(model, out / f"{name}.onnx", (2, *shape[1:]))
    return out


class NothingToQuantize(nn.Module):
    def forward(self, x):
        return torch.exp(-x.abs()).sum(dim=(2, 3))


@pytest.mark.parametrize("case", ["no data", "unknown runtime", "unknown method",
                                  "negative drop", "openvino", "nothing quantizable",
                                  "corrupt file"])
def test_bad_input_gets_one_line_exit_2_and_leaves_fp32_alone(tmp_path, capsys, case):
    if case == "openvino" and nncf_available():
        pytest.skip("nncf and openvino are installed here")
    model = NothingToQuantize() if case == "nothing quantizable" else _small_cnn()
    out = _folder_of(tmp_path, model)
    if case == "corrupt file":
        (out / "pruned.onnx").write_text("garbage")
    digests = {n: _digest(out / f"{n}.onnx") for n in ("dense", "pruned")}
    data = _labelled_data(tmp_path, labelled=False)
    extra = {"no data": [], "unknown runtime": ["--quantize-runtime", "tensorflow"],
             "unknown method": ["--calibration-method", "magic"],
             "negative drop": ["--max-drop", "-1"],
             "openvino": ["--quantize-runtime", "openvino-cpu"]}.get(case)
    args = ["quantize", out, *(extra if extra is not None else []),
            *([] if case == "no data" else ["--data", data])]
    assert run(*args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err
    expected = {"no data": "quantize needs --data", "unknown runtime": "unknown quantize runtime",
                "unknown method": "unknown calibration method", "negative drop": "--max-drop",
                "openvino": "pip install nncf", "nothing quantizable": "nothing in dense.onnx",
                "corrupt file": "cannot load"}[case]
    assert expected in err
    assert {n: _digest(out / f"{n}.onnx") for n in ("dense", "pruned")} == digests
    assert not list(out.glob("*.int8.onnx"))
    assert not list(out.glob(".*tmp*"))


@pytest.mark.parametrize("args, message", [
    (["--quantize", "int8"], "--quantize int8 calibrates on the data's inputs: pass --data"),
    (["--max-drop", "1"], "--max-drop is an INT8 setting: add --quantize int8"),
    (["--quantize", "int8", "--no-onnx", "--data", "digits"], "drop --no-onnx"),
    (["--quantize", "int8", "--quantize-runtime", "tpu", "--data", "digits"],
     "unknown quantize runtime"),
])
def test_prune_refuses_bad_quantize_flags_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    assert run("prune", TINY, "--ratio", "0.5", "--out", out, "--input-shape", "1,3,16,16",
               *args) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and not out.exists()


def test_quantize_config_checks_its_numbers():
    with pytest.raises(PlanError, match="calibration-samples 0"):
        QuantizeConfig(samples=0)
    with pytest.raises(PlanError, match="unknown --quantize 'int4'"):
        QuantizeConfig(precision="int4")
    with pytest.raises(QuantizeError, match="is missing"):
        quantize_onnx("/nonexistent/m.onnx", _batches(1))


# a speed target in INT8: the pruned model quantized, timed against the dense one in FP32


def test_an_int8_target_times_quantized_layers_and_candidates(tmp_path):
    from structprune.deploy import latency, runtimes, speed

    int8 = runtimes.make_target("ort-cpu", 1, 1, int8=True)
    shape = latency.LayerShape("conv2d", (16, 8, 8), 16, 24, (3, 3), (1, 1), (1, 1), (1, 1), 1)
    assert int8.dtype == "int8" and shape.key(int8) != shape.key(runtimes.Target("ort-cpu", 1))
    assert latency.probe_ms(int8, latency.PROBES[nn.Conv2d], shape) > 0
    with pytest.raises(runtimes.RuntimeUnavailable, match="INT8 is timed on ort-cpu"):
        runtimes.make_target("ort-cuda", int8=True)
    model = _small_cnn()
    x = (torch.randn(1, 3, 16, 16),)
    measure = speed.Measurer(int8, model, x, tmp_path, repeats=3, warmup=0)
    dense_ms, candidate_ms = measure(model, model)
    assert len(dense_ms) == len(candidate_ms) == 3

    def ops(path):
        return {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "QuantizeLinear" not in ops(tmp_path / "model_0.onnx")  # dense: FP32
    assert "QuantizeLinear" in ops(tmp_path / "model_1.onnx")  # the candidate: INT8


def test_an_int8_goal_is_calibrated_on_the_dense_model_in_int8(tmp_path):
    import math

    import structprune as sp
    from structprune.config import TargetConfig
    from structprune.core.counts import count_macs
    from structprune.deploy import latency, runtimes, speed

    from .fixtures import small_vgg

    x = torch.randn(1, 3, 16, 16)
    dense_macs = count_macs(sp.capture(small_vgg(), (x,)))
    measured = []

    def timer(dense, pruned):  # dense FP32 10 ms; any candidate in INT8 runs 4x faster
        d = [10.0] * 9
        if pruned is None:
            return d, d
        ratio = count_macs(sp.capture(pruned, (x,))) / dense_macs
        measured.append(ratio)
        return d, [2.5 * ratio] * 9

    def fake(target, probe, shape):  # a layer's MACs
        spatial = math.prod(shape.input_shape[1:]) if shape.op == "conv2d" else 1
        taps = math.prod(shape.kernel) if shape.kernel else 1
        return shape.cin // shape.groups * shape.cout * taps * spatial * 1e-6

    table = latency.LatencyTable(runtimes.Target("ort-cpu", 1, 1, int8=True), tmp_path,
                                 measure=fake, progress=False)
    result = speed.prune_for_target(small_vgg().eval(), (x,),
                                    TargetConfig("ort-cpu", 1, 1, speedup=8.0, quantize=True),
                                    timer=timer, table=table)
    t = result.figures["target"]
    assert measured[0] == 1.0  # first, the dense model itself in INT8
    assert t["met"] and t["measured"]["speedup"] >= 8 * 0.95 and t["target"]["int8"]
    lm = t["latency_model"]
    assert lm["dtype"] == "int8" and lm["dense_fp32_ms"] == 10.0
    assert lm["dense_measured_ms"] == 2.5  # the prediction's yardstick: dense in INT8
    assert result.figures["macs_ratio"] == pytest.approx(10 / 8 / 2.5, rel=0.15)


def test_an_int8_target_and_the_quantize_settings_agree():
    from structprune.config import PruneConfig, RunConfig, TargetConfig

    run = RunConfig(quantize=QuantizeConfig(runtime="openvino-cpu"))
    with pytest.raises(PlanError, match="is not --target ort-cpu"):
        run.check(PruneConfig(), TargetConfig("ort-cpu", quantize=True), data_given=True)
    with pytest.raises(PlanError, match="set both or neither"):
        RunConfig(quantize=QuantizeConfig()).check(PruneConfig(), TargetConfig("ort-cpu"),
                                                   data_given=True)
