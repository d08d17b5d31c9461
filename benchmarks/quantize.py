"""Pruned and quantized: dense FP32, dense INT8, pruned FP32 and pruned INT8 side by side.

Latency: torchvision models with random weights (latency does not depend on them) pruned by
structprune at a ratio, both ONNX files quantized by ``structprune.deploy.quantize`` (ONNX
Runtime's static QDQ quantizer, per-channel weights, minmax ranges on a few random inputs),
then the four files timed in interleaved rounds on ONNX Runtime CPU, one thread, batch 1
(``structprune.deploy.bench.ort_cells``, as ``structprune bench`` times them); speed-ups over
dense FP32, the machine named and the load average recorded before and after each model.

Accuracy: the digits demo (``structprune.front.demo``: the digits CNN trained, pruned at 0.5,
recovered and fine-tuned), both files quantized on the digits training split and measured on
the held-out validation split through ONNX Runtime (``structprune.front.quantize``): INT8
accuracy against FP32, the goal being within 0.5 points.

Writes ``benchmarks/results/quantize_issue26.json``.

    python benchmarks/quantize.py --models vgg16,resnet50,mobilenet_v2 --ratio 0.5
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision

import structprune as sp
from structprune.accuracy.data import load_data
from structprune.config import QuantizeConfig
from structprune.deploy import bench
from structprune.deploy.export import export_pair
from structprune.deploy.quantize import int8_path, quantize_onnx
from structprune.front.demo import demo
from structprune.front.quantize import quantize_dir

ROOT = Path(__file__).resolve().parent
OUT = ROOT / "results" / "quantize_issue26.json"


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def latency_row(name: str, ratio: float, round_to: int, samples: int, repeats: int,
                max_seconds: float, tmp: Path) -> dict:
    torch.manual_seed(0)
    dense = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    result = sp.prune(dense, (x,), ratio, round_to=round_to, check=False)
    paths = {"dense": tmp / f"{name}_dense.onnx", "pruned": tmp / f"{name}_pruned.onnx"}
    export_pair(dense, result.model, (x,), paths["dense"], paths["pruned"], "torchscript")
    g = torch.Generator().manual_seed(1)
    calibration = [torch.randn(1, 3, 224, 224, generator=g) for _ in range(samples)]
    quantized = {key: quantize_onnx(path, calibration, QuantizeConfig(samples=samples))
                 for key, path in paths.items()}
    prepare_s = time.perf_counter() - start
    load_before = load()
    cell = bench.ort_cells(paths["dense"], paths["pruned"], [tuple(x.shape)], [1], [1],
                           int8={k: int8_path(p) for k, p in paths.items()}, warmup=2,
                           repeats=repeats, max_seconds=max_seconds)[0]
    data = cell.to_json(1 / result.figures["macs_ratio"])
    ms = {"dense_fp32": data["dense_ms"]["median"], "dense_int8": data["dense_int8_ms"]["median"],
          "pruned_fp32": data["pruned_ms"]["median"],
          "pruned_int8": data["pruned_int8_ms"]["median"]}
    return {"model": name, "ratio": ratio, "round_to": round_to,
            "macs_ratio": result.figures["macs_ratio"], "ms": ms,
            "speedup_over_dense_fp32": {"dense_fp32": 1.0,
                                        "dense_int8": data["dense_int8_speedup"],
                                        "pruned_fp32": data["speedup"],
                                        "pruned_int8": data["pruned_int8_speedup"]},
            "int8_over_fp32": data["int8_over_fp32"], "recommended": data["recommended"],
            "rounds": data["repeats"], "cell": data,
            "quantize": {k: {f: q[f] for f in ("bytes", "fp32_bytes", "quantize_nodes",
                                               "seconds", "preprocessed")}
                         for k, q in quantized.items()},
            "prepare_seconds": prepare_s, "load_before": load_before, "load_after": load()}


def digits_row(epochs: int, finetune_epochs: int, samples: int, tmp: Path) -> dict:
    out = tmp / "digits"
    report = demo(out, ratio=0.5, epochs=epochs, finetune_epochs=finetune_epochs,
                  say=lambda text: print(text, file=sys.stderr))
    data = load_data("digits", (1, 1, 32, 32), seed=0)  # the demo's own split
    block = quantize_dir(out, data, QuantizeConfig(samples=samples), [[1, 1, 32, 32]],
                         time_it=False)
    row = {"recipe": report["recipe"], "data": block["data"],
           "calibration_samples": samples}
    for name, r in block["models"].items():
        fp32, int8 = r["fp32_metrics"], r["int8_metrics"]
        row[name] = {"fp32_accuracy": fp32["accuracy"], "int8_accuracy": int8["accuracy"],
                     "drop_points": 100 * (fp32["accuracy"] - int8["accuracy"]),
                     "fp32_macro_f1": fp32["macro_f1"], "int8_macro_f1": int8["macro_f1"],
                     "top1_agreement": r["fidelity"]["top1_agreement"],
                     "rel_error": r["fidelity"]["rel_error"]["output0"],
                     "samples": fp32["samples"]}
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="vgg16,resnet50,mobilenet_v2")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--round-to", type=int, default=1)
    parser.add_argument("--samples", type=int, default=8, help="calibration samples")
    parser.add_argument("--repeats", type=int, default=20, help="interleaved rounds")
    parser.add_argument("--max-seconds", type=float, default=90.0)
    parser.add_argument("--epochs", type=int, default=3, help="digits CNN training epochs")
    parser.add_argument("--finetune-epochs", type=int, default=3)
    parser.add_argument("--no-digits", action="store_true")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.is_file() else {}
    results.update({"machine": bench.machine(), "date": dt.date.today().isoformat(),
                    "structprune": sp.__version__,
                    "setup": {"runtime": "ort-cpu", "threads": 1, "batch": 1,
                              "quantizer": "onnxruntime quantize_static, QDQ, per-channel, "
                                           "U8 activations S8 weights, minmax",
                              "calibration_samples": args.samples, "exporter": "torchscript"}})
    results.setdefault("latency", [])
    with tempfile.TemporaryDirectory() as tmp:
        for name in [m for m in args.models.split(",") if m]:
            row = latency_row(name, args.ratio, args.round_to, args.samples, args.repeats,
                              args.max_seconds, Path(tmp))
            results["latency"] = [r for r in results["latency"]
                                  if (r["model"], r["ratio"], r["round_to"])
                                  != (name, args.ratio, args.round_to)] + [row]
            print(json.dumps({k: row[k] for k in ("model", "ms", "speedup_over_dense_fp32",
                                                  "load_before", "load_after")}),
                  file=sys.stderr, flush=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
        if not args.no_digits:
            results["digits"] = digits_row(args.epochs, args.finetune_epochs, 64, Path(tmp))
            print(json.dumps({k: results["digits"][k] for k in ("dense", "pruned")}),
                  file=sys.stderr)
            out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
