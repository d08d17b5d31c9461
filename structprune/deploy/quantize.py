"""Quantize: static INT8 of an ONNX file, calibrated on the data stage's inputs.

``X.onnx`` becomes ``X.int8.onnx`` beside it (written atomically; the FP32 file is only read):
activations and weights in 8 bits as QuantizeLinear/DequantizeLinear pairs (QDQ), weights per
output channel, activation ranges calibrated on the inputs of a few batches (labels are not
needed). Two quantizers:

- ``ort-cpu``: ONNX Runtime's own tools (``quant_pre_process``, then ``quantize_static`` with a
  calibration method: ``minmax``, ``entropy`` or ``percentile``); unsigned activations and
  signed weights, as ONNX Runtime recommends for x86 CPUs.
- ``openvino-cpu``: NNCF's post-training quantization of the ONNX model (its own range
  estimators), when ``nncf`` and ``openvino`` are installed.

With ``max_drop`` and a way to measure the drop (a callback: what the INT8 candidate costs, in
points, against the FP32 file), the layers whose quantization costs most are found by
measurement and left in FP32 until the drop is within it: the quantized activations are ranked
by the noise their quantization adds (signal to quantization noise per channel, on the
calibration inputs), the nodes around the worst few are each left in FP32 alone and measured,
and then the most helpful of them, followed by the rest in rank order, are left out one unit
at a time. Activation ranges are calibrated once and reused by every candidate.

:class:`OnnxModel` runs an ONNX file as a torch module, so that the accuracy stage measures an
INT8 file through the runtime exactly as it measures a torch model.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from structprune.batches import split
from structprune.config import QuantizeConfig
from structprune.deploy import bench
from structprune.deploy.runtimes import make_target
from structprune.errors import StructPruneError, first_line
from structprune.files import atomic_write

METHODS = ("minmax", "entropy", "percentile")
QUANTIZERS = ("ort-cpu", "openvino-cpu")  # the runtimes an INT8 file is made for
SUFFIX = ".int8.onnx"
# quantized activations whose surrounding nodes are each left in FP32 alone and measured,
# before units are left out cumulatively
SINGLE_TRIALS = 4
# samples the ranking of activations by quantization noise runs on
RANKING_SAMPLES = 8
# samples per calibration run: the calibrator keeps every intermediate tensor of a run
CHUNK = 8

Drop = Callable[[Path], float]  # an INT8 candidate file -> points lost against the FP32 file


class QuantizeError(StructPruneError):
    """The model cannot be quantized, or the settings or data do not allow it."""


def int8_path(fp32: str | Path) -> Path:
    """``X.onnx`` -> ``X.int8.onnx`` beside it."""
    fp32 = Path(fp32)
    return fp32.with_name(fp32.name.removesuffix(".onnx") + SUFFIX)


def nncf_available() -> bool:
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return bench.openvino_available()


def check(config: QuantizeConfig) -> None:
    """Refuse, in one line, settings this machine cannot quantize with: an unknown runtime or
    calibration method, or OpenVINO without ``nncf`` and ``openvino``."""
    if config.runtime not in QUANTIZERS:
        raise QuantizeError(f"unknown quantize runtime {config.runtime!r}: use one of "
                            + ", ".join(QUANTIZERS))
    if config.method not in METHODS:
        raise QuantizeError(f"unknown calibration method {config.method!r}: use one of "
                            + ", ".join(METHODS))
    if config.runtime == "openvino-cpu":
        if not nncf_available():
            raise QuantizeError("INT8 for openvino-cpu is NNCF's post-training quantization: "
                                "pip install nncf 'structprune[openvino]'")
        if config.method != "minmax":
            raise QuantizeError(f"calibration method {config.method} is ONNX Runtime's; NNCF "
                                "chooses its own ranges: drop --calibration-method")


class OnnxModel(nn.Module):
    """An ONNX file run by ONNX Runtime on the CPU, called like the torch model it came from:
    tensors in (moved to numpy by position, keyword inputs by name), tensors out (one, or a
    tuple). It has no parameters; the accuracy stage's ``evaluate`` and ``fidelity`` take it as
    they take any model."""

    def __init__(self, path: str | Path, threads: int | None = None):
        super().__init__()
        self.path = Path(path)
        self.session = bench.ort_session(self.path, threads, "CPUExecutionProvider")
        self.input_names = [i.name for i in self.session.get_inputs()]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        feeds = _feeds(self.input_names, args, kwargs)
        outputs = [torch.from_numpy(np.asarray(y)) for y in self.session.run(None, feeds)]
        return outputs[0] if len(outputs) == 1 else tuple(outputs)


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    x = np.asarray(x)
    return x.astype(np.float32) if x.dtype == np.float64 else x


def _feeds(names: Sequence[str], args: Sequence[Any], kwargs: dict[str, Any]
           ) -> dict[str, np.ndarray]:
    """A session's feeds from a batch's inputs: keyword inputs by name, the rest by position."""
    feeds = {name: _numpy(kwargs[name]) for name in names if name in kwargs}
    rest = [n for n in names if n not in feeds]
    values = list(args) + [v for k, v in kwargs.items() if k not in feeds]
    if len(values) != len(rest):
        raise QuantizeError(f"the data's batches have {len(args) + len(kwargs)} inputs, the "
                            f"ONNX file takes {len(names)} ({', '.join(names)})")
    feeds.update({name: _numpy(v) for name, v in zip(rest, values, strict=True)})
    return feeds


def calibration_feeds(batches: Iterable[Any], names: Sequence[str], samples: int,
                      chunk: int | None = CHUNK) -> list[dict[str, np.ndarray]]:
    """The inputs of the first ``samples`` samples of ``batches`` (targets, if any, left out)
    as feeds of a session taking ``names``, in runs of at most ``chunk`` samples (None: as
    the batches come, for a model with a fixed batch size)."""
    feeds: list[dict[str, np.ndarray]] = []
    taken = 0
    for batch in batches:
        inputs, _ = split(batch, error=QuantizeError)
        whole = _feeds(names, inputs.args, inputs.kwargs)
        size = min(len(next(iter(whole.values()))), samples - taken)
        step = chunk or size
        for start in range(0, size, step):
            feeds.append({k: v[start:min(size, start + step)] for k, v in whole.items()})
        taken += size
        if taken >= samples:
            break
    if not feeds:
        raise QuantizeError("the calibration data gave no batches: check --data is not empty")
    return feeds


class _Reader:
    """ONNX Runtime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict[str, np.ndarray]]):
        self.feeds = feeds
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def __len__(self) -> int:
        return len(self.feeds)


@contextlib.contextmanager
def _quiet():
    """ONNX Runtime's quantization tools log warnings and print for every model."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    with contextlib.redirect_stdout(io.StringIO()):
        try:
            yield
        finally:
            root.setLevel(level)


class _Quantizer:
    """One FP32 file prepared for quantization, its ranges calibrated once, and INT8 candidates
    made from it with some nodes left in FP32."""

    def __init__(self, fp32: Path, feeds: list[dict[str, np.ndarray]], config: QuantizeConfig,
                 tmp: Path, preprocess: bool = True):
        import onnx

        self.config, self.feeds, self.tmp = config, feeds, tmp
        self.model_path = tmp / "prepared.onnx"
        self.preprocessed = preprocess and _preprocess(fp32, self.model_path)
        if not self.preprocessed:
            shutil.copyfile(fp32, self.model_path)
        model = onnx.load(str(self.model_path))
        for i, node in enumerate(model.graph.node):  # nodes_to_exclude goes by name
            node.name = node.name or f"{node.op_type}_{i}"
        onnx.save(model, str(self.model_path))
        self.graph = model.graph
        self.cache = tmp / "calibration.json"
        self.made = 0

    def make(self, excluded: Sequence[str] = ()) -> Path:
        """An INT8 candidate with the nodes ``excluded`` left in FP32; its path."""
        self.made += 1
        out = self.tmp / f"candidate{self.made}.onnx"
        try:
            with _quiet():
                if self.config.runtime == "openvino-cpu":
                    _nncf(self.model_path, out, self.feeds, self.config, excluded)
                else:
                    _ort(self.model_path, out, self.feeds, self.config, excluded, self.cache)
        except StructPruneError:
            raise
        except Exception as exc:  # noqa: BLE001 - the quantizers raise anything
            raise QuantizeError(f"the {self.config.runtime} quantizer cannot handle this model "
                                f"({type(exc).__name__}: {first_line(exc, 160)}); keep the "
                                "FP32 file") from exc
        return out


def _preprocess(fp32: Path, out: Path) -> bool:
    """ONNX Runtime's pre-processing (shape inference, constant folding, BatchNorm folded into
    convolutions) into ``out``; whether it ran (the caller copies the file when it did not)."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        with _quiet():
            quant_pre_process(str(fp32), str(out))
        return True
    except Exception:  # noqa: BLE001 - quantization still works on the file as it is
        return False


def _ort(model: Path, out: Path, feeds: list[dict[str, np.ndarray]], config: QuantizeConfig,
         excluded: Sequence[str], cache: Path) -> None:
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    method = {"minmax": CalibrationMethod.MinMax, "entropy": CalibrationMethod.Entropy,
              "percentile": CalibrationMethod.Percentile}[config.method]
    quantize_static(str(model), str(out), _Reader(feeds), quant_format=QuantFormat.QDQ,
                    per_channel=config.per_channel, activation_type=QuantType.QUInt8,
                    weight_type=QuantType.QInt8, calibrate_method=method,
                    reduce_range=saturating_int8(),
                    nodes_to_exclude=list(excluded), calibration_cache_path=str(cache))


def saturating_int8() -> bool:
    """Whether this CPU multiplies u8 by s8 with AVX2 alone (x86 without VNNI), whose 16-bit
    intermediate sums saturate: ONNX Runtime's guidance is then to quantize weights to 7 bits
    (``reduce_range``); with VNNI, AMX, or on other CPUs, all 8 are exact."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return False
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return not any(flag in flags for flag in ("avx512_vnni", "avx_vnni", "amx_int8"))


def _nncf(model: Path, out: Path, feeds: list[dict[str, np.ndarray]], config: QuantizeConfig,
          excluded: Sequence[str]) -> None:
    import nncf
    import onnx

    quantized = nncf.quantize(onnx.load(str(model)), nncf.Dataset(feeds),
                              subset_size=max(1, len(feeds)),
                              ignored_scope=nncf.IgnoredScope(names=list(excluded),
                                                              validate=False))
    onnx.save(quantized, str(out))


def _qdq_pairs(graph: Any) -> dict[str, str]:
    """Quantized activations of a QDQ graph: float tensor -> its dequantized twin (weights,
    which are initializers, left out)."""
    initializers = {t.name for t in graph.initializer}
    produced_by = {out: node for node in graph.node for out in node.output}
    pairs = {}
    for node in graph.node:
        if node.op_type != "DequantizeLinear":
            continue
        q = produced_by.get(node.input[0])
        if q is not None and q.op_type == "QuantizeLinear" and q.input[0] not in initializers:
            pairs.setdefault(q.input[0], node.output[0])
    return pairs


def _channel_energy(signal: np.ndarray, noise: np.ndarray) -> list[np.ndarray]:
    """Per channel (axis 1; the whole tensor when it has none), the energy of the signal and
    of the noise."""
    if signal.ndim < 2:
        signal, noise = signal.reshape(1, 1, -1), noise.reshape(1, 1, -1)
    axes = tuple(a for a in range(signal.ndim) if a != 1)
    s = (signal.astype(np.float64) ** 2).sum(axis=axes)
    n = (noise.astype(np.float64) ** 2).sum(axis=axes)
    return [s, n]


def rank_activations(int8: Path, feeds: list[dict[str, np.ndarray]]) -> list[tuple[str, float]]:
    """The quantized activations of the QDQ file ``int8``, noisiest first: (tensor, mean over
    its channels of the signal to quantization noise ratio in dB), measured on ``feeds``. The
    mean over channels, not the ratio of the whole tensor: a channel of huge values hides the
    others' loss from a whole-tensor ratio."""
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(int8))
    pairs = _qdq_pairs(model.graph)
    known = {o.name for o in model.graph.output}
    for name in [n for pair in pairs.items() for n in pair]:
        if name not in known:
            model.graph.output.append(onnx.helper.make_tensor_value_info(
                name, onnx.TensorProto.FLOAT, None))
            known.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    energy: dict[str, list[np.ndarray]] = {}
    seen = 0
    for feed in feeds:
        values = dict(zip(names, session.run(None, feed), strict=True))
        for tensor, dequantized in pairs.items():
            s, n = _channel_energy(values[tensor], values[tensor] - values[dequantized])
            if tensor in energy:
                energy[tensor][0] += s
                energy[tensor][1] += n
            else:
                energy[tensor] = [s, n]
        seen += len(next(iter(feed.values())))
        if seen >= RANKING_SAMPLES:
            break
    ranked = []
    for tensor, (s, n) in energy.items():
        live = s > 0  # channels a ReLU zeroed carry no signal to lose
        if not live.any():
            continue
        db = 10 * np.log10(s[live] / np.maximum(n[live], np.finfo(np.float64).tiny))
        ranked.append((tensor, float(np.mean(np.minimum(db, 200.0)))))
    return sorted(ranked, key=lambda item: item[1])


# ops that carry their input's quantization through (the quantizer gives their output the
# input's scale, or fuses them away): keeping a tensor in FP32 means keeping the layers on
# both sides of a chain of them in FP32
PASS_THROUGH = frozenset({"Relu", "Clip", "LeakyRelu", "MaxPool", "Reshape", "Flatten",
                          "Transpose", "Squeeze", "Unsqueeze", "Identity", "Resize", "Slice",
                          "Gather", "Split", "Pad", "DepthToSpace", "SpaceToDepth"})


def _unit(graph: Any, tensor: str) -> list[str]:
    """The nodes that keep ``tensor`` in FP32 when all are left out: its producer and its
    consumers, through chains of :data:`PASS_THROUGH` ops up to the layers on either side."""
    initializers = {t.name for t in graph.initializer}
    producer = {out: node for node in graph.node for out in node.output}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    found: dict[str, None] = {}
    todo = [tensor]
    seen = set()
    while todo:
        name = todo.pop()
        if name in seen or name in initializers:
            continue
        seen.add(name)
        for node in [producer[name]] if name in producer else []:
            if node.name not in found:
                found[node.name] = None
                if node.op_type in PASS_THROUGH:
                    todo += [i for i in node.input[:1]]
        for node in consumers.get(name, []):
            if node.name not in found:
                found[node.name] = None
                if node.op_type in PASS_THROUGH:
                    todo += list(node.output)
    order = {node.name: i for i, node in enumerate(graph.node)}
    return sorted(found, key=order.get)


def _quantized_nodes(path: Path) -> int:
    import onnx

    return sum(node.op_type == "QuantizeLinear" for node in onnx.load(str(path)).graph.node)


def _runs(path: Path, feed: dict[str, np.ndarray]) -> None:
    """The candidate loads and runs in ONNX Runtime (a quantizer can write a file it cannot)."""
    try:
        OnnxModel(path).session.run(None, feed)
    except Exception as exc:  # noqa: BLE001 - onnxruntime's own errors, one line
        raise QuantizeError(f"ONNX Runtime cannot run the INT8 model the quantizer wrote "
                            f"({first_line(exc, 160)}); keep the FP32 file") from exc


def quantize_onnx(fp32: str | Path, batches: Iterable[Any], config: QuantizeConfig | None = None,
                  *, drop: Drop | None = None, out: str | Path | None = None,
                  preprocess: bool = True,
                  progress: Callable[[str], None] = lambda step: None) -> dict[str, Any]:
    """Write the INT8 model of the ONNX file ``fp32`` to ``out`` (default
    :func:`int8_path`), calibrated on the inputs of ``batches`` (``config.samples`` samples;
    targets, if any, are not read), as ``config`` says; the FP32 file is only read, and
    ``out`` is written whole or not at all.

    With ``config.max_drop`` and ``drop`` (what a candidate file costs, in points, against
    the FP32 model), nodes are left in FP32 by measurement until the drop is within
    ``max_drop`` (see the module docstring). Returns the record: the file, the settings, the
    nodes left in FP32, the drop measured (None without ``drop``) and every trial.
    ``preprocess``: run ONNX Runtime's pre-processing first (a model of one layer needs
    none)."""
    config = config or QuantizeConfig()
    check(config)
    fp32 = Path(fp32)
    out = Path(out) if out is not None else int8_path(fp32)
    if not fp32.is_file():
        raise QuantizeError(f"{fp32} is missing: prune again without --no-onnx")
    if out.resolve() == fp32.resolve():
        raise QuantizeError(f"the INT8 file would overwrite {fp32}: choose another name")
    start = time.perf_counter()
    inputs = OnnxModel(fp32).session.get_inputs()
    fixed_batch = bool(inputs) and isinstance((inputs[0].shape or [None])[0], int)
    feeds = calibration_feeds(batches, [i.name for i in inputs], config.samples,
                              None if fixed_batch else CHUNK)
    with tempfile.TemporaryDirectory(prefix="structprune-quantize-") as tmp:
        progress(f"calibrate {fp32.name} ({config.method})")
        quantizer = _Quantizer(fp32, feeds, config, Path(tmp), preprocess)
        best = quantizer.make()
        if not _quantized_nodes(best):
            raise QuantizeError(f"nothing in {fp32.name} can be quantized to INT8 (no "
                                "convolution, matrix product or other quantizable op): keep "
                                "the FP32 file")
        _runs(best, feeds[0])
        excluded: list[str] = []
        measured = float(drop(best)) if drop is not None else None
        trials = [] if measured is None else [{"excluded": [], "drop": measured, "why": "all"}]
        if measured is not None and config.max_drop is not None and measured > config.max_drop:
            progress(f"{fp32.name}: INT8 costs {measured:.2f} points; finding the layers")
            best, excluded, measured = _search(quantizer, best, drop, config.max_drop, trials,
                                               progress)
        atomic_write(out, lambda path: shutil.copyfile(best, path))
        quantized = _quantized_nodes(out)
    return {"file": out.name, "fp32_file": fp32.name, "runtime": config.runtime,
            "format": "QDQ", "per_channel": config.per_channel,
            "calibration": {"method": config.method if config.runtime == "ort-cpu" else "nncf",
                            "samples": sum(len(next(iter(f.values()))) for f in feeds)},
            "preprocessed": quantizer.preprocessed, "quantize_nodes": quantized,
            "bytes": out.stat().st_size, "fp32_bytes": fp32.stat().st_size,
            "max_drop": config.max_drop, "drop": measured,
            "met": None if config.max_drop is None or measured is None
            else measured <= config.max_drop,
            "excluded": excluded, "trials": trials,
            "seconds": time.perf_counter() - start}


def _search(quantizer: _Quantizer, full: Path, drop: Drop, max_drop: float,
            trials: list[dict[str, Any]], progress: Callable[[str], None],
            ) -> tuple[Path, list[str], float]:
    """Leave nodes in FP32 until the drop is within ``max_drop``: the units around the
    :data:`SINGLE_TRIALS` noisiest activations each alone, then cumulatively (best measured
    first, then the rest by noise). Appends every trial; returns the file, the nodes and its
    drop (everything in FP32 at worst, which the FP32 file's own drop bounds)."""
    ranked = rank_activations(full, quantizer.feeds)
    units = []
    for tensor, _ in ranked:
        unit = _unit(quantizer.graph, tensor)
        if unit and unit not in units:
            units.append(unit)

    def trial(nodes: list[str], why: str) -> tuple[Path, float]:
        path = quantizer.make(nodes)
        value = float(drop(path))
        trials.append({"excluded": nodes, "drop": float(value), "why": why})
        progress(f"{len(nodes)} node(s) in FP32: {value:.2f} points")
        return path, value

    singles = []
    for unit in units[:SINGLE_TRIALS]:
        path, value = trial(unit, "alone")
        if value <= max_drop:
            return path, unit, value
        singles.append((value, unit))
    order = [unit for _, unit in sorted(singles, key=lambda s: s[0])] + units[SINGLE_TRIALS:]
    excluded: list[str] = []
    path, value = full, math.inf
    for unit in order:
        excluded += [name for name in unit if name not in excluded]
        path, value = trial(list(excluded), "cumulative")
        if value <= max_drop:
            break
    return path, excluded, value


def quantize_bytes(model: bytes, shapes: Sequence[Sequence[int]],
                   config: QuantizeConfig | None = None, seed: int = 0) -> bytes:
    """The INT8 model of the ONNX model ``model`` (bytes), calibrated on seeded random
    inputs of ``shapes`` (``config.samples`` of them, in batches of the first shape's size):
    for timing, where the ranges do not matter, as the latency table's layers and a speed
    target's candidates are."""
    config = config or QuantizeConfig(samples=shapes[0][0] if shapes else 1)
    g = torch.Generator().manual_seed(seed)
    count = max(1, -(-config.samples // max(1, shapes[0][0])))
    batches = [tuple(torch.randn(*shape, generator=g) for shape in shapes)
               for _ in range(count)]
    with tempfile.TemporaryDirectory(prefix="structprune-quantize-") as tmp:
        fp32 = Path(tmp) / "model.onnx"
        fp32.write_bytes(model)
        quantize_onnx(fp32, batches, config, preprocess=False)
        return int8_path(fp32).read_bytes()


def time_pair(fp32: Path, int8: Path, shapes: Sequence[Sequence[int]], runtime: str = "ort-cpu",
              *, threads: int | None = None, batch: int = 1, **timing: Any) -> dict[str, Any]:
    """FP32 against INT8 on ``runtime``, interleaved (``timing`` as :func:`bench.interleaved`
    takes it; a short run by default): the medians, the speed-up, and which file to deploy
    (the FP32 one when INT8 is not faster: the guard)."""
    timing = {"warmup": 2, "repeats": 10, "max_seconds": 10.0, **timing}
    target = make_target(runtime, threads, batch)
    fp32_ms, int8_ms = bench.interleaved(target.onnx_runner(fp32, shapes),
                                         target.onnx_runner(int8, shapes), **timing)
    speedup = float(np.median(np.array(fp32_ms) / np.array(int8_ms)))
    return {"runtime": runtime, "threads": target.cpu_threads, "batch": batch,
            "fp32_ms": float(np.median(fp32_ms)), "int8_ms": float(np.median(int8_ms)),
            "speedup": speedup, "int8_faster": speedup > 1.0,
            "recommended": int8.name if speedup > 1.0 else fp32.name}


__all__ = ["METHODS", "QUANTIZERS", "SUFFIX", "OnnxModel", "QuantizeError", "calibration_feeds",
           "check", "int8_path", "nncf_available", "quantize_bytes", "quantize_onnx",
           "rank_activations", "time_pair"]
