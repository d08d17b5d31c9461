"""Accuracy without labels, compared where recovery is hard, in one process.

Two networks are trained here to convergence on a seeded synthetic set of ten shapes on
textured, cluttered ground (``synthetic_shapes.py``; nothing downloaded): a residual network
(ResNet-20, CIFAR-style) and a depthwise one (MobileNetV2-style inverted residual blocks);
with them the digits CNN, CREPE's pitch network at its "tiny" capacity trained on seeded
harmonic tones (``synthetic_pitch.py``: a conv + BatchNorm + pooling stack over 1024-sample
audio frames whose last map is permuted and reshaped to a fixed size into the classifier;
its accuracy is raw pitch accuracy over 360 bins), and YOLOv8n as ``benchmarks/yolo.py``
trains it on the synthetic detection set (its rows measure fidelity: the mAP50-95 of the
pruned model's boxes against the dense model's, x 100, on 100 validation images; 256
unlabeled training images calibrate). Each is pruned at several channel ratios, and its
validation accuracy is measured

- right after pruning (L2 selection), and after each calibration-only recovery method
  (``bn``, ``bias+bn``, ``lsq+bn``), on 512 *unlabeled* calibration samples;
- with the reconstruction-aware selection (``obs``) followed by ``lsq+bn``: per group at the
  ratio, chosen sequentially on the pruned model's inputs (``--sequential``), and ranked
  across groups at the same ratio (``--global``: its MACs differ);
- after label-free distillation from the dense model on the same unlabeled samples, blended
  by mixup, outputs and the kept channels of every convolution's feature map matched, for as
  many epochs as ``DISTILL_EPOCHS`` gives the model, from the most accurate calibration-only
  model that keeps no more MACs than the per-group ratio does;
- for Torch-Pruning's L2 pruning of the same weights, with BatchNorm re-estimation.

Labels are used only to measure accuracy. Each method's wall time and peak resident memory
(sampled) are recorded. Usage::

    python benchmarks/label_free.py [--models resnet20 mobilenetv2s digits pitch yolov8n]
        [--ratios 0.3 0.5 0.7] [--distill-epochs N] [--mix 1.0] [--feature-weight 1.0]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import psutil
import torch
import torch.nn as nn
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

import synthetic_pitch  # noqa: E402
import synthetic_shapes  # noqa: E402

import structprune as sp  # noqa: E402
from structprune.accuracy.recover import recover  # noqa: E402
from structprune.accuracy.train import fit  # noqa: E402
from structprune.deploy import bench  # noqa: E402

CACHE = Path(os.environ.get("STRUCTPRUNE_BENCH_CACHE", Path.home() / ".cache" / "structprune"))
CALIBRATION = 512
# training epochs (AdamW, cosine schedule): where each model's validation accuracy levels off
EPOCHS = {"resnet20": 6, "mobilenetv2s": 8, "digits": 10, "pitch": 12}
# label-free distillation epochs on the calibration samples: a patient teacher (Beyer et al.
# 2022, "Knowledge distillation: A good teacher is patient and consistent"): on ResNet-20 at
# 0.5, mixup and feature matching, 20 epochs 87.9%, 100 epochs 91.7%, 300 epochs 93.2%
# (dense 94.2%); YOLOv8n's epochs cost 30 times more
DISTILL_EPOCHS = {"resnet20": 300, "mobilenetv2s": 300, "digits": 100, "yolov8n": 20,
                  "pitch": 100}


# ------------------------------------------------------------------------------ models


class Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                       nn.BatchNorm2d(cout))

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(y)) + self.short(x))


class ResNet20(nn.Module):
    """He et al. 2016's CIFAR ResNet-20: three stages of three basic blocks, 16/32/64 wide."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        layers, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                layers.append(Block(cin, cout, stride if i == 0 else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(64, num_classes)

    def forward(self, x):
        return self.fc(self.layers(self.stem(x)).mean((2, 3)))


class InvertedResidual(nn.Module):
    """MobileNetV2's block: 1x1 expansion, 3x3 depthwise, 1x1 linear projection, with the
    residual add when the shape allows."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int = 4):
        super().__init__()
        hidden = cin * expand
        self.body = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.residual = stride == 1 and cin == cout

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2Small(nn.Module):
    """A MobileNetV2-style depthwise network for 32x32 inputs: a 3x3 stem, eight inverted
    residual blocks (24, 32 and 64 wide, stride 2 twice), a 1x1 head of 256 and a linear
    classifier (torchvision's MobileNetV2 trains too slowly on two cores to converge here)."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        layout = [(24, 1), (24, 1), (32, 2), (32, 1), (32, 1), (64, 2), (64, 1), (64, 1)]
        blocks, cin = [], 24
        for cout, stride in layout:
            blocks.append(InvertedResidual(cin, cout, stride))
            cin = cout
        self.features = nn.Sequential(
            nn.Conv2d(3, 24, 3, 1, 1, bias=False), nn.BatchNorm2d(24), nn.ReLU6(), *blocks,
            nn.Conv2d(64, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6())
        self.classifier = nn.Linear(256, num_classes)

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class PitchCNN(nn.Module):
    """CREPE's layout (Kim et al. 2018) at its "tiny" capacity, for 1024-sample audio frames:
    six Conv2d layers over the frame as a 1024 x 1 image (kernels of 512 taps with stride
    4, then of 64 taps), each followed by ReLU, BatchNorm and 2 x 1 max-pooling; the last
    map (64 channels x 4 steps) is permuted to time-major and reshaped to a fixed 256
    features, into a linear layer over 360 pitch bins (so the last conv keeps its width)."""

    def __init__(self, capacity: int = 4, bins: int = 360):
        super().__init__()
        widths = [1] + [m * capacity for m in (32, 4, 4, 4, 8, 16)]
        self.kernels, self.strides = [512] + [64] * 5, [4] + [1] * 5
        self.convs = nn.ModuleList(nn.Conv2d(widths[i], widths[i + 1], (k, 1), (s, 1))
                                   for i, (k, s) in enumerate(zip(self.kernels, self.strides,
                                                                  strict=True)))
        self.norms = nn.ModuleList(nn.BatchNorm2d(w) for w in widths[1:])
        self.in_features = widths[-1] * 4
        self.classifier = nn.Linear(self.in_features, bins)

    def forward(self, x):
        x = x[:, None, :, None]
        for conv, norm, k, s in zip(self.convs, self.norms, self.kernels, self.strides,
                                    strict=True):
            # "same" padding as CREPE's: 254 either side for the first layer, 31 and 32 after
            x = F.pad(x, (0, 0, 254, 254) if s > 1 else (0, 0, (k - 1) // 2, k // 2))
            x = F.max_pool2d(norm(F.relu(conv(x))), (2, 1), (2, 1))
        return self.classifier(x.permute(0, 2, 1, 3).reshape(-1, self.in_features))


# -------------------------------------------------------------------------------- data


def shapes_data(seed: int = 0):
    x_train, y_train = synthetic_shapes.make(6_000, seed=seed)
    x_val, y_val = synthetic_shapes.make(2_000, seed=seed + 1)
    return (x_train, y_train), (x_val, y_val)


def pitch_data(seed: int = 0):
    x_train, y_train = synthetic_pitch.make(8_000, seed=seed)
    x_val, y_val = synthetic_pitch.make(2_000, seed=seed + 1)
    return (x_train, y_train), (x_val, y_val)


def digits_data():
    from structprune.accuracy.data import digits

    splits = digits()
    def stack(loader):
        xs, ys = zip(*loader, strict=True)
        return torch.cat(xs), torch.cat(ys)
    return stack(splits.train), stack(splits.val)


def loader(x: torch.Tensor, y: torch.Tensor | None, batch: int, shuffle: bool, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(x), generator=gen) if shuffle else torch.arange(len(x))
    parts = [order[i:i + batch] for i in range(0, len(x), batch)]
    return [(x[p], y[p]) if y is not None else x[p] for p in parts]


def top1(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return logits.argmax(1) == y


@torch.no_grad()
def accuracy(model: nn.Module, val, hit: Callable[[torch.Tensor, torch.Tensor],
                                                  torch.Tensor] = top1) -> float:
    """Percent of ``val`` the model gets right: top-1 by default; ``hit(logits, labels)``
    says per sample otherwise (the pitch network's raw pitch accuracy)."""
    model.eval()
    x, y = val
    hits = sum(int(hit(model(x[i:i + 500]), y[i:i + 500]).sum())
               for i in range(0, len(x), 500))
    return 100.0 * hits / len(x)


class Epochs:
    """The training batches of 128, in a fresh seeded shuffle each epoch (each iteration)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        self.x, self.y, self.epoch = x, y, 0

    def __iter__(self):
        self.epoch += 1
        return iter(loader(self.x, self.y, 128, True, seed=self.epoch))


def trained(name: str, build: Callable[[], nn.Module], train, epochs: int) -> nn.Module:
    """The model trained on the training split, cached by name and epoch count."""
    from safetensors.torch import load_file, save_file

    torch.manual_seed(0)
    model = build()
    path = CACHE / f"label_free_{name}_e{epochs}.safetensors"
    if path.is_file():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    def report(epoch: int, optimizer) -> None:
        print(f"{name}: epoch {epoch}/{epochs} done", flush=True)

    fit(model, Epochs(*train), epochs, lr=3e-3, seed=0, progress=False,
        on_epoch_end=report)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return model.eval()


# ------------------------------------------------------------------------- measurement


class Peak:
    """The largest resident set size seen while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.process = psutil.Process()
        self.base = self.peak = self.process.memory_info().rss
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        self.start = time.perf_counter()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.process.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.start
        self.running = False
        self.thread.join()
        self.peak_mb = self.peak / 2**20
        self.extra_mb = (self.peak - self.base) / 2**20


def classifier_of(model: nn.Module) -> nn.Module:
    return [m for m in model.modules() if isinstance(m, nn.Linear)][-1]


def bn_reestimate(model: nn.Module, batches) -> None:
    """Torch-only BatchNorm re-estimation (cumulative average), for the Torch-Pruning row."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


def run_model(name: str, dense: nn.Module, x: torch.Tensor, score: Callable[[nn.Module], float],
              calib, ratios, rows, distill_epochs: int, mix: float, feature_weight: float,
              written: Callable[[], None],
              ignored: Callable[[nn.Module], list[nn.Module]] | None = None) -> None:
    """Every method on one model; ``score`` is validation accuracy for a classifier, and
    for YOLO the fidelity to the dense model's boxes (mAP50-95 x 100, dense = 100)."""
    dense.eval()
    dense_acc = score(dense)

    def row(**fields):
        fields = {"model": name, "dense_accuracy": dense_acc, **fields}
        fields["relative"] = fields["accuracy"] / dense_acc
        rows.append(fields)
        print(json.dumps(fields), flush=True)
        written()  # a run cut short keeps every row it measured

    for ratio in ratios:
        # distillation starts from the most accurate calibration-only model that keeps no
        # more MACs than the uniform ratio does
        kept_best, best, uniform_macs = None, -1.0, None
        for selection, methods in (("l2", ["none"]), ("l2", ["bn"]), ("l2", ["bias", "bn"]),
                                   ("l2", ["lsq", "bn"]), ("obs", ["lsq", "bn"]),
                                   ("obs+sequential", ["lsq", "bn"]),
                                   ("obs+global", ["lsq", "bn"])):
            criterion = selection.split("+")[0]
            with Peak() as cost:
                try:
                    result = sp.prune(dense, (x,), ratio, criterion=criterion,
                                      data=calib if criterion != "l2" else None,
                                      sequential=selection.endswith("+sequential"),
                                      global_ranking=selection.endswith("+global"))
                except Exception as exc:  # noqa: BLE001 - a criterion not built yet
                    print(f"skip {criterion}: {exc}")
                    break
                report = recover(result.model, dense, result.plan, result.analysis, calib,
                                 methods)
            accuracy, macs = score(result.model), result.figures["macs_ratio"]
            row(tool="structprune", ratio=ratio, selection=selection,
                recovery="+".join(methods), step="calibration only",
                accuracy=accuracy, macs_kept=macs,
                seconds=cost.seconds, peak_rss_mb=cost.peak_mb, extra_rss_mb=cost.extra_mb,
                undone=[e["module"] for e in report["layers"] if e.get("undone")])
            uniform_macs = macs if uniform_macs is None else uniform_macs
            if accuracy > best and macs <= uniform_macs + 1e-9:
                kept_best, best = (selection, methods, result), accuracy
        if distill_epochs:
            distill(row, dense, calib, ratio, *kept_best, score, distill_epochs, mix,
                    feature_weight)
        import torch_pruning as tp

        model = copy.deepcopy(dense)
        for parameter in model.parameters():  # its graph is traced through autograd
            parameter.requires_grad_(True)
        with Peak() as cost:
            try:
                pruner = tp.pruner.MagnitudePruner(
                    model, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                    pruning_ratio=ratio,
                    ignored_layers=(ignored or (lambda m: [classifier_of(m)]))(model))
                pruner.step()
                bn_reestimate(model, calib)
                failed = None
            except Exception as exc:  # noqa: BLE001 - record where the peer breaks
                failed = f"{type(exc).__name__}: {exc}"[:200]
        if failed:
            row(tool="torch_pruning", ratio=ratio, selection="l2", recovery="bn",
                step="calibration only", accuracy=float("nan"), failed=failed)
            continue
        kept = tp.utils.count_ops_and_params(model, x)[0] / \
            tp.utils.count_ops_and_params(dense, x)[0]
        row(tool="torch_pruning", ratio=ratio, selection="l2", recovery="bn",
            step="calibration only", accuracy=score(model), macs_kept=kept,
            seconds=cost.seconds, peak_rss_mb=cost.peak_mb, extra_rss_mb=cost.extra_mb)


def distill(row: Callable[..., None], dense: nn.Module, calib, ratio: float, selection: str,
            methods: list[str], result, score: Callable[[nn.Module], float], epochs: int,
            mix: float, feature_weight: float) -> None:
    """Label-free distillation of ``result.model`` from ``dense`` on the calibration samples,
    and its row."""
    for parameter in result.model.parameters():  # ultralytics loads them frozen
        parameter.requires_grad_(True)
    with Peak() as cost:
        fit(result.model, list(calib), epochs, lr=1e-3, seed=1, teacher=dense,
            progress=False, mix=mix, feature_weight=feature_weight, plan=result.plan)
        result.model.eval()
    samples = sum(len(b) for b in calib)
    row(tool="structprune", ratio=ratio, selection=selection,
        recovery="+".join(methods),
        step=f"label-free distillation, {epochs} epochs on the {samples} "
             f"calibration samples" + (f", mixup {mix}" if mix else "")
             + (f", feature maps x {feature_weight}" if feature_weight else ""),
        accuracy=score(result.model), macs_kept=result.figures["macs_ratio"],
        seconds=cost.seconds, peak_rss_mb=cost.peak_mb, extra_rss_mb=cost.extra_mb)


def run_yolo(weights: Path, args: argparse.Namespace, rows: list[dict],
             written: Callable[[], None]) -> None:
    """YOLOv8n as ``benchmarks/yolo.py`` trained it on the synthetic detection set: 256 of
    its training images unlabeled for calibration, its 100 validation images for the
    fidelity of the pruned model's boxes to the dense model's (mAP50-95 x 100)."""
    if not weights.is_file():
        print(f"skip yolov8n: no {weights} (run benchmarks/yolo.py --work "
              f"{weights.parents[2]} first)")
        return
    from yolo import images  # benchmarks/yolo.py

    from structprune.accuracy.evaluate import fidelity
    from structprune.front.models import build_model

    dense = build_model(f"ultralytics:{weights}").eval()
    size = 192
    root = weights.parents[2] / "shapes" / "images"
    calib = images(root / "train", size, 256, 32)
    val = images(root / "val", size, 100, 25)

    def score(model: nn.Module) -> float:
        found = fidelity(model, dense, val)
        return 100.0 * (found["box_map50_95"] or 0.0)

    def detect_head(model: nn.Module) -> list[nn.Module]:
        return [m for m in model.modules() if type(m).__name__ == "Detect"]

    run_model("yolov8n", dense, torch.randn(1, 3, size, size), score, calib, args.ratios, rows,
              distill_epochs_of(args, "yolov8n"), args.mix, args.feature_weight, written,
              ignored=detect_head)


def distill_epochs_of(args: argparse.Namespace, name: str) -> int:
    return DISTILL_EPOCHS[name] if args.distill_epochs is None else args.distill_epochs


def save(args: argparse.Namespace, rows: list[dict], start: float, complete: bool) -> None:
    """The result file, written after every row so that a run cut short keeps them."""
    out = {"what": "accuracy without labels: calibration-only recovery, reconstruction-aware "
                   "selection and label-free distillation on unlabeled samples",
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "machine": bench.machine(), "load_average": os.getloadavg(),
           "epochs": EPOCHS, "mix": args.mix, "feature_weight": args.feature_weight,
           "distill_epochs": {name: distill_epochs_of(args, name) for name in args.models},
           "calibration_samples": CALIBRATION, "seconds": time.perf_counter() - start,
           "complete": complete, "models": args.models, "rows": rows}
    Path(args.out).write_text(json.dumps(out, indent=1) + "\n")


def run_grid(doc: str, out_name: str, what: str,
             rows_of: Callable[[str, float, tuple, tuple], list[dict]],
             ratios: Sequence[float] = (0.5,)) -> int:
    """The main of a study on the shapes models: ``rows_of(model, ratio, train, val)`` for
    each model and ratio asked (``--models``, ``--ratios``), the JSON rewritten after each."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--models", nargs="+", default=["resnet20", "mobilenetv2s"])
    parser.add_argument("--ratios", nargs="+", type=float, default=list(ratios))
    parser.add_argument("--out", default=str(ROOT / "results" / out_name))
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    train, val = shapes_data()
    rows: list[dict] = []
    for name in args.models:
        for ratio in args.ratios:
            rows += rows_of(name, ratio, train, val)
            out = {"what": what, "date": datetime.datetime.now(datetime.timezone.utc)
                   .isoformat(timespec="seconds"), "machine": bench.machine(),
                   "load_average": os.getloadavg(), "calibration_samples": CALIBRATION,
                   "seconds": time.perf_counter() - start, "rows": rows}
            Path(args.out).write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


def shapes_model(name: str, train) -> nn.Module:
    """ResNet-20 or MobileNetV2-small, trained (cached) on the shapes training split."""
    build = ResNet20 if name == "resnet20" else MobileNetV2Small
    return trained(name, build, train, EPOCHS[name])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+",
                        default=["resnet20", "mobilenetv2s", "digits", "pitch", "yolov8n"])
    parser.add_argument("--ratios", nargs="+", type=float, default=[0.3, 0.5, 0.7])
    parser.add_argument("--distill-epochs", type=int,
                        help="label-free distillation epochs (default: per model, "
                             "DISTILL_EPOCHS; 0: calibration-only rows)")
    parser.add_argument("--feature-weight", type=float, default=1.0,
                        help="weight of matching the dense model's feature maps in "
                             "distillation (0: outputs only)")
    parser.add_argument("--mix", type=float, default=1.0,
                        help="mixup of the calibration samples in distillation (0: off)")
    parser.add_argument("--yolo", default=str(CACHE / "yolo_bench" / "dense" / "weights" /
                                              "best.pt"),
                        help="YOLOv8n trained by benchmarks/yolo.py (its --work folder)")
    parser.add_argument("--out", default=str(ROOT / "results" / "label_free_issue24.json"))
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    start = time.perf_counter()
    rows: list[dict] = []
    shapes = None

    def written() -> None:
        save(args, rows, start, complete=False)

    for name in args.models:
        if name == "yolov8n":
            run_yolo(Path(args.yolo), args, rows, written)
            continue
        if name == "digits":
            from structprune.front.models import digits_cnn

            train, val = digits_data()
            dense = trained("digits", lambda: digits_cnn(), train, EPOCHS["digits"])
            x = torch.randn(1, 1, 32, 32)
        elif name == "pitch":
            train, val = pitch_data()
            dense = trained("pitch", PitchCNN, train, EPOCHS["pitch"])
            x = torch.randn(1, synthetic_pitch.FRAME)
        else:
            shapes = shapes or shapes_data()
            train, val = shapes
            dense = shapes_model(name, train)
            x = torch.randn(1, 3, 32, 32)
        # the calibration samples: the first 512 training images, without their labels
        calib = [b for b in loader(train[0][:CALIBRATION], None, 64, False)]
        hit = synthetic_pitch.pitch_accuracy if name == "pitch" else top1
        run_model(name, dense, x, lambda m, val=val, hit=hit: accuracy(m, val, hit), calib,
                  args.ratios, rows, distill_epochs_of(args, name), args.mix,
                  args.feature_weight, written)
    save(args, rows, start, complete=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
