"""The benchmark's bookkeeping (its timings only in the ``timing`` group, run by hand)."""

import itertools
import json

import numpy as np
import pytest

from structprune.deploy import bench
from structprune.front.cli import main

from .fixtures import TINY


def test_interleaving_alternates_and_times_each_call():
    calls = []
    ticks = itertools.count()
    clock = lambda: next(ticks) * 0.001  # noqa: E731 - 1 ms per clock read
    d_ms, p_ms = bench.interleaved(lambda: calls.append("d"), lambda: calls.append("p"),
                                   warmup=1, repeats=4, clock=clock)
    assert calls == ["d", "p", "d", "p", "p", "d", "d", "p", "p", "d"]
    assert d_ms == pytest.approx([1.0] * 4) and p_ms == pytest.approx([1.0] * 4)


@pytest.mark.timing  # wall-clock gaps between calls
def test_a_spinning_runner_settles_untimed_before_another_runs():
    """After a runner with ``settle_s``, the next *other* runner starts that much later, and
    the pause is in no one's time; the same runner twice in a row (a round's turn) waits not."""
    import time

    settle = 0.2  # long beside a stall of a loaded machine between two empty calls
    starts = []
    dense = bench.SessionRunner(lambda: starts.append(("d", time.perf_counter())), settle)
    pruned = bench.SessionRunner(lambda: starts.append(("p", time.perf_counter())))
    d_ms, p_ms = bench.interleaved(dense, pruned, warmup=0, repeats=4)
    # order d p | p d | d p | p d
    gaps = [(a[0], b[0], b[1] - a[1]) for a, b in itertools.pairwise(starts)]
    assert [g for g in gaps if g[:2] == ("d", "p")] and \
        all(gap >= settle for a, b, gap in gaps if (a, b) == ("d", "p"))
    assert all(gap < settle for a, b, gap in gaps if a == b or (a, b) == ("p", "d"))
    assert max(d_ms + p_ms) < settle * 1000 / 2


def test_onnx_runtime_on_several_threads_settles():
    import io

    import torch

    buffer = io.BytesIO()
    torch.onnx.export(torch.nn.Conv2d(3, 4, 3), (torch.randn(1, 3, 8, 8),), buffer,
                      dynamo=False)
    shapes = [(1, 3, 8, 8)]
    one = bench.ort_runner(buffer.getvalue(), 1, shapes, 1, "CPUExecutionProvider")
    two = bench.ort_runner(buffer.getvalue(), 1, shapes, 2, "CPUExecutionProvider")
    assert one.settle_s == 0 and two.settle_s == bench.SPIN_SETTLE_S
    assert two()[0].shape == (1, 4, 6, 6)


def test_time_budget_stops_after_the_minimum():
    ticks = itertools.count()
    d_ms, _ = bench.interleaved(lambda: None, lambda: None, warmup=0, repeats=50,
                                max_seconds=0.0, min_repeats=3,
                                clock=lambda: next(ticks) * 1.0)
    assert len(d_ms) == 3


def test_cell_statistics():
    cell = bench.Cell("ort-cpu", 1, 2, [10, 12, 11, 30], [5, 6, 5.5, 10])
    data = cell.to_json(ideal=4.0)
    assert data["dense_ms"]["median"] == pytest.approx(11.5)
    assert data["speedup"] == pytest.approx(np.median([2, 2, 2, 3]))
    assert data["speedup_p10"] <= data["speedup"] <= data["speedup_p90"]
    assert data["ideal_speedup"] == 4.0 and data["repeats"] == 4


def test_bench_command_writes_consistent_files(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["prune", TINY, "--ratio", "0.5", "--out", str(out), "--input-shape",
                 "1,3,16,16", "--exporter", "torchscript"]) == 0
    assert main(["bench", str(out), "--batch", "1", "--batch", "4", "--threads", "1",
                 "--repeats", "3", "--warmup", "1"]) == 0
    printed = capsys.readouterr().out
    data = json.loads((out / "bench.json").read_text())
    report = json.loads((out / "report.json").read_text())
    cpu = [c for c in data["cells"] if c["runtime"] == "ort-cpu"]
    assert [(c["threads"], c["batch"]) for c in cpu] == [(1, 1), (1, 4)]
    assert data["ideal_speedup"] == pytest.approx(1 / report["macs_ratio"])
    for c in cpu:
        assert c["repeats"] == 3 and len(c["dense_ms"]["runs"]) == 3
        assert f"{c['speedup']:.2f}x" in printed
        assert c["dense_ms"]["p10"] <= c["dense_ms"]["median"] <= c["dense_ms"]["p90"]
    assert data["machine"]["cores"] >= 1 and data["machine"]["cpu"]
    assert (out / "bench.png").stat().st_size > 1000
    assert "| ort-cpu |" in (out / "bench.md").read_text()


def test_bench_on_a_directory_without_a_prune(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert "run `structprune prune" in capsys.readouterr().err


def test_sweep_command(tmp_path, capsys):
    out = tmp_path / "sweep"
    assert main(["sweep", TINY, "--ratios", "0.25,0.5", "--out", str(out), "--input-shape",
                 "1,3,16,16", "--exporter", "torchscript", "--batch", "1", "--threads", "1",
                 "--repeats", "3", "--warmup", "0"]) == 0
    data = json.loads((out / "sweep.json").read_text())
    assert [p["ratio"] for p in data["points"]] == [0.25, 0.5]
    ideal = [p["ideal_speedup"] for p in data["points"]]
    assert ideal[0] < ideal[1]  # more pruning, fewer MACs
    assert (out / "sweep.png").stat().st_size > 1000
    assert (out / "ratio_0.50" / "pruned.onnx").exists()
    assert "speed-up" in capsys.readouterr().out


def test_bench_refuses_bad_reports_and_onnx_files_in_one_line(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["prune", TINY, "--ratio", "0.5", "--out", str(out), "--input-shape",
                 "1,3,16,16", "--exporter", "torchscript"]) == 0
    report = (out / "report.json").read_text()
    capsys.readouterr()
    for broken, message in (("report.json", "not a structprune report"),
                            ("report.json {}", "not a structprune report"),
                            ("pruned.onnx", "ONNX Runtime cannot load")):
        name, _, content = broken.partition(" ")
        (out / "report.json").write_text(report)
        (out / name).write_text(content or "garbage")
        assert main(["bench", str(out), "--batch", "1", "--threads", "1", "--repeats", "3",
                     "--warmup", "1"]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err
