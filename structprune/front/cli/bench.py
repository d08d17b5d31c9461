"""``structprune bench``: latency of dense.onnx against pruned.onnx in a run folder, on
every runtime present, with dense.int8.onnx and pruned.int8.onnx when `structprune quantize`
wrote them."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from structprune.deploy import bench
from structprune.errors import StructPruneError
from structprune.front.cli.arguments import DEFAULT_BENCH_BATCHES, timing, timing_args
from structprune.front.quantize import int8_files
from structprune.front.runs import dense_and_pruned, read_report

HELP = "latency of dense.onnx against pruned.onnx in DIR"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help=HELP)
    p.add_argument("dir", metavar="DIR", help="output directory of `structprune prune`")
    timing_args(p)
    return p


def bench_dir(directory: Path, args: argparse.Namespace, bar: tqdm | None = None
              ) -> dict[str, Any]:
    """Time the ONNX files of the run folder ``directory`` as ``timing_args`` say (torch on
    CUDA too, when there is a GPU), with its INT8 files when they are there (and not older
    than their FP32 files); ``bar`` advances once per cell."""
    report = read_report(directory)
    for name in ("dense.onnx", "pruned.onnx"):
        if not (directory / name).is_file():
            raise StructPruneError(f"{directory / name} is missing: prune again without --no-onnx")
    torch_models = None
    if torch.cuda.is_available() and not args.no_torch:
        torch_models = dense_and_pruned(directory, report)

    def progress(text: str) -> None:
        if bar is not None:
            bar.set_postfix_str(text)
            bar.update()

    return bench.bench(directory / "dense.onnx", directory / "pruned.onnx",
                       report["input_shapes"], report.get("macs_ratio"),
                       batches=args.batch or DEFAULT_BENCH_BATCHES, threads=args.threads,
                       torch_models=torch_models, progress=progress,
                       openvino=not args.no_openvino, int8=int8_files(directory)[0],
                       **timing(args))


def _cells_expected(args: argparse.Namespace) -> int:
    threads = args.threads or sorted({1, os.cpu_count() or 1})
    batches = args.batch or DEFAULT_BENCH_BATCHES
    n = len(threads) * len(batches)
    if bench.openvino_available() and not args.no_openvino:
        n *= 2
    if torch.cuda.is_available() and not args.no_torch:
        n += 4 * len(batches)
    return n


def handle(args: argparse.Namespace) -> int:
    directory = Path(args.dir)
    timing(args)
    bar = tqdm(total=_cells_expected(args), desc="bench", unit="cell", file=sys.stderr,
               disable=not sys.stderr.isatty())
    result = bench_dir(directory, args, bar)
    bar.close()
    bench.write(result, directory)
    print(bench.markdown(result), end="")
    for line in int8_files(directory)[1]:
        print(line)
    print(f"wrote {directory}/bench.json, bench.md, bench.png")
    return 0


__all__ = ["HELP", "add_parser", "bench_dir", "handle"]
