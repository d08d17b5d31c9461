"""Stage 8, bench: dense against pruned latency on the runtimes present, side by side.

For every runtime, thread count and batch size, both models are warmed up, then timed in
interleaved pairs (dense, pruned, dense, ...), so drift and thermal effects hit both alike.
Reported per cell: median, p10 and p90 of each model, and the speed-up (median of the
per-pair ratios, with its p10-p90 spread) next to the ideal speed-up from the MACs ratio.
Given the INT8 files of the two models (``dense.int8.onnx``, ``pruned.int8.onnx``), they join
the interleaved rounds on the ONNX runtimes, each INT8 model is compared with dense FP32 and
with its own FP32 file, and wherever INT8 is not faster than FP32 the FP32 file stays the one
to deploy (the guard): ``recommended`` names it and the table says so.

Runtimes: ONNX Runtime CPU (always), OpenVINO CPU when ``openvino`` is installed (the
``openvino`` extra), ONNX Runtime CUDA/TensorRT when ``onnxruntime-gpu`` provides them, and
torch on CUDA (eager and CUDA graphs, fp32 and fp16, channels_last) when
a GPU is present and the PyTorch models are given.
"""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from structprune.errors import StructPruneError

Runner = Callable[[], None]

# How long a CPU runtime's idle worker threads keep spinning after a run. ONNX Runtime's do for
# tens of milliseconds, and on a machine with no more cores than threads they take the CPU from
# the next model timed: MobileNetV2 on 2 threads ran in 4.3 ms alone, 8.4 ms beside one
# other session and 24 ms beside five; with this pause between them, 5.7 ms beside five.
SPIN_SETTLE_S = 0.05


@dataclass
class SessionRunner:
    """One model loaded on a runtime, run by calling it. ``settle_s``: the untimed pause
    that interleaved timing leaves after it before running another model, while its worker
    threads stop spinning (:data:`SPIN_SETTLE_S` for ONNX Runtime on several CPU threads;
    OpenVINO's workers cost the next model about 15% at most, and a pause cost it more)."""

    run: Callable[[], Any]
    settle_s: float = 0.0

    def __call__(self) -> Any:
        return self.run()


def ort_settle_s(threads: int | None) -> float:
    """The pause an ONNX Runtime CPU session on ``threads`` threads (None: every core) needs
    after a run before another model is timed (see :data:`SPIN_SETTLE_S`)."""
    return 0.0 if threads == 1 else SPIN_SETTLE_S


@dataclass
class Cell:
    """One runtime, batch size and thread count: the ms per round of each model, the INT8
    ones (``int8_ms``, by the FP32 model's name: dense, pruned) when they were timed."""

    runtime: str
    batch: int
    threads: int | None
    dense_ms: list[float]
    pruned_ms: list[float]
    int8_ms: dict[str, list[float]] = field(default_factory=dict)

    def to_json(self, ideal: float | None) -> dict[str, Any]:
        d, p = np.array(self.dense_ms), np.array(self.pruned_ms)
        ratios = d / p
        data = {
            "runtime": self.runtime, "batch": self.batch, "threads": self.threads,
            "dense_ms": _stats(d), "pruned_ms": _stats(p),
            "speedup": float(np.median(ratios)),
            "speedup_p10": float(np.percentile(ratios, 10)),
            "speedup_p90": float(np.percentile(ratios, 90)),
            "ideal_speedup": ideal,
            "repeats": len(d),
        }
        fp32 = {"dense": d, "pruned": p}
        for name, runs in self.int8_ms.items():
            q = np.array(runs)
            over_dense, over_fp32 = d / q, fp32[name] / q
            faster = bool(np.median(over_fp32) > 1.0)
            data[f"{name}_int8_ms"] = _stats(q)
            data[f"{name}_int8_speedup"] = float(np.median(over_dense))  # over dense FP32
            data[f"{name}_int8_speedup_p10"] = float(np.percentile(over_dense, 10))
            data[f"{name}_int8_speedup_p90"] = float(np.percentile(over_dense, 90))
            data.setdefault("int8_over_fp32", {})[name] = float(np.median(over_fp32))
            data.setdefault("recommended", {})[name] = (f"{name}.int8.onnx" if faster
                                                        else f"{name}.onnx")
        return data


def _stats(x: np.ndarray) -> dict[str, float]:
    return {"median": float(np.median(x)), "p10": float(np.percentile(x, 10)),
            "p90": float(np.percentile(x, 90)), "runs": [round(float(v), 4) for v in x]}


def interleaved_many(runners: Sequence[Runner], warmup: int = 2, repeats: int = 10,
                     max_seconds: float = 30.0, min_repeats: int = 3,
                     clock: Callable[[], float] = time.perf_counter,
                     sync: Callable[[], None] = lambda: None) -> list[list[float]]:
    """Time the runners in turn, reversing the order every round; ms per call for each.
    Before a runner follows another, the other's ``settle_s`` (see :class:`SessionRunner`)
    passes untimed."""
    for _ in range(warmup):
        for fn in runners:
            fn()
    sync()
    times: list[list[float]] = [[] for _ in runners]
    order = list(range(len(runners)))
    start = clock()
    last: int | None = None
    for i in range(repeats):
        for k in order if i % 2 == 0 else order[::-1]:
            settle = getattr(runners[last], "settle_s", 0.0) if last not in (None, k) else 0.0
            if settle:
                time.sleep(settle)
            last = k
            t = clock()
            runners[k]()
            sync()
            times[k].append((clock() - t) * 1e3)
        if i + 1 >= min_repeats and clock() - start > max_seconds:
            break
    return times


def interleaved(dense: Runner, pruned: Runner, **timing: Any) -> tuple[list[float], list[float]]:
    """Time ``dense`` and ``pruned`` alternately; milliseconds per call for each."""
    d_ms, p_ms = interleaved_many([dense, pruned], **timing)
    return d_ms, p_ms


def ort_session(path: Path | bytes, threads: int | None, provider: str,
                profile_prefix: str | None = None) -> Any:
    """An ONNX Runtime session of ``path`` (a file or its bytes), fully optimised, on
    ``threads`` intra-op threads (None: ONNX Runtime's default); one line when it cannot load."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(path if isinstance(path, bytes) else str(path), options,
                                    providers=[provider])
    except Exception as exc:  # noqa: BLE001 - ORT raises its own types for a bad file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        what = "a model given as bytes" if isinstance(path, bytes) else path
        raise StructPruneError(f"ONNX Runtime cannot load {what} ({first}): export it again "
                               "with `structprune prune`") from exc


def _random_feeds(names: Sequence[str], batch: int,
                  shapes: Sequence[Sequence[int]]) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {name: rng.standard_normal((batch, *shape[1:])).astype(np.float32)
            for name, shape in zip(names, shapes, strict=False)}


def ort_runner(path: Path | bytes, batch: int, shapes: Sequence[Sequence[int]], threads: int | None,
               provider: str) -> Runner:
    session = ort_session(path, threads, provider)
    feeds = _random_feeds([i.name for i in session.get_inputs()], batch, shapes)
    cpu = provider == "CPUExecutionProvider"
    return SessionRunner(lambda: session.run(None, feeds), ort_settle_s(threads) if cpu else 0.0)


# Nodes a runtime adds around a model to convert between the plain layout of its inputs and
# outputs and its blocked one; a layer inside a model does not pay them.
LAYOUT_NODES = frozenset({"ReorderInput", "ReorderOutput", "Reorder"})
# The (de)quantization at the edges of a one-layer INT8 model; inside a model, quantized layers
# pass 8-bit tensors to one another.
QDQ_NODES = frozenset({"QuantizeLinear", "DequantizeLinear"})


def ort_kernel_ms(model: Path | bytes, batch: int, shapes: Sequence[Sequence[int]],
                  threads: int | None, provider: str, runs: int,
                  before_run: Callable[[], None] = lambda: None,
                  skip: frozenset[str] = LAYOUT_NODES) -> list[float]:
    """Per run, the milliseconds ONNX Runtime's profiler gives the model's compute nodes:
    the call's own overhead and the nodes of the op types ``skip`` (layout reorders,
    :data:`LAYOUT_NODES`) left out. ``before_run`` is called before every run, outside the
    timed part."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="structprune-profile-") as tmp:
        session = ort_session(model, threads, provider, str(Path(tmp) / "run"))
        feeds = _random_feeds([i.name for i in session.get_inputs()], batch, shapes)
        for _ in range(runs):
            before_run()
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    calls = sorted((e["ts"], e["ts"] + e["dur"]) for e in events
                   if e.get("cat") == "Session" and e.get("name") == "model_run")
    per_call = [0.0] * len(calls)
    starts = [start for start, _ in calls]
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") \
                or e.get("args", {}).get("op_name") in skip:
            continue
        i = int(np.searchsorted(starts, e["ts"], side="right")) - 1
        if 0 <= i < len(calls) and e["ts"] <= calls[i][1]:
            per_call[i] += e["dur"] / 1e3
    return per_call


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def _openvino_request(path: Path | bytes, batch: int, shapes: Sequence[Sequence[int]],
                      threads: int | None, profile: bool = False) -> tuple[Any, dict]:
    import openvino as ov

    core = ov.Core()
    try:
        model = core.read_model(path if isinstance(path, bytes) else str(path))
    except Exception as exc:  # noqa: BLE001 - OpenVINO raises its own types for a bad file
        raise StructPruneError(f"OpenVINO cannot read {path if isinstance(path, Path) else 'the model'}"
                               f" ({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__})"
                               ) from exc
    model.reshape({port.get_any_name(): [batch, *shape[1:]]
                   for port, shape in zip(model.inputs, shapes, strict=False)})
    config: dict[str, Any] = {"PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    if profile:
        config["PERF_COUNT"] = True
    compiled = core.compile_model(model, "CPU", config)
    feeds = _random_feeds([port.get_any_name() for port in compiled.inputs], batch, shapes)
    return compiled.create_infer_request(), feeds


def openvino_runner(path: Path | bytes, batch: int, shapes: Sequence[Sequence[int]],
                    threads: int | None) -> Runner:
    """OpenVINO on the CPU, compiled for latency at this batch size (static shapes)."""
    request, feeds = _openvino_request(path, batch, shapes, threads)
    return SessionRunner(lambda: request.infer(feeds))  # a pause made OpenVINO slower


def openvino_kernel_ms(model: Path | bytes, batch: int, shapes: Sequence[Sequence[int]],
                       threads: int | None, runs: int,
                       before_run: Callable[[], None] = lambda: None) -> list[float]:
    """Per run, the milliseconds OpenVINO's performance counters give the executed compute
    nodes, layout reorders (:data:`LAYOUT_NODES`) left out; as :func:`ort_kernel_ms`."""
    import openvino as ov

    request, feeds = _openvino_request(model, batch, shapes, threads, profile=True)
    times = []
    for _ in range(runs):
        before_run()
        request.infer(feeds)
        times.append(sum(info.real_time.total_seconds() * 1e3
                         for info in request.get_profiling_info()
                         if info.status == ov.ProfilingInfo.Status.EXECUTED
                         and info.node_type not in LAYOUT_NODES))
    return times


def _timed_cell(runtime: str, batch: int, threads: int | None,
                make: Callable[[Path], Runner], dense: Path, pruned: Path,
                int8: Mapping[str, Path], **timing: Any) -> Cell:
    """Dense, pruned and the INT8 files (by FP32 model name) timed in interleaved rounds."""
    runners = [make(dense), make(pruned)] + [make(path) for path in int8.values()]
    times = interleaved_many(runners, **timing)
    return Cell(runtime, batch, threads, times[0], times[1], dict(zip(int8, times[2:],
                                                                      strict=True)))


def ort_cells(dense: Path, pruned: Path, shapes: Sequence[Sequence[int]], batches: Sequence[int],
              threads: Sequence[int], progress: Callable[[str], None] = lambda s: None,
              int8: Mapping[str, Path] | None = None, **timing: Any) -> list[Cell]:
    """ONNX Runtime cells: CPU at each thread count, and the CUDA and TensorRT providers when
    present, at each batch size; ``int8`` files (by FP32 model name) timed beside."""
    import onnxruntime as ort

    cells = []
    available = ort.get_available_providers()
    plans = [("ort-cpu", "CPUExecutionProvider", t) for t in threads]
    for provider, name in (("CUDAExecutionProvider", "ort-cuda"),
                           ("TensorrtExecutionProvider", "ort-tensorrt")):
        if provider in available:
            plans.append((name, provider, None))
    for runtime, provider, n in plans:
        for batch in batches:
            progress(f"{runtime} threads={n} batch={batch}")
            cells.append(_timed_cell(
                runtime, batch, n,
                lambda path, b=batch, t=n, pr=provider: ort_runner(path, b, shapes, t, pr),
                dense, pruned, int8 or {}, **timing))
    return cells


def openvino_cells(dense: Path, pruned: Path, shapes: Sequence[Sequence[int]],
                   batches: Sequence[int], threads: Sequence[int],
                   progress: Callable[[str], None] = lambda s: None,
                   int8: Mapping[str, Path] | None = None, **timing: Any) -> list[Cell]:
    """OpenVINO CPU cells, one per thread count and batch size (none without OpenVINO);
    ``int8`` files (QDQ, which OpenVINO runs in INT8) timed beside."""
    if not openvino_available():
        return []
    cells = []
    for n in threads:
        for batch in batches:
            progress(f"openvino-cpu threads={n} batch={batch}")
            cells.append(_timed_cell(
                "openvino-cpu", batch, n,
                lambda path, b=batch, t=n: openvino_runner(path, b, shapes, t),
                dense, pruned, int8 or {}, **timing))
    return cells


def torch_cuda_cells(dense_model: Any, pruned_model: Any, shapes: Sequence[Sequence[int]],
                     batches: Sequence[int], progress: Callable[[str], None] = lambda s: None,
                     **timing: Any) -> list[Cell]:
    """torch on CUDA: eager and CUDA-graph replay, fp32 and fp16, channels_last."""
    import torch

    if not torch.cuda.is_available():
        return []
    cells = []
    for dtype, tag in ((torch.float32, "fp32"), (torch.float16, "fp16")):
        models = []
        for m in (dense_model, pruned_model):
            m = m.eval().to("cuda", dtype).to(memory_format=torch.channels_last)
            models.append(m)
        for batch in batches:
            inputs = [torch.randn((batch, *s[1:]), device="cuda", dtype=dtype)
                      for s in shapes]
            inputs = [x.to(memory_format=torch.channels_last) if x.ndim == 4 else x
                      for x in inputs]
            for mode in ("eager", "graph"):
                progress(f"torch-cuda-{mode}-{tag} batch={batch}")
                runners = [torch_runner(m, inputs, mode == "graph") for m in models]
                d_ms, p_ms = interleaved(*runners, sync=torch.cuda.synchronize, **timing)
                cells.append(Cell(f"torch-cuda-{mode}-{tag}", batch, None, d_ms, p_ms))
    return cells


def torch_runner(model: Any, inputs: list, graph: bool) -> Runner:
    import torch

    with torch.no_grad():
        if not graph:
            return lambda: model(*inputs)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(3):
                model(*inputs)
        torch.cuda.current_stream().wait_stream(stream)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            model(*inputs)

    def replay(keep_alive=(model, inputs)) -> None:  # the graph reads their memory
        g.replay()
    return replay


def machine() -> dict[str, Any]:
    """The machine and library versions, for the record."""
    import onnxruntime as ort
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": ort.__version__,
            "ort_providers": ort.get_available_providers(),
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if openvino_available():
        import openvino as ov

        info["openvino"] = ov.get_version()
    return info


def bench(dense_onnx: Path, pruned_onnx: Path, shapes: Sequence[Sequence[int]],
          macs_ratio: float | None = None, batches: Sequence[int] = (1, 32),
          threads: Sequence[int] | None = None, torch_models: tuple | None = None,
          progress: Callable[[str], None] = lambda s: None, openvino: bool = True,
          int8: Mapping[str, Path] | None = None, **timing: Any) -> dict[str, Any]:
    """Benchmark dense against pruned on every runtime present, with their INT8 files
    (``int8``: by FP32 model name, ``dense`` and/or ``pruned``) on the ONNX runtimes;
    returns plain JSON data."""
    threads = threads or sorted({1, os.cpu_count() or 1})
    cells = ort_cells(dense_onnx, pruned_onnx, shapes, batches, threads, progress, int8,
                      **timing)
    if openvino:
        cells += openvino_cells(dense_onnx, pruned_onnx, shapes, batches, threads, progress,
                                int8, **timing)
    if torch_models is not None:
        cells += torch_cuda_cells(*torch_models, shapes, batches, progress, **timing)
    ideal = 1 / macs_ratio if macs_ratio else None
    return {"machine": machine(), "macs_ratio": macs_ratio, "ideal_speedup": ideal,
            "timing": {k: v for k, v in timing.items() if isinstance(v, (int, float))},
            "cells": [c.to_json(ideal) for c in cells]}


def markdown(result: dict[str, Any]) -> str:
    m = result["machine"]
    lines = [f"Machine: {m['cpu']} ({m['cores']} cores)"
             + (f", GPU {m['gpu']}" if m.get("gpu") else "")
             + f"; torch {m['torch']}, onnxruntime {m['onnxruntime']}"
             + (f", openvino {m['openvino']}" if m.get("openvino") else ""), ""]
    ideal = result.get("ideal_speedup")
    lines.append("| runtime | threads | batch | dense ms (p10-p90) | pruned ms (p10-p90) | "
                 "speed-up (p10-p90) | ideal (MACs) |")
    lines.append("|---|---|---|---|---|---|---|")
    ideal_text = f"{ideal:.2f}x" if ideal else "-"
    for c in result["cells"]:
        d, p = c["dense_ms"], c["pruned_ms"]
        lines.append(
            f"| {c['runtime']} | {c['threads'] or '-'} | {c['batch']} | "
            f"{d['median']:.2f} ({d['p10']:.2f}-{d['p90']:.2f}) | "
            f"{p['median']:.2f} ({p['p10']:.2f}-{p['p90']:.2f}) | "
            f"{c['speedup']:.2f}x ({c['speedup_p10']:.2f}-{c['speedup_p90']:.2f}) | "
            f"{ideal_text} |")
    return "\n".join(lines + int8_lines(result["cells"])) + "\n"


INT8_MODELS = ("dense", "pruned")


def int8_lines(cells: Sequence[dict[str, Any]]) -> list[str]:
    """The INT8 table of the cells that timed INT8 files: each model's median ms, the
    speed-ups over dense FP32, and the guard's verdict wherever INT8 is not faster than
    FP32 (none when no INT8 file was timed)."""
    cells = [c for c in cells if "recommended" in c]
    if not cells:
        return []
    lines = ["", "| runtime | threads | batch | dense FP32 ms | dense INT8 ms | pruned FP32 ms "
             "| pruned INT8 ms | over dense FP32: dense INT8 | pruned FP32 | pruned INT8 |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    guard = []
    for c in cells:
        def ms(key: str, c: dict[str, Any] = c) -> str:
            return f"{c[key]['median']:.2f}" if key in c else "-"

        def up(name: str, c: dict[str, Any] = c) -> str:
            return f"{c[f'{name}_int8_speedup']:.2f}x" if f"{name}_int8_speedup" in c else "-"
        lines.append(f"| {c['runtime']} | {c['threads'] or '-'} | {c['batch']} | "
                     f"{ms('dense_ms')} | {ms('dense_int8_ms')} | {ms('pruned_ms')} | "
                     f"{ms('pruned_int8_ms')} | {up('dense')} | {c['speedup']:.2f}x | "
                     f"{up('pruned')} |")
        for name, file in c["recommended"].items():
            if not file.endswith(".int8.onnx"):
                guard.append(f"- {c['runtime']}, {c['threads'] or '-'} thread(s), batch "
                             f"{c['batch']}: {name} INT8 is not faster than FP32 "
                             f"({c['int8_over_fp32'][name]:.2f}x): keep {file}")
    if guard:
        lines += ["", "INT8 slower than FP32 (the FP32 file stays the one to deploy):", *guard]
    return lines


def plot(result: dict[str, Any], path: Path) -> None:
    """Bar chart of dense and pruned (and INT8, where timed) median latency per runtime and
    batch size, each bar but dense's marked with its speed-up over dense FP32."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = result["cells"]
    labels = [f"{c['runtime']}\n{'t=' + str(c['threads']) + ' ' if c['threads'] else ''}b={c['batch']}"
              for c in cells]
    x = np.arange(len(cells))
    # dense, pruned and, where timed, the INT8 files: the speed-up over dense FP32 on each bar
    series = []
    for name, fp32, speedup in (("dense", "dense_ms", None), ("pruned", "pruned_ms", "speedup")):
        series.append((name, fp32, speedup))
        if any(f"{name}_int8_ms" in c for c in cells):
            series.append((f"{name} INT8", f"{name}_int8_ms", f"{name}_int8_speedup"))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(6, 0.65 * len(series) * len(cells)), 4))
    for k, (label, key, speedup) in enumerate(series):
        offset = (k - (len(series) - 1) / 2) * width
        shown = [i for i, c in enumerate(cells) if key in c]
        ax.bar(x[shown] + offset, [cells[i][key]["median"] for i in shown], width, label=label)
        for i in shown if speedup else []:
            ax.annotate(f"{cells[i][speedup]:.2f}x", (x[i] + offset, cells[i][key]["median"]),
                        ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, labels, fontsize=7)
    ax.set_yscale("log")
    ax.set_ylabel("median latency (ms, log)")
    ax.set_title(("dense vs pruned" if len(series) == 2 else "dense vs pruned, FP32 and INT8")
                 + (f" (ideal {result['ideal_speedup']:.2f}x from MACs)"
                    if result.get("ideal_speedup") else ""))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write(result: dict[str, Any], directory: Path) -> None:
    (directory / "bench.json").write_text(json.dumps(result, indent=1) + "\n")
    (directory / "bench.md").write_text(markdown(result))
    plot(result, directory / "bench.png")




def plot_sweep(sweep: dict[str, Any], path: Path) -> None:
    """Speed-up against ratio for every runtime cell, with the ideal curve from MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = sweep["points"]
    ratios = [p["ratio"] for p in points]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(ratios, [p["ideal_speedup"] or 1 for p in points], "k--", label="ideal (MACs)")
    keys = sorted({(c["runtime"], c["threads"], c["batch"]) for p in points for c in p["cells"]},
                  key=str)
    for runtime, threads, batch in keys:
        ys = []
        for p in points:
            match = [c["speedup"] for c in p["cells"]
                     if (c["runtime"], c["threads"], c["batch"]) == (runtime, threads, batch)]
            ys.append(match[0] if match else np.nan)
        label = f"{runtime}{' t=' + str(threads) if threads else ''} b={batch}"
        ax.plot(ratios, ys, marker="o", label=label)
    ax.axhline(1.0, color="grey", lw=0.8)
    ax.set_xlabel("pruning ratio")
    ax.set_ylabel("speed-up (dense / pruned)")
    ax.set_title(sweep["spec"])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
