"""Pruning to a speed (#17): the latency table's cache, the width search against a brute-force
optimum, the latency model's layer shapes against the pruned modules, the never-slower
guarantee and speed goals with fake timers, the command line's errors, OpenVINO in bench.
No real timing is asserted outside the ``timing`` group (run by hand)."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torchvision

import structprune as sp
from structprune.config import TargetConfig
from structprune.core.counts import count_macs
from structprune.deploy import bench, latency, runtimes, speed
from structprune.deploy.export import export_onnx
from structprune.deploy.latency import LatencyModel, LatencyTable, LayerShape
from structprune.deploy.runtimes import Target
from structprune.deploy.widths import Choice, WidthPath, fast_keeps, grid, search, snap
from structprune.front.cli import main

from .fixtures import TINY, small_vgg

ORT1 = Target("ort-cpu", threads=1)
CONV = LayerShape("conv2d", (16, 8, 8), 16, 24, (3, 3), (1, 1), (1, 1), (1, 1), 1)


class FakeMeasure:
    """A layer's 'latency': its MACs, 40% more when its output channels are not a multiple
    of 8 (an odd width off the fast kernels). Counts the layers it is asked to time."""

    def __init__(self):
        self.calls = []

    def __call__(self, target, probe, shape):
        self.calls.append(shape)
        spatial = math.prod(shape.input_shape[1:]) if shape.op == "conv2d" else 1
        taps = math.prod(shape.kernel) if shape.kernel else 1
        macs = shape.cin // shape.groups * shape.cout * taps * spatial
        return macs * 1e-6 * (1.4 if shape.cout % 8 else 1.0) * target.batch


# the table's cache


def test_cache_miss_then_hit_across_tables(tmp_path):
    fake = FakeMeasure()
    table = LatencyTable(ORT1, tmp_path, measure=fake, progress=False)
    other = LayerShape("linear", (64,), 64, 10)
    table.ensure([(None, CONV), (None, other), (None, CONV)])
    assert len(fake.calls) == 2 and table.measured == 2  # the repeat is measured once
    want = FakeMeasure()(ORT1, None, CONV)
    assert table.ms(None, CONV) == want and table.hits == 1

    again = LatencyTable(ORT1, tmp_path, measure=fake, progress=False)  # a new process
    assert again.loaded == 2
    again.ensure([(None, CONV), (None, other)])
    assert len(fake.calls) == 2 and again.measured == 0
    assert again.ms(None, CONV) == want
    # another batch or thread count is another key: measured, not looked up
    LatencyTable(Target("ort-cpu", threads=2), tmp_path, measure=fake,
                 progress=False).ensure([(None, CONV)])
    assert len(fake.calls) == 3


def test_cache_is_invalidated_by_another_runtime_or_machine(tmp_path, monkeypatch):
    fake = FakeMeasure()
    table = LatencyTable(ORT1, tmp_path, measure=fake, progress=False)
    table.ensure([(None, CONV)])
    stored = json.loads(table.path.read_text())
    assert stored["fingerprint"]["runtime"] == "ort-cpu" and len(stored["entries"]) == 1

    # another runtime: another file, nothing reused
    monkeypatch.setattr(latency, "fingerprint",
                        lambda target: {**runtimes.fingerprint(ORT1), "runtime": target.runtime})
    ov = LatencyTable(Target("openvino-cpu", threads=1), tmp_path, measure=fake, progress=False)
    assert ov.path != table.path and ov.loaded == 0
    ov.ensure([(None, CONV)])
    assert len(fake.calls) == 2

    # another machine: the file written here is not read there ...
    monkeypatch.setattr(latency, "fingerprint",
                        lambda target: {**runtimes.fingerprint(target), "cpu": "Other CPU"})
    elsewhere = LatencyTable(ORT1, tmp_path, measure=fake, progress=False)
    assert elsewhere.path != table.path and elsewhere.loaded == 0
    monkeypatch.undo()
    # ... and a file copied in from another machine under this name is ignored and rebuilt
    stored["fingerprint"]["cpu"] = "Other CPU"
    table.path.write_text(json.dumps(stored))
    rebuilt = LatencyTable(ORT1, tmp_path, measure=fake, progress=False)
    assert rebuilt.loaded == 0
    rebuilt.ensure([(None, CONV)])
    assert len(fake.calls) == 3
    assert json.loads(table.path.read_text())["fingerprint"] == runtimes.fingerprint(ORT1)


def test_cache_dir_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("STRUCTPRUNE_CACHE", str(tmp_path / "c"))
    table = LatencyTable(ORT1, measure=FakeMeasure(), progress=False)
    table.ensure([(None, CONV)])
    assert table.path.parent == tmp_path / "c" and table.path.is_file()


def test_a_real_probe_times_the_layer_alone():
    """One real ONNX Runtime probe: the one-layer model computes conv + ReLU (checked against
    torch), and its time is positive."""
    import onnxruntime as ort

    probe = latency.PROBES[nn.Conv2d]
    blob = probe.onnx(CONV, 2)
    session = ort.InferenceSession(blob, providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((2, 16, 8, 8)).astype(np.float32)
    got = session.run(None, {"x": x})[0]
    import onnx
    from onnx import numpy_helper

    weight = numpy_helper.to_array(onnx.load_from_string(blob).graph.initializer[0])
    want = torch.relu(torch.nn.functional.conv2d(torch.from_numpy(x), torch.from_numpy(weight),
                                                 padding=1)).numpy()
    assert got.shape == (2, 24, 8, 8) and np.allclose(got, want, atol=1e-4)
    assert latency.probe_ms(ORT1, probe, CONV) > 0


def _conv_chain_onnx(n: int) -> bytes:
    """``n`` 32-channel 3x3 convolutions with ReLU, one after another, at 32x32."""
    chain = nn.Sequential(*[m for _ in range(n) for m in (nn.Conv2d(32, 32, 3, padding=1),
                                                           nn.ReLU())]).eval()
    import io

    buffer = io.BytesIO()
    torch.onnx.export(chain, (torch.randn(1, 32, 32, 32),), buffer, dynamo=False,
                      input_names=["x"], opset_version=17)
    return buffer.getvalue()


@pytest.mark.timing  # a ratio of measured kernel times
@pytest.mark.parametrize("runtime", ["ort-cpu", "openvino-cpu"])
def test_kernel_times_count_the_layers_work_only(runtime):
    """The profiler's kernel time of a chain of four convolutions is about four times that of
    one (the call overhead and layout reorders, paid once per call, are left out); one
    convolution's kernel time is below its wall-clock time; ``before_run`` runs before each
    run."""
    if runtime == "openvino-cpu":
        pytest.importorskip("openvino")
    target = Target(runtime, threads=1)
    shapes = [(1, 32, 32, 32)]
    one_conv, four_convs = _conv_chain_onnx(1), _conv_chain_onnx(4)
    calls = []
    # rounds alternate, and each model's fastest run is compared, so that a spell of load
    # on a shared machine falls on both models or on neither
    one_runs, four_runs = [], []
    for _ in range(3):
        one_runs += target.onnx_kernel_ms(one_conv, shapes, 10, lambda: calls.append(1))[2:]
        four_runs += target.onnx_kernel_ms(four_convs, shapes, 10)[2:]
    assert len(calls) == 30
    one, four = min(one_runs), min(four_runs)
    assert 3.0 < four / one < 5.0, (one, four)
    wall = latency.time_runner(target.onnx_runner(one_conv, shapes), min_runs=30)
    assert one < wall, (one, wall)
    with pytest.raises(ValueError, match="wall clock"):
        Target("ort-cuda").onnx_kernel_ms(one_conv, shapes, 1)


# the latency model: layer shapes at a removal are the pruned modules' shapes


@pytest.mark.parametrize("build,shape", [(small_vgg, (1, 3, 16, 16)),
                                         (torchvision.models.mobilenet_v2, (1, 3, 32, 32))])
def test_latency_model_shapes_equal_the_pruned_modules(tmp_path, build, shape):
    model = build().eval()
    x = (torch.randn(shape),)
    result = sp.prune(model, x, 0.37, check=False)
    analysis = result.analysis
    lm = LatencyModel(analysis, LatencyTable(ORT1, tmp_path, measure=FakeMeasure(),
                                             progress=False))
    assert lm.layers and lm.summary()["macs_covered"] == 1.0
    removed = analysis.removed_components(result.plan.params)
    shapes = lm.shapes(lm.kept(removed))
    modules = dict(result.model.named_modules())
    checked = 0
    for layer, (_, s) in zip(lm.layers, shapes, strict=True):
        module = modules[layer.weight.rsplit(".", 1)[0]]
        if isinstance(module, nn.Conv2d):
            assert (s.cin, s.cout, s.groups) == (module.in_channels, module.out_channels,
                                                 module.groups)
        else:
            assert (s.cin, s.cout) == (module.in_features, module.out_features)
        checked += 1
    assert checked == len(lm.layers)
    assert any(s.groups > 1 for _, s in shapes) == (build is not small_vgg)
    # the prediction is the sum of the table's entries at those shapes
    fake = FakeMeasure()
    assert lm.predict(removed) == pytest.approx(sum(fake(ORT1, p, s) for p, s in shapes))


# the width search on a fake latency table with a known optimum


class TableEvaluator:
    """Two groups, A (8 units) and B (8 units); layer 1 reads A's width, layer 2 reads both.
    A at 7 is *slower* than at 8 (an odd width), A at 6 much faster."""

    LAYER1 = {8: 10.0, 7: 10.5, 6: 6.0, 5: 6.0, 4: 4.0}

    def total(self, keep):
        a, b = keep["A"], keep["B"]
        return self.LAYER1[a] + 0.5 * a * b / 8

    def delta(self, keep, group, new):
        return self.total({**keep, group: new}) - self.total(keep)

    def prepare(self, keep, moves):
        pass


def _brute_force(choices, evaluator, goal):
    best = None
    for combo in itertools.product(*[range(len(c.keeps)) for c in choices]):
        keep = {c.group: c.keeps[i] for c, i in zip(choices, combo, strict=True)}
        lost = sum(c.lost[i] for c, i in zip(choices, combo, strict=True))
        if evaluator.total(keep) <= goal and (best is None or lost < best[1] - 1e-12):
            best = (keep, lost)
    return best


def test_fast_widths_are_those_faster_than_every_wider_one():
    ms = {8: 0.0, 7: 0.5, 6: -4.0, 5: -4.0, 4: -6.0}
    assert fast_keeps([8, 7, 6, 5, 4], ms, margin=0.0) == [8, 6, 4]
    assert fast_keeps([8, 7, 6, 5, 4], ms, margin=2.5) == [8, 6]
    assert grid(64, 1, 8, 8) == [64, 56, 48, 40, 32, 24, 16, 8]
    assert grid(512, 1, 1, 8) == list(range(512, 0, -32))  # coarsened to 16 candidates
    assert grid(30, 1, 3, 8) == [30, 24, 16, 8]
    assert snap(45, [64, 48, 32]) == 48 and snap(40, [64, 48, 32]) == 48
    assert snap(45, [64, 48, 32], down=True) == 32 and snap(5, [64, 32], down=True) == 32


@pytest.mark.parametrize("goal", [13.0, 11.0, 9.5, 8.0, 7.0])
def test_width_search_finds_the_known_optimum(goal):
    evaluator = TableEvaluator()
    # per-unit importance: A's units matter more than B's, so a MACs-greedy or one-step
    # search would narrow B first; A's 8 -> 7 step saves nothing on its own
    a_scores = [0.2, 0.3, 0.6, 0.6]
    b_scores = [0.1, 0.15, 0.4, 0.9]
    choices = [Choice("A", [8, 7, 6, 5, 4], [0.0, *np.cumsum(a_scores)]),
               Choice("B", [8, 7, 6, 5, 4], [0.0, *np.cumsum(b_scores)])]
    known = _brute_force(choices, evaluator, goal)
    got = search(WidthPath(choices, evaluator), goal)
    assert known is not None and got is not None
    assert evaluator.total(got.keep) <= goal
    assert got.lost == pytest.approx(known[1]), (got.keep, known)


def test_width_search_says_when_the_goal_is_out_of_reach():
    evaluator = TableEvaluator()
    choices = [Choice("A", [8, 6, 4], [0.0, 1.0, 2.0]), Choice("B", [8, 4], [0.0, 1.0])]
    path = WidthPath(choices, evaluator)
    assert search(path, 1.0) is None
    assert path.fastest().keep == {"A": 4, "B": 4}
    assert path.fastest().ms == pytest.approx(evaluator.total({"A": 4, "B": 4}))


# prune_for_target with a fake table and fake timers


def _macs_timer(base_ms=10.0, slower=False, odd_penalty=False):
    """Milliseconds proportional to MACs (the pruned model's recounted), or pruned always 5%
    slower than dense with ``slower``."""
    calls = []

    def timer(dense, pruned):
        dense_macs = count_macs(sp.capture(dense, (torch.randn(1, 3, 16, 16),)))
        d = [base_ms] * 9
        if pruned is None:
            return d, d
        macs = count_macs(sp.capture(pruned, (torch.randn(1, 3, 16, 16),)))
        calls.append(macs / dense_macs)
        ms = base_ms * 1.05 if slower else base_ms * macs / dense_macs
        return d, [ms] * 9
    timer.calls = calls
    return timer


def _table(tmp_path):
    return LatencyTable(ORT1, tmp_path, measure=FakeMeasure(), progress=False)


def _ort1(**goal):
    """ORT1 as a speed target, with ``goal`` (speedup, latency_ms, if_slower)."""
    return TargetConfig(ORT1.runtime, ORT1.threads, ORT1.batch, **goal)


def test_speed_goal_is_met_and_recorded(tmp_path):
    timer = _macs_timer()
    result = speed.prune_for_target(small_vgg().eval(), (torch.randn(1, 3, 16, 16),),
                                    _ort1(speedup=2.0), timer=timer, table=_table(tmp_path))
    t = result.figures["target"]
    assert t["met"] and t["mode"] == "speedup" and t["measured"]["speedup"] >= 2.0 * 0.95
    # of the attempts that met the goal, the one losing least importance (the widest) won
    met = [a for a in t["attempts"] if a["speedup"] >= 1.9]
    assert t["measured"]["speedup"] == min(a["speedup"] for a in met)
    assert t["measured"]["speedup"] == pytest.approx(1 / result.figures["macs_ratio"])
    assert result.verification.ok
    # every kept width is one the table called fast, and a multiple of 8 where pruned
    for g in t["widths"].values():
        assert g["kept"] in g["fast"]
        assert g["kept"] == g["fast"][0] or g["kept"] % 8 == 0
    lm = t["latency_model"]
    assert lm["dense_measured_ms"] == 10.0 and lm["pruned_measured_ms"] == t["measured"]["pruned_ms"]


def test_unreachable_goal_says_so(tmp_path):
    with pytest.raises(speed.TargetError, match="cannot be reached"):
        speed.prune_for_target(small_vgg().eval(), (torch.randn(1, 3, 16, 16),),
                               _ort1(speedup=500.0), timer=_macs_timer(),
                               table=_table(tmp_path), attempts=2)


def test_never_slower_refuses_a_slower_model(tmp_path):
    model, x = small_vgg().eval(), (torch.randn(1, 3, 16, 16),)
    with pytest.raises(speed.SlowerError, match="not faster than dense"):
        speed.prune_for_target(model, x, _ort1(if_slower="fail"), ratio=0.3,
                               timer=_macs_timer(slower=True), table=_table(tmp_path))
    # fix cannot help when every width measures slower: refused too, after trying
    timer = _macs_timer(slower=True)
    with pytest.raises(speed.SlowerError, match="even at narrower"):
        speed.prune_for_target(model, x, _ort1(), ratio=0.3, timer=timer,
                               table=_table(tmp_path), attempts=2)
    assert len(timer.calls) == 3  # the ratio's model, then two narrower ones


def test_never_slower_fixes_by_width_choice(tmp_path):
    """A timer under which the ratio's widths are slower than dense (a 10 ms overhead per
    pruned layer whose width is not a multiple of 16) but narrower fast widths are not."""
    model, x = small_vgg().eval(), (torch.randn(1, 3, 16, 16),)
    calls = []

    def timer(dense, pruned):
        if pruned is None:
            return [10.0] * 5, [10.0] * 5
        convs = [m for m in pruned.modules() if isinstance(m, nn.Conv2d)]
        odd = sum(c.out_channels % 16 != 0 for c in convs)
        ms = 10.0 * count_macs(sp.capture(pruned, x)) / \
            count_macs(sp.capture(dense, x)) + 10.0 * odd
        calls.append(ms)
        return [10.0] * 5, [ms] * 5

    result = speed.prune_for_target(model, x, _ort1(), ratio=0.2, timer=timer,
                                    table=_table(tmp_path), round_to=16)
    t = result.figures["target"]
    assert calls[0] >= 10.0 and t["measured"]["pruned_ms"] < 10.0 and t["faster"]
    assert len(t["attempts"]) == len(calls) >= 2
    assert t["attempts"][-1]["what"].startswith("fix")


# the command line


def _run(*args):
    return main([str(a) for a in args])


@pytest.mark.parametrize("args,message", [
    (["--ratio", "0.5", "--target", "nosuch"], "unknown target 'nosuch'"),
    (["--target-speedup", "2"], "add --target"),
    (["--ratio", "0.5", "--threads", "2"], "add --target"),
    (["--target", "ort-cpu", "--target-speedup", "0.5"], "must be above 1"),
    (["--target", "ort-cpu", "--target-latency", "-1"], "positive number"),
    (["--target", "ort-cpu", "--ratio", "0.5", "--threads", "0"], "--threads 0"),
    (["--target", "ort-cpu", "--ratio", "0.5", "--batch", "0"], "--batch 0"),
    (["--target", "ort-cpu", "--target-speedup", "2", "--ratio", "0.3"], "not 2"),
    (["--target", "ort-cpu", "--target-speedup", "2", "--round-to", "auto"], "give --ratio"),
    (["--target", "ort-cuda", "--ratio", "0.5"], "CUDAExecutionProvider"),
])
def test_cli_target_errors_are_one_line(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert _run("prune", TINY, "--input-shape", "1,3,16,16", "--out", out, *args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1 and not out.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
@pytest.mark.parametrize("runtime", ["torch-cuda-fp16", "torch-cuda-fp32"])
def test_cli_gpu_target_without_a_gpu(tmp_path, capsys, runtime):
    assert _run("prune", TINY, "--ratio", "0.5", "--target", runtime, "--out",
                tmp_path / "o") == 2
    err = capsys.readouterr().err.strip()
    assert "needs a CUDA GPU" in err and len(err.splitlines()) == 1


def test_cli_refuses_a_slower_model_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STRUCTPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(latency, "probe_ms", FakeMeasure())

    class Slower:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, dense, pruned):
            return [10.0] * 5, [10.0 if pruned is None else 10.4] * 5

    monkeypatch.setattr(speed, "Measurer", Slower)
    out = tmp_path / "out"
    code = _run("prune", TINY, "--input-shape", "1,3,16,16", "--ratio", "0.3", "--target",
                "ort-cpu", "--threads", "1", "--if-slower", "fail", "--out", out,
                "--exporter", "torchscript")
    err = capsys.readouterr().err.strip()
    assert code == 2 and not out.exists()
    assert "not faster than dense" in err and "0.96x" in err and len(err.splitlines()) == 1


def test_cli_target_writes_the_measurements(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("STRUCTPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(latency, "probe_ms", FakeMeasure())
    x = (torch.randn(1, 3, 16, 16),)

    class ByMacs:
        def __init__(self, *args, **kwargs):
            pass

        def __call__(self, dense, pruned):
            if pruned is None:
                return [8.0] * 5, [8.0] * 5
            share = count_macs(sp.capture(pruned, x)) / \
                count_macs(sp.capture(dense, x))
            return [8.0] * 5, [8.0 * share] * 5

    monkeypatch.setattr(speed, "Measurer", ByMacs)
    out = tmp_path / "out"
    assert _run("prune", TINY, "--input-shape", "1,3,16,16", "--target-speedup", "1.5",
                "--target", "ort-cpu", "--threads", "1", "--out", out,
                "--exporter", "torchscript") == 0
    printed = capsys.readouterr().out
    assert "target ort-cpu, 1 threads, batch 1" in printed and "goal 1.5x met" in printed
    report = json.loads((out / "report.json").read_text())
    t = report["target"]
    assert t["target"]["runtime"] == "ort-cpu" and t["target"]["threads"] == 1
    assert t["measured"]["speedup"] == pytest.approx(1 / report["macs_ratio"])
    assert t["latency_model"]["table"]["entries"] > 0
    assert (tmp_path / "cache").is_dir()
    plan = json.loads((out / "plan.json").read_text())
    assert plan["settings"]["target"]["runtime"] == "ort-cpu"


# OpenVINO in bench


def test_bench_times_openvino_beside_onnx_runtime(tmp_path):
    pytest.importorskip("openvino")
    model = small_vgg().eval()
    x = (torch.randn(1, 3, 16, 16),)
    pruned = sp.prune(model, x, 0.5).model
    export_onnx(model, x, tmp_path / "d.onnx", "torchscript")
    export_onnx(pruned, x, tmp_path / "p.onnx", "torchscript")
    shapes = [(1, 3, 16, 16)]
    # the same inputs through both runtimes give the same outputs
    ov_out = bench.openvino_runner(tmp_path / "p.onnx", 2, shapes, 1)()
    ort_out = bench.ort_runner(tmp_path / "p.onnx", 2, shapes, 1, "CPUExecutionProvider")()
    assert np.allclose(next(iter(ov_out.values())), ort_out[0], rtol=1e-3, atol=1e-4)
    result = bench.bench(tmp_path / "d.onnx", tmp_path / "p.onnx", shapes, 0.3, batches=[1],
                         threads=[1], repeats=2, warmup=0)
    assert [(c["runtime"], c["threads"]) for c in result["cells"]] == \
        [("ort-cpu", 1), ("openvino-cpu", 1)]
    assert "openvino" in result["machine"]
    assert "openvino-cpu" in bench.markdown(result)
    with pytest.raises(runtimes.RuntimeUnavailable, match="unknown target"):
        runtimes.make_target("onnx")


def test_the_prediction_is_corrected_by_the_measurements():
    """Before any measurement the dense calibration scales the goal; then the attempts on
    either side of the goal are interpolated, else the nearest one's ratio scales it."""
    assert speed._predicted_goal([], 40.0, 2.0) == 20.0
    assert speed._predicted_goal([(50.0, 60.0), (30.0, 40.0)], 50.0, 2.0) == 40.0
    assert speed._predicted_goal([(50.0, 60.0), (45.0, 58.0)], 30.0, 2.0) == \
        pytest.approx(30.0 * 45.0 / 58.0)
    # ResNet-50 on 2 threads asked for 1.25x (34.9 ms): the narrower second attempt measured
    # slower by noise, and the nearest attempt's ratio sent the search back to the first
    # widths. While all attempts are too slow it asks for narrower than the narrowest.
    history = [(39.54, 37.3), (35.76, 39.0)]
    assert 34.9 * 39.54 / 37.3 > 35.76  # the plain rule would go back
    assert speed._predicted_goal(history, 34.9, 1.0, 0.05) == pytest.approx(35.76 * 0.95)
    # all faster than needed: wider than the widest tried
    assert speed._predicted_goal([(20.0, 18.0), (22.0, 16.0)], 30.0, 1.0, 0.05) == \
        pytest.approx(max(30.0 * 20.0 / 18.0, 22.0 * 1.05))


def test_openvino_target_times_the_model_layers(tmp_path):
    """Real OpenVINO probes (one-layer ONNX models read from bytes): one table entry per
    distinct layer of the dense model, keyed by the runtime, and a positive sum."""
    pytest.importorskip("openvino")
    target = runtimes.make_target("openvino-cpu", threads=1)
    model = small_vgg().eval()
    analysis = sp.analyse(sp.capture(model, (torch.randn(1, 3, 16, 16),)))
    table = LatencyTable(target, tmp_path, progress=False)
    lm = LatencyModel(analysis, table)
    assert lm.predict() > 0
    assert table.measured == len(lm.layers) == 6  # 4 convs, 2 linear maps
    assert all("|openvino-cpu|t=1" in key for key in table.entries)
