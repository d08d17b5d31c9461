"""ONNX in, pruned ONNX out (issue #27): the same model pruned from its ONNX file and from
PyTorch keeps the same MACs and runs as fast.

For VGG16 and ResNet-50 at 224x224 (torchvision, random weights: latency and MACs do not
depend on them), the ONNX file a deployment engineer would hold is written by torch's own
exporter (``torch.onnx.export(dynamo=True)``, a dynamic batch axis). Both sources are pruned
at ratio 0.5 the way ``structprune prune`` prunes them (``prune_to_dir``: the ONNX file with
its own names, opset and axes kept), then the original file, the two ``dense.onnx`` and the
two ``pruned.onnx`` are timed in interleaved rounds on ONNX Runtime CPU, one thread, batch 1
(``structprune.deploy.bench``, as ``structprune bench`` times them). Recorded per model: MACs
and parameters of each route (the MACs must be equal), the group counts, the seconds the
conversion and the pass took, the median latencies and the per-round latency ratio of the
pruned file from ONNX over the one from PyTorch (median and p10-p90), with the machine's load.

Writes ``benchmarks/results/onnx_in_issue27.json``.

    python benchmarks/onnx_in.py --models vgg16,resnet50
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import logging
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

import structprune as sp
from structprune.config import PruneConfig, RunConfig
from structprune.deploy import bench
from structprune.front.models import build_model, export_signature
from structprune.front.workflow import prune_to_dir
from structprune.tree import random_inputs

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "onnx_in_issue27.json"
FILES = ("original", "dense_from_onnx", "pruned_from_onnx", "dense_from_torch",
         "pruned_from_torch")


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def write_file(name: str, size: int, path: Path) -> float:
    """The model's ONNX file as torch.export writes it; seconds taken."""
    model = build_model(f"torchvision:{name}").eval()
    start = time.perf_counter()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(1, 3, size, size),), str(path), dynamo=True,
                          input_names=["input"], output_names=["logits"],
                          dynamic_shapes=({0: torch.export.Dim("batch", max=1024)},))
    return time.perf_counter() - start


def route(spec: str, size: int, ratio: float, out: Path) -> dict:
    """Prune ``spec`` as ``structprune prune SPEC --ratio RATIO`` does, into ``out``."""
    start = time.perf_counter()
    model = build_model(spec).eval()
    built = time.perf_counter() - start
    inputs = random_inputs([(1, 3, size, size)])
    _, figures = prune_to_dir(model, inputs, out, PruneConfig(ratio=ratio),
                              run=RunConfig(signature=export_signature(spec)))
    keys = ("macs_dense", "macs_pruned", "macs_ratio", "params_dense", "params_pruned",
            "groups", "prunable_groups", "groups_pruned", "exporter_pruned", "onnx_rel_error")
    return {"build_seconds": built, "pass_seconds": sum(figures["seconds"].values()),
            "wall_seconds": time.perf_counter() - start, **{k: figures[k] for k in keys}}


def row(name: str, size: int, ratio: float, repeats: int, max_seconds: float,
        tmp: Path) -> dict:
    load_before = load()
    original = tmp / f"{name}.onnx"
    export_seconds = write_file(name, size, original)
    routes = {"onnx": route(str(original), size, ratio, tmp / "from_onnx"),
              "torch": route(f"torchvision:{name}", size, ratio, tmp / "from_torch")}
    paths = {"original": original,
             "dense_from_onnx": tmp / "from_onnx" / "dense.onnx",
             "pruned_from_onnx": tmp / "from_onnx" / "pruned.onnx",
             "dense_from_torch": tmp / "from_torch" / "dense.onnx",
             "pruned_from_torch": tmp / "from_torch" / "pruned.onnx"}
    shapes = [(1, 3, size, size)]
    runners = [bench.ort_runner(paths[k], 1, shapes, 1, "CPUExecutionProvider") for k in FILES]
    times = dict(zip(FILES, (np.asarray(t) for t in bench.interleaved_many(
        runners, warmup=3, repeats=repeats, max_seconds=max_seconds)), strict=True))
    ratio_onnx_torch = times["pruned_from_onnx"] / times["pruned_from_torch"]
    speedup = times["dense_from_onnx"] / times["pruned_from_onnx"]
    return {
        "model": name, "size": size, "ratio": ratio, "export_seconds": export_seconds,
        "routes": routes,
        "same_macs": routes["onnx"]["macs_pruned"] == routes["torch"]["macs_pruned"]
        and routes["onnx"]["macs_dense"] == routes["torch"]["macs_dense"],
        "ms": {k: float(np.median(t)) for k, t in times.items()},
        "pruned_onnx_over_torch": {"median": float(np.median(ratio_onnx_torch)),
                                   "p10": float(np.percentile(ratio_onnx_torch, 10)),
                                   "p90": float(np.percentile(ratio_onnx_torch, 90))},
        "speedup_from_onnx": float(np.median(speedup)),
        "rounds": len(ratio_onnx_torch), "load_before": load_before, "load_after": load()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet50")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"machine": bench.machine(), "date": dt.date.today().isoformat(),
                    "structprune": sp.__version__, "torch": torch.__version__,
                    "setup": {"runtime": "ort-cpu", "threads": 1, "batch": 1,
                              "source_exporter": "torch.onnx.export(dynamo=True)",
                              "ratio": args.ratio, "size": args.size}})
    results.setdefault("models", [])
    for name in [m for m in args.models.split(",") if m]:
        with tempfile.TemporaryDirectory() as tmp:
            result = row(name, args.size, args.ratio, args.repeats, args.max_seconds, Path(tmp))
        results["models"] = [r for r in results["models"]
                             if (r["model"], r["size"], r["ratio"]) != (name, args.size,
                                                                         args.ratio)] + [result]
        print(json.dumps({k: result[k] for k in ("model", "same_macs", "ms",
                                                  "pruned_onnx_over_torch", "load_before",
                                                  "load_after")}), file=sys.stderr, flush=True)
        out.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
