"""A latency model of the target runtime, from measurement: a lookup table of layer latencies.

Every layer with a probe (convolutions and linear maps, with the pointwise work that follows
them: bias, folded BatchNorm, activation) is timed on the target as it would run inside a
model (see :func:`probe_ms`), at the widths the width search asks for, and the result is
kept in a table keyed by op, input shape, channels in and out, kernel, stride, padding,
dilation, groups, dtype, batch, runtime and threads. The table is cached on disk, one file
per runtime and machine (``$STRUCTPRUNE_CACHE`` or ``~/.cache/structprune``); a file
written under another machine or runtime fingerprint is ignored and rebuilt. A model's
latency is predicted as the sum over its layers, which :mod:`structprune.deploy.speed` checks
against a measurement of the whole exported model.

Which layers a probe exists for is declared once, in :data:`PROBES` (``register_probe`` adds
one for a layer type of your own).
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch.nn as nn
from tqdm import tqdm

from structprune.core.analyse import Analysis
from structprune.core.cost import PruneCost
from structprune.deploy.bench import ort_settle_s
from structprune.deploy.quantize import quantize_bytes
from structprune.deploy.runtimes import Target, fingerprint, fingerprint_digest
from structprune.files import atomic_write_text
from structprune.types import TensorSpec

CACHE_FORMAT = "structprune.latency/3"  # 3: kernel times, 8 MiB evicted before each run


@dataclass(frozen=True)
class LayerShape:
    """One layer as the table keys it (the batch, dtype and runtime come from the target).
    ``input_shape`` excludes the batch axis; ``cin``/``cout`` are whole channel counts."""

    op: str
    input_shape: tuple[int, ...]
    cin: int
    cout: int
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    padding: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1

    def key(self, target: Target) -> str:
        return "|".join([self.op, "x".join(map(str, self.input_shape)),
                         f"cin={self.cin}", f"cout={self.cout}",
                         f"k={'x'.join(map(str, self.kernel))}",
                         f"s={'x'.join(map(str, self.stride))}",
                         f"p={'x'.join(map(str, self.padding))}",
                         f"d={'x'.join(map(str, self.dilation))}", f"g={self.groups}",
                         target.dtype, f"b={target.batch}", target.runtime,
                         f"t={target.cpu_threads or '-'}"])


@dataclass(frozen=True)
class Probe:
    """How one layer type is described and timed alone.

    ``describe(module, input_shape)``: its dense :class:`LayerShape`; ``resize(dense, weight
    shape)``: the shape once its weight is cut to the given shape; ``onnx(shape, batch)``:
    the layer as a one-layer ONNX model (bytes); ``torch(shape)``: the layer as a module."""

    describe: Callable[[nn.Module, tuple[int, ...]], LayerShape | None]
    resize: Callable[[LayerShape, tuple[int, ...]], LayerShape]
    onnx: Callable[[LayerShape, int], bytes]
    torch: Callable[[LayerShape], nn.Module]


def _conv_describe(module: nn.Module, input_shape: tuple[int, ...]) -> LayerShape | None:
    if not isinstance(module.padding, tuple) or module.padding_mode != "zeros":
        return None  # 'same' padding or padded copies: no probe, left out of the table
    return LayerShape("conv2d", tuple(input_shape), module.in_channels, module.out_channels,
                      tuple(module.kernel_size), tuple(module.stride), tuple(module.padding),
                      tuple(module.dilation), module.groups)


def _conv_resize(dense: LayerShape, weight: tuple[int, ...]) -> LayerShape:
    cout, cin_per_group = weight[0], weight[1]
    # whole groups go together (a depthwise conv keeps one group per channel)
    groups = 1 if dense.groups == 1 else max(1, dense.groups * cout // dense.cout)
    cin = cin_per_group * groups
    return replace(dense, input_shape=(cin, *dense.input_shape[1:]), cin=cin, cout=cout,
                   groups=groups)


def _linear_describe(module: nn.Module, input_shape: tuple[int, ...]) -> LayerShape | None:
    return LayerShape("linear", tuple(input_shape), module.in_features, module.out_features)


def _linear_resize(dense: LayerShape, weight: tuple[int, ...]) -> LayerShape:
    cout, cin = weight[0], weight[1]
    return replace(dense, input_shape=(*dense.input_shape[:-1], cin), cin=cin, cout=cout)


def _onnx_bytes(nodes: list, inputs: list, initializers: list) -> bytes:
    from onnx import helper

    output = helper.make_tensor_value_info("y", 1, None)  # 1: FLOAT
    graph = helper.make_graph(nodes, "probe", inputs, [output], initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)],
                             ir_version=8).SerializeToString()


def _conv_onnx(shape: LayerShape, batch: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((shape.cout, shape.cin // shape.groups, *shape.kernel),
                                 dtype=np.float32) * 0.1
    bias = np.zeros(shape.cout, np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *shape.input_shape])
    conv = helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=list(shape.kernel),
                            strides=list(shape.stride), pads=list(shape.padding) * 2,
                            dilations=list(shape.dilation), group=shape.groups)
    relu = helper.make_node("Relu", ["c"], ["y"])
    return _onnx_bytes([conv, relu], [x], [numpy_helper.from_array(weight, "w"),
                                           numpy_helper.from_array(bias, "b")])


def _linear_onnx(shape: LayerShape, batch: int) -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((shape.cin, shape.cout), dtype=np.float32) * 0.1
    bias = np.zeros(shape.cout, np.float32)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, *shape.input_shape])
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"]),
             helper.make_node("Add", ["m", "b"], ["c"]), helper.make_node("Relu", ["c"], ["y"])]
    return _onnx_bytes(nodes, [x], [numpy_helper.from_array(weight, "w"),
                                    numpy_helper.from_array(bias, "b")])


def _conv_torch(shape: LayerShape) -> nn.Module:
    conv = nn.Conv2d(shape.cin, shape.cout, shape.kernel, shape.stride, shape.padding,
                     shape.dilation, shape.groups)
    return nn.Sequential(conv, nn.BatchNorm2d(shape.cout), nn.ReLU())


def _linear_torch(shape: LayerShape) -> nn.Module:
    return nn.Sequential(nn.Linear(shape.cin, shape.cout), nn.ReLU())


PROBES: dict[type, Probe] = {
    nn.Conv2d: Probe(_conv_describe, _conv_resize, _conv_onnx, _conv_torch),
    nn.Linear: Probe(_linear_describe, _linear_resize, _linear_onnx, _linear_torch),
}


def register_probe(module_type: type, probe: Probe) -> None:
    """Time layers of ``module_type`` with ``probe`` (replacing any built-in one)."""
    PROBES[module_type] = probe


def _probe_for(module: nn.Module) -> Probe | None:
    for cls in type(module).__mro__:
        if cls in PROBES:
            return PROBES[cls]
    return None


def time_runner(run: Callable[[], Any], sync: Callable[[], None] = lambda: None,
                min_runs: int = 5, min_seconds: float = 0.03, max_runs: int = 50,
                clock: Callable[[], float] = time.perf_counter) -> float:
    """Median milliseconds of ``run`` after one warm-up call: at least ``min_runs`` runs and
    ``min_seconds`` of them (a short layer is timed more often), at most ``max_runs``."""
    run()
    sync()
    times: list[float] = []
    start = clock()
    while len(times) < max_runs and (len(times) < min_runs or clock() - start < min_seconds):
        t = clock()
        run()
        sync()
        times.append((clock() - t) * 1e3)
    return float(np.median(times))


# warm-up and timed runs of a layer on a CPU runtime's profiler
KERNEL_WARMUP = 3
KERNEL_RUNS = 10
EVICT_BYTES = 8 << 20


class CacheEvictor:
    """Writes :data:`EVICT_BYTES` of a scratch buffer, pushing the layer's weights and input
    out of the per-core caches and partly out of the last level, as the layers run before it
    inside a model would. Chosen by measurement on the three models of the speed benchmark:
    with no eviction the sum over layers under-predicted dense ResNet-50 by 11%, and with
    64 MiB (caches fully cold) it over-predicted dense MobileNetV2 by 20%."""

    def __init__(self, size: int | None = None) -> None:
        self.size = size or EVICT_BYTES
        self._buffer: np.ndarray | None = None

    def __call__(self) -> None:
        if self._buffer is None:
            self._buffer = np.zeros(self.size // 4, np.float32)
        self._buffer += 1.0


evict_caches = CacheEvictor()


def probe_ms(target: Target, probe: Probe, shape: LayerShape) -> float:
    """Milliseconds of one layer on ``target``, as it runs inside a model.

    On a CPU runtime this is the layer's kernel time by the runtime's own profiler, median of
    :data:`KERNEL_RUNS` runs after :data:`KERNEL_WARMUP`, with the caches evicted before each
    run (see :class:`CacheEvictor`). A layer inside a model pays neither the call overhead
    nor the layout reorders around a one-layer model; timed alone by the wall clock,
    ResNet-50's layers summed to 1.46x of the whole model on two threads.
    On a GPU runtime it is the wall clock of repeated runs (a CUDA graph for torch).
    An INT8 target times the layer quantized (static QDQ, calibrated on random inputs)."""
    shapes = [(target.batch, *shape.input_shape)]
    if target.cpu_threads is not None:
        model = probe.onnx(shape, target.batch)
        if target.int8:
            model = quantize_bytes(model, shapes)
        times = target.onnx_kernel_ms(model, shapes, KERNEL_WARMUP + KERNEL_RUNS, evict_caches)
        return float(np.median(times[KERNEL_WARMUP:]))
    if target.uses_onnx:
        run = target.onnx_runner(probe.onnx(shape, target.batch), shapes)
    else:
        run = target.torch_runner(probe.torch(shape), shapes)
    return time_runner(run, target.sync())


def cache_dir() -> Path:
    """``$STRUCTPRUNE_CACHE``, else ``~/.cache/structprune``."""
    return Path(os.environ.get("STRUCTPRUNE_CACHE") or Path.home() / ".cache" / "structprune")


Measure = Callable[[Target, Probe, LayerShape], float]


class LatencyTable:
    """Measured layer latencies on one target, cached on disk per machine and runtime.

    ``ms(probe, shape)`` looks a layer up; ``ensure`` measures every missing one first, with
    a progress bar, and saves the table. ``measure`` times one layer (a fake in tests).
    ``hits`` and ``measured`` count lookups answered from the table and layers timed."""

    def __init__(self, target: Target, directory: str | os.PathLike | None = None,
                 measure: Measure | None = None, progress: bool | None = None):
        self.target = target
        self.fingerprint = fingerprint(target)
        directory = Path(directory) if directory is not None else cache_dir()
        self.path = directory / (f"latency-{target.runtime}-"
                                 f"{fingerprint_digest(self.fingerprint)}.json")
        self.measure = measure or probe_ms
        self.progress = sys.stderr.isatty() if progress is None else progress
        self.hits = 0
        self.measured = 0
        self.seconds = 0.0
        self.entries: dict[str, float] = self._read()
        self.loaded = len(self.entries)
        self._bar: tqdm | None = None

    def _read(self) -> dict[str, float]:
        """The cached entries, or none when the file is missing, unreadable, or written
        under another fingerprint (another machine, runtime or runtime version)."""
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("format") != CACHE_FORMAT \
                or data.get("fingerprint") != self.fingerprint:
            return {}
        entries = data.get("entries")
        return {k: float(v) for k, v in entries.items()} if isinstance(entries, dict) else {}

    def save(self) -> None:
        """Write the table, merged with entries another process saved meanwhile."""
        merged = {**self._read(), **self.entries}
        atomic_write_text(self.path, json.dumps({"format": CACHE_FORMAT,
                                                 "fingerprint": self.fingerprint,
                                                 "entries": merged}, indent=0) + "\n")

    def ensure(self, layers: Iterable[tuple[Probe, LayerShape]]) -> None:
        """Measure the layers the table lacks (each once), then save it."""
        missing: dict[str, tuple[Probe, LayerShape]] = {}
        for probe, shape in layers:
            key = shape.key(self.target)
            if key not in self.entries:
                missing.setdefault(key, (probe, shape))
        if not missing:
            return
        if self._bar is None and self.progress:
            self._bar = tqdm(total=0, desc=f"latency table ({self.target.describe()})",
                             unit="layer", file=sys.stderr)
        if self._bar is not None:
            self._bar.total += len(missing)
            self._bar.refresh()
        start = time.perf_counter()
        if self.target.runtime == "ort-cpu":  # another session's spinning workers slow probes
            time.sleep(ort_settle_s(self.target.cpu_threads))
        for key, (probe, shape) in missing.items():
            self.entries[key] = float(self.measure(self.target, probe, shape))
            self.measured += 1
            if self._bar is not None:
                self._bar.update()
        self.seconds += time.perf_counter() - start
        self.save()

    def ms(self, probe: Probe, shape: LayerShape) -> float:
        key = shape.key(self.target)
        if key in self.entries:
            self.hits += 1
        else:
            self.ensure([(probe, shape)])
        return self.entries[key]

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def summary(self) -> dict[str, Any]:
        return {"path": str(self.path), "entries": len(self.entries),
                "loaded_from_cache": self.loaded, "measured": self.measured,
                "hits": self.hits, "measure_seconds": round(self.seconds, 3),
                "fingerprint": self.fingerprint}


@dataclass
class Layer:
    """One probed layer of the model: its fx node, the weight that scales it, its dense
    shape, and per weight axis the cost model's axis (None where the axis is never cut)."""

    node: str
    weight: str
    probe: Probe
    dense: LayerShape
    weight_shape: tuple[int, ...]
    axes: tuple[int | None, ...]


class LatencyModel:
    """A model's predicted latency on a target: the sum of its probed layers' table entries,
    at the widths a removal (a flag per component, as in :class:`PruneCost`) leaves."""

    def __init__(self, analysis: Analysis, table: LatencyTable, cost: PruneCost | None = None):
        self.analysis = analysis
        self.table = table
        self.cost = cost or PruneCost(analysis)
        capture = analysis.capture
        self.layers: list[Layer] = []
        self.unprobed_macs = 0
        for node in capture.graph.nodes:
            macs = self.cost.node_macs.get(node.name, 0)
            layer = self._layer(node) if macs else None
            if layer is None:
                self.unprobed_macs += macs
            else:
                self.layers.append(layer)
        # per component: the layers one of whose cut axes it is on
        n_axes = self.cost.n_axes
        axis_layers: list[set[int]] = [set() for _ in range(n_axes)]
        for i, layer in enumerate(self.layers):
            for axis in layer.axes:
                if axis is not None:
                    axis_layers[axis].add(i)
        self._axis_layers = axis_layers
        # per group: the layers its units cut (through any axis they are on)
        axis_components: dict[int, set[int]] = {}
        for key, ids in analysis.slots.items():
            axis_components.setdefault(self.cost.axis[key], set()).update(
                analysis.component[ids].tolist())
        self.layers_of_group: dict[int, list[int]] = {}
        for group in analysis.groups:
            units = set(group.units.tolist())
            touched: set[int] = set()
            for axis, components in axis_components.items():
                if units & components:
                    touched |= axis_layers[axis]
            self.layers_of_group[group.index] = sorted(touched)

    def _layer(self, node: Any) -> Layer | None:
        if node.op != "call_module":
            return None
        module = self.analysis.capture.resolve(node.target)
        probe = _probe_for(module)
        weight = self.cost.node_weight.get(node.name)
        arg = node.args[0] if node.args else None
        spec = self.analysis.capture.values.get(getattr(arg, "name", None))
        if probe is None or weight is None or not isinstance(spec, TensorSpec):
            return None
        dense = probe.describe(module, tuple(spec.shape[1:]))
        if dense is None:
            return None
        shape = self.analysis.sizes[weight]
        axes = tuple(self.cost.axis.get((weight, d)) for d in range(len(shape)))
        return Layer(node.name, weight, probe, dense, tuple(shape), axes)

    def shapes(self, kept: np.ndarray, which: Iterable[int] | None = None,
               ) -> list[tuple[Probe, LayerShape]]:
        """The layers (all, or those indexed by ``which``) at the kept counts per axis
        ``kept`` (from :meth:`PruneCost.kept_counts`)."""
        chosen = range(len(self.layers)) if which is None else which
        out = []
        for i in chosen:
            layer = self.layers[i]
            if all(a is None for a in layer.axes):
                out.append((layer.probe, layer.dense))
                continue
            weight = tuple(int(kept[a]) if a is not None else n
                           for a, n in zip(layer.axes, layer.weight_shape, strict=True))
            out.append((layer.probe, layer.probe.resize(layer.dense, weight)))
        return out

    def kept(self, removed: np.ndarray) -> np.ndarray:
        return self.cost.kept_counts(np.asarray(removed, bool))

    def predict(self, removed: np.ndarray | None = None) -> float:
        """Predicted milliseconds: the sum of the layers' table entries."""
        if removed is None:
            removed = np.zeros(self.analysis.n_components, bool)
        layers = self.shapes(self.kept(removed))
        self.table.ensure(layers)
        return float(sum(self.table.ms(p, s) for p, s in layers))

    def summary(self) -> dict[str, Any]:
        total = self.cost.dense_macs or 1
        return {"layers": len(self.layers),
                "macs_covered": 1 - self.unprobed_macs / total,
                "table": self.table.summary()}
