"""Target runtimes: the one runtime every latency decision of ``--target`` is measured on.

A :class:`Target` names the runtime (ONNX Runtime on the CPU, OpenVINO on the CPU, ONNX
Runtime's CUDA or TensorRT provider, or torch on CUDA in fp16 or fp32), its thread count
(CPU runtimes), the batch size and, on ONNX Runtime's CPU, whether the models run in INT8
(static QDQ, :mod:`structprune.deploy.quantize`). It makes runners for ONNX models (a file or
bytes) and for torch modules, and a fingerprint of the machine and runtime versions that the
latency table's cache is keyed by. A runtime that is not available here is refused with one
line.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from structprune.deploy import bench
from structprune.errors import StructPruneError

ONNX_RUNTIMES = ("ort-cpu", "openvino-cpu", "ort-cuda", "ort-tensorrt")
INT8_RUNTIMES = ("ort-cpu",)  # where a target may time its models in INT8
TORCH_RUNTIMES = ("torch-cuda-fp16", "torch-cuda-fp32")
RUNTIMES = ONNX_RUNTIMES + TORCH_RUNTIMES
CPU_RUNTIMES = ("ort-cpu", "openvino-cpu")

# The channel step the width search starts from on each runtime; the latency table then says
# which multiples of it are fast. CPU kernels work on blocks of 8 or 16 channels (ONNX
# Runtime's NCHWc, oneDNN), tensor cores on multiples of 8 in fp16 and of 4 in tf32.
DEFAULT_STEP = {"ort-cpu": 8, "openvino-cpu": 8, "ort-cuda": 8, "ort-tensorrt": 8,
                "torch-cuda-fp16": 8, "torch-cuda-fp32": 4}

_PROVIDERS = {"ort-cpu": "CPUExecutionProvider", "ort-cuda": "CUDAExecutionProvider",
              "ort-tensorrt": "TensorrtExecutionProvider"}


class RuntimeUnavailable(StructPruneError):
    """The target runtime is not installed or has no device on this machine."""


@dataclass(frozen=True)
class Target:
    """Where latency is measured: ``runtime`` (one of :data:`RUNTIMES`), ``threads``
    (intra-op threads of a CPU runtime; None means every core), ``batch``, and ``int8``: the
    layers and pruned candidates are timed quantized (one of :data:`INT8_RUNTIMES`)."""

    runtime: str
    threads: int | None = None
    batch: int = 1
    int8: bool = False

    @property
    def dtype(self) -> str:
        return "int8" if self.int8 else "fp16" if self.runtime.endswith("fp16") else "fp32"

    @property
    def uses_onnx(self) -> bool:
        return self.runtime in ONNX_RUNTIMES

    @property
    def cpu_threads(self) -> int | None:
        """Threads for a CPU runtime (every core when not set); None elsewhere."""
        if self.runtime not in CPU_RUNTIMES:
            return None
        return self.threads or os.cpu_count() or 1

    def describe(self) -> str:
        threads = self.cpu_threads
        return (f"{self.runtime}" + (f", {threads} thread{'s' * (threads != 1)}" if threads
                                     else "") + f", batch {self.batch}"
                + (", INT8" if self.int8 else ""))

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "threads": self.cpu_threads, "dtype": self.dtype}

    def sync(self) -> Callable[[], None]:
        """What to call after a run so that its time is over (CUDA is asynchronous)."""
        if self.runtime in TORCH_RUNTIMES:
            import torch

            return torch.cuda.synchronize
        return lambda: None

    def onnx_runner(self, model: Path | bytes, shapes: Sequence[Sequence[int]]) -> bench.Runner:
        """A runner of the ONNX ``model`` (a file, or its bytes) on this target."""
        if self.runtime == "openvino-cpu":
            return bench.openvino_runner(model, self.batch, shapes, self.cpu_threads)
        if self.runtime not in _PROVIDERS:
            raise ValueError(f"{self.runtime} runs torch modules, not ONNX files")
        source: Any = model if isinstance(model, bytes) else Path(model)
        return bench.ort_runner(source, self.batch, shapes, self.cpu_threads,
                                _PROVIDERS[self.runtime])

    def onnx_kernel_ms(self, model: Path | bytes, shapes: Sequence[Sequence[int]], runs: int,
                       before_run: Callable[[], None] = lambda: None) -> list[float]:
        """Per run of the ONNX ``model``, the milliseconds this CPU runtime's own profiler
        gives its compute nodes (without the call overhead and layout reorders)."""
        if self.runtime == "openvino-cpu":
            return bench.openvino_kernel_ms(model, self.batch, shapes, self.cpu_threads, runs,
                                            before_run)
        if self.runtime != "ort-cpu":
            raise ValueError(f"{self.runtime} has no kernel timer; time it by the wall clock")
        # a quantized layer inside a model takes and gives 8-bit tensors: its one-layer
        # model's (de)quantization of the input and output is left out too
        skip = bench.LAYOUT_NODES | (bench.QDQ_NODES if self.int8 else frozenset())
        return bench.ort_kernel_ms(model, self.batch, shapes, self.cpu_threads,
                                   _PROVIDERS[self.runtime], runs, before_run, skip)

    def torch_runner(self, model: Any, shapes: Sequence[Sequence[int]]) -> bench.Runner:
        """A CUDA-graph replay of a copy of ``model`` on this target's dtype, channels_last."""
        import torch

        dtype = torch.float16 if self.dtype == "fp16" else torch.float32
        module = copy.deepcopy(model).eval().to("cuda", dtype)
        module = module.to(memory_format=torch.channels_last)
        inputs = [torch.randn((self.batch, *s[1:]), device="cuda", dtype=dtype) for s in shapes]
        inputs = [x.to(memory_format=torch.channels_last) if x.ndim == 4 else x for x in inputs]
        return bench.torch_runner(module, inputs, graph=True)


def check_runtime(runtime: str) -> None:
    """Raise :class:`RuntimeUnavailable` (one line) unless ``runtime`` can run here."""
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"unknown target {runtime!r}: use one of {', '.join(RUNTIMES)}")
    if runtime == "openvino-cpu" and not bench.openvino_available():
        raise RuntimeUnavailable("target openvino-cpu needs OpenVINO: pip install "
                                 "'structprune[openvino]'")
    if runtime in ("ort-cuda", "ort-tensorrt"):
        import onnxruntime as ort

        provider = _PROVIDERS[runtime]
        if provider not in ort.get_available_providers():
            raise RuntimeUnavailable(
                f"target {runtime} needs ONNX Runtime's {provider} (onnxruntime-gpu and a GPU); "
                f"this machine offers {', '.join(ort.get_available_providers())}")
    if runtime in TORCH_RUNTIMES:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeUnavailable(f"target {runtime} needs a CUDA GPU, and torch sees none "
                                     "here: use --target ort-cpu or openvino-cpu")


def make_target(runtime: str, threads: int | None = None, batch: int = 1,
                int8: bool = False) -> Target:
    """A checked :class:`Target`: the runtime is available, threads and batch make sense,
    INT8 only where it is timed (:data:`INT8_RUNTIMES`)."""
    if int8 and runtime in RUNTIMES and runtime not in INT8_RUNTIMES:
        raise RuntimeUnavailable(f"a target in INT8 is timed on {', '.join(INT8_RUNTIMES)}, "
                                 f"not {runtime}: use --target ort-cpu, or drop --quantize")
    check_runtime(runtime)
    if threads is not None and threads < 1:
        raise StructPruneError(f"--threads {threads} must be 1 or more")
    if threads is not None and runtime not in CPU_RUNTIMES:
        raise StructPruneError(f"--threads sets a CPU runtime's threads; {runtime} has none")
    if batch < 1:
        raise StructPruneError(f"--batch {batch} must be 1 or more")
    return Target(runtime, threads, batch, int8)


def fingerprint(target: Target) -> dict[str, Any]:
    """The machine and the runtime's versions: a latency measured under another fingerprint
    says nothing about this one."""
    info = bench.machine()
    found: dict[str, Any] = {"runtime": target.runtime, "cpu": info["cpu"],
                             "cores": info["cores"]}
    if target.runtime in _PROVIDERS:
        found["onnxruntime"] = info["onnxruntime"]
    if target.runtime == "openvino-cpu":
        found["openvino"] = info.get("openvino")
    if target.runtime not in CPU_RUNTIMES:
        import torch

        found["gpu"] = info["gpu"]
        found["torch"] = info["torch"]
        found["cuda"] = torch.version.cuda
    return found


def fingerprint_digest(found: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:12]
