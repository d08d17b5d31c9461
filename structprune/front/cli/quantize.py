"""``structprune quantize``: INT8 of dense.onnx and pruned.onnx in a run folder, calibrated on
``--data``, with accuracy (or fidelity) and latency measured beside FP32; and the flags
``prune --quantize int8`` shares with it (:func:`quantize_args`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from structprune.config import QUANTIZE_PRECISIONS, QuantizeConfig
from structprune.deploy.quantize import METHODS, QUANTIZERS, OnnxModel, check
from structprune.errors import StructPruneError
from structprune.front.cli.arguments import data_splits, require_data
from structprune.front.quantize import MODELS, quantize_dir, summary_lines
from structprune.front.runs import read_report, write_report
from structprune.tree import random_inputs

HELP = "INT8 of dense.onnx and pruned.onnx in DIR, calibrated on --data, measured beside FP32"
DEFAULTS = QuantizeConfig()
# the flags of the settings, by QuantizeConfig field
FLAGS = {"runtime": "--quantize-runtime", "method": "--calibration-method",
         "samples": "--calibration-samples", "max_drop": "--max-drop"}


def quantize_args(p: argparse.ArgumentParser, *, with_switch: bool = False) -> None:
    """The INT8 settings (``with_switch``: also ``--quantize int8``, which turns them on)."""
    g = p.add_argument_group("INT8")
    if with_switch:
        g.add_argument("--quantize", choices=QUANTIZE_PRECISIONS, default=None,
                       help="also write dense.int8.onnx and pruned.int8.onnx, calibrated on "
                            "--data, and measure them beside FP32")
    g.add_argument("--quantize-runtime", default=None, metavar="RUNTIME",
                   help="the runtime the INT8 files are for, whose quantizer makes them: "
                        f"{', '.join(QUANTIZERS)} (NNCF; needs nncf and openvino) (default "
                        f"{DEFAULTS.runtime})")
    g.add_argument("--calibration-method", default=None, metavar="METHOD",
                   help=f"how activation ranges are calibrated: {', '.join(METHODS)} "
                        f"(default {DEFAULTS.method})")
    g.add_argument("--calibration-samples", type=int, default=None, metavar="N",
                   help=f"input samples of --data's training split that calibrate the ranges "
                        f"(default {DEFAULTS.samples})")
    g.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                   help="most points of accuracy INT8 may cost (of top-1 agreement with FP32 "
                        "on data without labels); the layers costing most are found by "
                        "measurement and left in FP32 until it holds")


def quantize_config(args: argparse.Namespace, precision: str | None = "int8"
                    ) -> QuantizeConfig | None:
    """The INT8 settings of ``quantize_args``' flags (None when ``precision`` is None and no
    setting is given; a setting without ``--quantize`` is refused in one line)."""
    given = {field: getattr(args, flag[2:].replace("-", "_")) for field, flag in FLAGS.items()}
    given = {field: value for field, value in given.items() if value is not None}
    if precision is None:
        if given:
            raise StructPruneError(f"{FLAGS[next(iter(given))]} is an INT8 setting: add "
                                   "--quantize int8")
        return None
    return QuantizeConfig(precision=precision, **given)


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("quantize", help=HELP)
    p.add_argument("dir", metavar="DIR", help="output directory of `structprune prune`")
    p.add_argument("--data", metavar="SOURCE",
                   help="what `prune --data` takes: its training split calibrates (labels "
                        "unused), its validation split measures the INT8 models")
    p.add_argument("--batch-size", type=int, default=None, help="batch size of --data")
    quantize_args(p)
    return p


def handle(args: argparse.Namespace) -> int:
    config = quantize_config(args)
    check(config)  # an unknown runtime or method before any work
    require_data(args, "quantize")
    directory = Path(args.dir)
    report = read_report(directory)
    for name in MODELS:
        if not (directory / f"{name}.onnx").is_file():
            raise StructPruneError(f"{directory / name}.onnx is missing: prune again without "
                                   "--no-onnx")
    data = data_splits(args, OnnxModel(directory / "dense.onnx"),
                       random_inputs(report["input_shapes"]), seed=report.get("seed", 0))
    block = quantize_dir(directory, data, config, report["input_shapes"])
    report["quantize"] = block
    write_report(directory, report)
    print(f"structprune: {report['spec']}, INT8 for {config.runtime} on {data.summary()}")
    print("\n".join(summary_lines(block)))
    print(f"wrote {directory}/dense.int8.onnx, pruned.int8.onnx and report.json's quantize "
          "block")
    return 0


__all__ = ["HELP", "add_parser", "handle", "quantize_args", "quantize_config"]
