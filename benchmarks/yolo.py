"""YOLOv8n on the synthetic shapes (``benchmarks/synthetic_detection.py``): trained dense here
with ultralytics' own trainer, pruned at each ratio with each selection criterion, and its
mAP50-95 measured right after pruning, after label-free recovery (calibration images only,
no labels, no gradient step) and after fine-tuning with ultralytics' trainer on the pruned
architecture (``structprune.front.yolo``) for a quarter of the dense training's epochs; the
dense and pruned ONNX files timed on ONNX Runtime CPU (one thread, interleaved rounds) at the
latency size. Torch-Pruning's YOLOv8 recipe runs beside it on the same weights (C2f
rewritten by hand, its L2 magnitude pruner, the Detect head ignored; fine-tuned the same
way), and, without the rewrite, where it breaks.

Writes ``benchmarks/results/yolo_<device>.json`` (``--out``). Nothing is downloaded. The full
run (400 + 100 images of 192 px, 60 dense epochs, 15 for each fine-tuning, two ratios, two
criteria and Torch-Pruning) takes some 50 minutes on 2 busy CPU cores with ``--steps 5``
once the dense model is trained (20 to 40 minutes more); with ``--work DIR`` a dense model
trained there before is reused. The published table is ``--steps 5 --distill``.

    python benchmarks/yolo.py --steps 5 --distill             # the published run
    python benchmarks/yolo.py --train 16 --val 8 --size 64 --epochs 1 --latency-size 128 \\
        --calibration 8 --repeats 3 --out /tmp/yolo_smoke.json    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

import structprune as sp
from structprune.accuracy.data import DataSplits
from structprune.accuracy.recover import recover
from structprune.config import RunConfig
from structprune.core.counts import count_macs
from structprune.deploy import bench
from structprune.front.models import (
    build_model,
    export_form,
    import_ultralytics,
    native_form,
)
from structprune.front.workflow import prune_to_dir
from structprune.front.yolo import (
    offline_args,
    save_ultralytics_checkpoint,
    train_pruned,
    yolo_metrics,
)

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))
from speed_targets import interleaved  # noqa: E402
from synthetic_detection import generate  # noqa: E402


def images(folder: Path, size: int, count: int, batch: int) -> list[torch.Tensor]:
    """Unlabeled calibration batches: the first ``count`` images of ``folder`` as ultralytics
    feeds them (RGB, scaled to [0, 1]; the synthetic images are square, so no letterbox)."""
    files = sorted(folder.glob("*.jpg"))[:count]
    tensors = [torch.from_numpy(np.asarray(Image.open(f).convert("RGB").resize((size, size)),
                                           dtype=np.float32) / 255).permute(2, 0, 1)
               for f in files]
    return [torch.stack(tensors[i:i + batch]) for i in range(0, len(tensors), batch)]


def map50_95(metrics: dict[str, Any]) -> float:
    return metrics["box"]["mAP50-95"]


def latency(dense: torch.nn.Module, pruned: torch.nn.Module, size: int, threads: int,
            repeats: int, tmp: Path, exported: dict[int, Path]) -> dict[str, Any]:
    x = torch.randn(1, 3, size, size)
    return interleaved({"dense": dense, "pruned": pruned}, x, threads, repeats, tmp, exported)


def train_dense(data: Path, args: argparse.Namespace, work: Path) -> Path:
    """YOLOv8n from its yaml (random initialisation), trained by ultralytics as a user would;
    returns its best checkpoint. Reused when ``work`` already holds one."""
    best = work / "dense" / "weights" / "best.pt"
    if best.is_file() and not args.retrain:
        return best
    import_ultralytics()
    from ultralytics import YOLO

    YOLO("yolov8n.yaml").train(data=str(data), epochs=args.epochs, imgsz=args.size,
                               batch=args.batch, device=args.device, workers=args.workers,
                               seed=0, pretrained=False, project=str(work), name="dense",
                               exist_ok=True, verbose=False, **offline_args(args.device))
    return best


def structprune_row(dense: torch.nn.Module, dense_pt: Path, data: Path, criterion: str,
                    ratio: float, calibration: list[torch.Tensor], args: argparse.Namespace,
                    work: Path, exported: dict[int, Path]) -> dict[str, Any]:
    measure = {"imgsz": args.size, "batch": args.batch, "device": args.device,
               "workers": args.workers}
    x = torch.randn(1, 3, args.latency_size, args.latency_size)
    row: dict[str, Any] = {"method": "structprune", "criterion": criterion, "ratio": ratio,
                           "steps": args.steps}
    if args.steps > 1:
        result = stepped(dense, x, criterion, ratio, calibration, args, row)
    else:
        start = time.perf_counter()
        result = sp.prune(dense, (x,), ratio, criterion=criterion, data=calibration)
        row["prune_seconds"] = time.perf_counter() - start
        row["map_pruned"] = map50_95(yolo_metrics(result.model, data, **measure))
        start = time.perf_counter()
        row["recovery"] = recover(result.model, dense, result.plan, result.analysis,
                                  calibration, args.recover.split(","))
        row["recovery_seconds"] = time.perf_counter() - start
    row["macs_ratio"], row["params_ratio"] = (result.figures["macs_ratio"],
                                              result.figures["params_ratio"])
    row["map_recovered"] = map50_95(yolo_metrics(result.model, data, **measure))
    row["finetune"] = finetune(result.model, dense_pt, data, f"finetune_{criterion}_{ratio}",
                               args, work, teacher=dense if args.distill else None)
    row["map_finetuned"] = map50_95(yolo_metrics(result.model, data, **measure))
    save_ultralytics_checkpoint(result.model, dense_pt, work / f"pruned_{criterion}_{ratio}.pt",
                                imgsz=args.size)
    row["latency"] = latency(dense, result.model, args.latency_size, args.threads,
                             args.repeats, work, exported)
    return row


def finetune(model: torch.nn.Module, dense_pt: Path, data: Path, name: str,
             args: argparse.Namespace, work: Path,
             teacher: torch.nn.Module | None = None) -> dict[str, Any]:
    """Fine-tune ``model`` (in place, left on the CPU in eval mode) with ultralytics' trainer
    for a quarter of the dense epochs (``--finetune-epochs``), the same recipe for every
    row; returns what the row records of it."""
    epochs = max(1, args.epochs // 4) if args.finetune_epochs is None else args.finetune_epochs
    batch = args.finetune_batch or args.batch
    trained = train_pruned(model, data, epochs, project=work, name=name, imgsz=args.size,
                           batch=batch, device=args.device, workers=args.workers,
                           teacher=teacher, source=dense_pt, **args.finetune_args)
    model.cpu().eval()
    return {"epochs": epochs, "distill": teacher is not None, "run": trained["run"],
            "batch": batch, "args": trained["train_args"]}


def stepped(dense: torch.nn.Module, x: torch.Tensor, criterion: str, ratio: float,
            calibration: list[torch.Tensor], args: argparse.Namespace, row: dict[str, Any],
            ) -> sp.PruneResult:
    """``prune --steps N --recover ...`` on the calibration images (no labels, no gradient
    step): N steps toward the widths one step gives, each recovered toward the model it began
    from. Fills ``row``'s times and per-step recovery; there is no unrecovered model to
    measure."""
    config = sp.PruneConfig(ratio=ratio, criterion=criterion)
    run = RunConfig(steps=args.steps, recover=tuple(args.recover.split(",")), onnx=False)
    unlabeled = DataSplits(train=calibration, val=calibration[:1], num_classes=None,
                           classes=[], source=f"{len(calibration)} calibration batches")
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        result, figures = prune_to_dir(dense, (x,), out, config, run=run, data=unlabeled)
    row["prune_seconds"] = row["recovery_seconds"] = time.perf_counter() - start
    row["map_pruned"] = None
    row["recovery"] = figures["steps"]["recovery"]
    return result


class C2fV2(torch.nn.Module):
    """Torch-Pruning's YOLOv8 recipe rewrites C2f by hand before pruning
    (``examples/yolov8/yolov8_pruning.py``): ``cv1``'s two halves become two convolutions,
    ``cv0`` and ``cv1``, so that no ``chunk`` splits a pruned tensor. Same outputs."""

    def __init__(self, c2f: torch.nn.Module) -> None:
        from ultralytics.nn.modules import Conv

        super().__init__()
        self.c = c = c2f.c
        whole = c2f.cv1
        self.cv0, self.cv1 = Conv(whole.conv.in_channels, c), Conv(whole.conv.in_channels, c)
        for half, rows in ((self.cv0, slice(0, c)), (self.cv1, slice(c, 2 * c))):
            half.conv.weight.data.copy_(whole.conv.weight.data[rows])
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(half.bn, name).data.copy_(getattr(whole.bn, name).data[rows])
            half.bn.eps, half.bn.momentum, half.act = whole.bn.eps, whole.bn.momentum, whole.act
        self.cv2, self.m = c2f.cv2, c2f.m
        for name in ("f", "i", "type", "np"):  # what ultralytics' model loop reads
            setattr(self, name, getattr(c2f, name))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = [self.cv0(x), self.cv1(x)]
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


def torch_pruning_row(dense: torch.nn.Module, dense_pt: Path, data: Path, ratio: float,
                      args: argparse.Namespace, work: Path,
                      exported: dict[int, Path]) -> dict[str, Any]:
    """Torch-Pruning's YOLOv8 recipe in one step on the same weights: C2f rewritten by hand
    (:class:`C2fV2`), its magnitude (L2) pruner with the Detect head ignored, then fine-tuned
    as structprune's model is (ultralytics' trainer on the pruned architecture; the recipe
    patches ultralytics' trainer to the same end). Without the rewrite Torch-Pruning fails;
    that is recorded too. Each step that fails is recorded with its error."""
    import torch_pruning as tp
    from ultralytics.nn.modules import C2f, Detect

    row: dict[str, Any] = {"method": "torch-pruning", "criterion": "l2", "ratio": ratio,
                           "tp_version": tp.__version__}
    measure = {"imgsz": args.size, "batch": args.batch, "device": args.device,
               "workers": args.workers}
    x = torch.randn(1, 3, args.latency_size, args.latency_size)

    def pruned(rewrite: bool) -> torch.nn.Module:
        model = native_form(copy.deepcopy(dense))
        for parameter in model.parameters():  # its graph is traced through autograd
            parameter.requires_grad_(True)
        if rewrite:
            for index, layer in enumerate(model.model):
                if type(layer) is C2f:
                    model.model[index] = C2fV2(layer)
        ignored = [m for m in model.modules() if isinstance(m, Detect)]
        tp.pruner.MagnitudePruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=ignored).step()
        return model

    step = "prune (C2f as ultralytics wrote it)"
    try:
        pruned(rewrite=False)
        row["without_rewrite"] = "ran"
    except Exception as exc:  # noqa: BLE001 - the baseline's failure is the finding
        row["without_rewrite"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    try:
        step = "prune (recipe: C2f rewritten)"
        model = pruned(rewrite=True)
        export_form(model)
        step = "run"
        with torch.no_grad():
            model(x)
        row["macs_ratio"] = count_macs(sp.capture(model, (x,))) / \
            count_macs(sp.capture(dense, (x,)))
        step = "validate"
        row["map_pruned"] = map50_95(yolo_metrics(model, data, **measure))
        step = "fine-tune"
        row["finetune"] = finetune(model, dense_pt, data, f"finetune_tp_{ratio}", args, work)
        row["map_finetuned"] = map50_95(yolo_metrics(model, data, **measure))
        step = "export and time"
        row["latency"] = latency(dense, model, args.latency_size, args.threads,
                                 args.repeats, work, exported)
        row["status"] = "ran"
    except Exception as exc:  # noqa: BLE001
        row["status"] = f"breaks at {step}"
        row["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        row["traceback"] = traceback.format_exc(limit=4)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", help="folder for the dataset, runs and files (default: a "
                        "temporary folder); a dense model trained there before is reused")
    parser.add_argument("--train", type=int, default=400, help="training images")
    parser.add_argument("--val", type=int, default=100, help="validation images")
    parser.add_argument("--size", type=int, default=192, help="image size (train and val)")
    parser.add_argument("--epochs", type=int, default=60, help="dense training epochs")
    parser.add_argument("--finetune-epochs", type=int,
                        help="fine-tuning epochs (default: a quarter of --epochs)")
    parser.add_argument("--distill", action="store_true",
                        help="fine-tune distilled from the dense model")
    parser.add_argument("--finetune-batch", type=int,
                        help="fine-tuning batch size (default: --batch)")
    parser.add_argument("--finetune-args", default={}, type=json.loads,
                        help="more ultralytics train arguments for every fine-tuning "
                             "(structprune's and Torch-Pruning's), as JSON, e.g. "
                             "'{\"warmup_epochs\": 0}'")
    parser.add_argument("--ratios", default="0.3,0.5")
    parser.add_argument("--criteria", default="l2,obs",
                        help="structprune selection criteria, comma-separated")
    parser.add_argument("--recover", default="lsq,bn", help="label-free recovery methods")
    parser.add_argument("--steps", type=int, default=1,
                        help="prune (and recover) in this many steps toward each ratio's "
                             "widths, as `prune --steps N` does, before fine-tuning")
    parser.add_argument("--calibration", type=int, default=128,
                        help="unlabeled training images for criteria and recovery")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--device", default=None, help="ultralytics device (default: auto)")
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers")
    parser.add_argument("--latency-size", type=int, default=640, help="ONNX timing input size")
    parser.add_argument("--threads", type=int, default=1, help="ONNX Runtime threads")
    parser.add_argument("--repeats", type=int, default=30, help="timing rounds")
    parser.add_argument("--no-torch-pruning", action="store_true")
    parser.add_argument("--retrain", action="store_true", help="train dense again")
    parser.add_argument("--out", help="result file (default: results/yolo_<device>.json)")
    args = parser.parse_args()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(args.out) if args.out else ROOT / "results" / f"yolo_{device}.json"
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp_dir:
        work = Path(args.work or tmp_dir).resolve()
        data = generate(work / "shapes", args.train, args.val, args.size, seed=0)
        start = time.perf_counter()
        dense_pt = train_dense(data, args, work)
        result: dict[str, Any] = {
            "machine": bench.machine(), "date": dt.date.today().isoformat(),
            "settings": {k: v for k, v in vars(args).items() if k not in ("out", "work")},
            "dense_train_seconds": time.perf_counter() - start, "rows": []}
        dense = build_model(f"ultralytics:{dense_pt}")
        measure = {"imgsz": args.size, "batch": args.batch, "device": args.device,
                   "workers": args.workers}
        result["dense"] = yolo_metrics(dense, data, **measure)
        print(f"dense YOLOv8n: mAP50-95 {map50_95(result['dense']):.4f}", flush=True)
        calibration = images(work / "shapes" / "images" / "train", args.size,
                             args.calibration, args.batch)
        exported: dict[int, Path] = {}

        def save(final: bool) -> None:
            # written after every row, so a run cut short keeps what it measured
            result["complete"] = final
            result["wall_seconds"] = time.perf_counter() - started
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(result, indent=1, default=str) + "\n")

        for ratio in (float(r) for r in args.ratios.split(",")):
            for criterion in args.criteria.split(","):
                try:
                    row = structprune_row(dense, dense_pt, data, criterion, ratio,
                                          calibration, args, work, exported)
                except Exception as exc:  # noqa: BLE001 - e.g. a criterion not there yet
                    row = {"method": "structprune", "criterion": criterion, "ratio": ratio,
                           "error": f"{type(exc).__name__}: {exc}"}
                result["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items()
                                  if k not in ("recovery", "latency", "finetune")}),
                      flush=True)
                save(final=False)
            if not args.no_torch_pruning:
                row = torch_pruning_row(dense, dense_pt, data, ratio, args, work, exported)
                result["rows"].append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "traceback"}),
                      flush=True)
                save(final=False)
        save(final=True)
    print(f"wrote {out} ({result['wall_seconds'] / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
