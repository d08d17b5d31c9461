"""Evaluate: accuracy, per-class recall, macro F1 and a confusion matrix, dense against
pruned; and, without labels, the pruned model's fidelity to the dense one.

:func:`predict` runs a classifier over batches with targets, :func:`metrics` scores the
predictions with scikit-learn, :func:`evaluate` does both, and :func:`plot_confusion` draws the
confusion matrices of several models side by side (e.g. "dense" and "pruned").
:func:`fidelity` needs inputs only: how often the two models' top-1 classes agree, the
relative error of every output tensor, and for an ultralytics YOLO detector how well the
pruned model's boxes after NMS find the dense model's, as a box mAP.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from structprune.batches import call, first_tensor, flatten_outputs, labelled
from structprune.errors import StructPruneError


@dataclass
class Metrics:
    """Classification quality of one model on one data set.

    ``recall[c]`` is the fraction of class ``c``'s samples predicted as ``c`` (0 for a class with
    no samples); ``confusion[t][p]`` counts samples of true class ``t`` predicted as ``p``.
    """

    accuracy: float
    recall: list[float]
    macro_f1: float
    confusion: list[list[int]]
    samples: int

    def to_json(self) -> dict[str, Any]:
        """Plain JSON-ready dict of the metrics."""
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Metrics:
        """The inverse of :meth:`to_json`."""
        return cls(
            accuracy=float(data["accuracy"]),
            recall=[float(r) for r in data["recall"]],
            macro_f1=float(data["macro_f1"]),
            confusion=[[int(c) for c in row] for row in data["confusion"]],
            samples=int(data["samples"]),
        )

    @property
    def num_classes(self) -> int:
        return len(self.recall)


def _logits(output: Any) -> torch.Tensor:
    """The class-score tensor of a model output: its first tensor, of shape N,K."""
    logits = first_tensor(output)
    if logits.dim() < 2:
        raise StructPruneError(f"the model output ({list(logits.shape)}) is not class scores "
                               "of shape N,K: evaluate a classifier")
    return logits


@contextmanager
def _evaluating(*models: torch.nn.Module) -> Iterator[None]:
    """The models in eval mode without gradients; every submodule's training flag is put
    back afterwards."""
    training = {m: m.training for model in models for m in model.modules()}
    for model in models:
        model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, flag in training.items():
            module.training = flag


def _class_count(scores: torch.Tensor) -> int | None:
    """K when ``scores`` are class scores N,K (or N,K,1,...: a convolutional classifier's);
    None for other outputs (a detector's, a segmenter's)."""
    if scores.dim() < 2 or any(size != 1 for size in scores.shape[2:]):
        return None
    return int(scores.shape[1])


def classifier_width(model: torch.nn.Module, batch: Any) -> int | None:
    """K when ``model`` outputs class scores N,K on ``batch`` (its first output tensor);
    None for other outputs (a detector's, a segmenter's). The model runs once, in eval mode
    without gradients, on its own device."""
    with _evaluating(model):
        tensors = flatten_outputs(call(model, batch))
    return _class_count(tensors[0]) if tensors else None


def _predict(
    model: torch.nn.Module,
    batches: Iterable,
    device: str | torch.device,
    num_classes: int | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`predict`, plus the width of the model's output (its number of classes)."""
    if num_classes is not None and int(num_classes) < 1:
        raise StructPruneError(f"number of classes {num_classes} must be 1 or more")
    true_parts: list[np.ndarray] = []
    pred_parts: list[np.ndarray] = []
    largest_target, width = -1, 0
    with _evaluating(model):
        for batch in batches:
            inputs, targets = labelled(batch, "evaluation")
            logits = _logits(inputs.to(device).call(model))
            targets = targets.detach().cpu()
            if targets.is_floating_point() or targets.is_complex():
                raise StructPruneError(
                    f"targets of dtype {targets.dtype}: targets must be integer class indices"
                )
            targets = targets.long()
            width = logits.shape[1]
            if targets.numel():
                if int(targets.min()) < 0 or (
                    num_classes is not None and int(targets.max()) >= num_classes
                ):
                    upper = "" if num_classes is None else f" to {num_classes - 1}"
                    raise StructPruneError(
                        f"targets range from {int(targets.min())} to {int(targets.max())}: "
                        f"targets must be class indices 0{upper}"
                    )
                largest_target = max(largest_target, int(targets.max()))
            classes = num_classes if num_classes is not None else largest_target + 1
            if width < largest_target + 1 or (num_classes is not None and width != classes):
                raise StructPruneError(
                    f"the model has {width} outputs but the data has {classes} classes: "
                    "give the model a classifier with one output per class"
                )
            predicted = logits.argmax(dim=1).detach().cpu()
            if predicted.numel() != targets.numel():
                raise StructPruneError(
                    f"the model predicts {predicted.numel()} labels for a batch of "
                    f"{targets.numel()} targets: give one target per sample"
                )
            true_parts.append(targets.reshape(-1).numpy())
            pred_parts.append(predicted.reshape(-1).numpy())
    if not true_parts:
        raise StructPruneError("the data gave no batches: check the validation data")
    return np.concatenate(true_parts), np.concatenate(pred_parts), width


def predict(
    model: torch.nn.Module,
    batches: Iterable,
    device: str | torch.device = "cpu",
    num_classes: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """True and predicted class of every sample in ``batches`` with targets (any form of
    :mod:`structprune.batches` that has them).

    The model runs in eval mode without gradients (every submodule's training flag is put back
    afterwards) and must already be on ``device``; the inputs are moved there. The prediction
    is the argmax over dim 1 of the output's first tensor (as
    :func:`structprune.batches.first_tensor` takes it). Raises StructPruneError when the
    output has fewer classes than the targets need, or not exactly ``num_classes`` when that
    is given.
    """
    y_true, y_pred, _ = _predict(model, batches, device, num_classes)
    return y_true, y_pred


def metrics(y_true: Sequence[int] | np.ndarray, y_pred: Sequence[int] | np.ndarray,
            num_classes: int) -> Metrics:
    """Accuracy, per-class recall, macro F1 over ``num_classes`` classes and the confusion
    matrix, all from scikit-learn. Classes absent from both vectors count with recall 0 and
    F1 0, so that the macro average always spans every class."""
    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if y_true.size == 0 or y_true.shape != y_pred.shape:
        raise StructPruneError(
            f"{y_true.size} targets against {y_pred.size} predictions: give one prediction per "
            "target, at least one"
        )
    if num_classes < 1:
        raise StructPruneError(f"number of classes {num_classes} must be 1 or more")
    for name, values in (("targets", y_true), ("predictions", y_pred)):
        if values.min() < 0 or values.max() >= num_classes:
            raise StructPruneError(
                f"{name} range from {values.min()} to {values.max()}: they must be class "
                f"indices 0 to {num_classes - 1}"
            )
    labels = list(range(num_classes))
    recall = recall_score(y_true, y_pred, labels=labels, average=None, zero_division=0)
    return Metrics(
        accuracy=float(accuracy_score(y_true, y_pred)),
        recall=[float(r) for r in recall],
        macro_f1=float(f1_score(y_true, y_pred, labels=labels, average="macro", zero_division=0)),
        confusion=confusion_matrix(y_true, y_pred, labels=labels).astype(int).tolist(),
        samples=int(y_true.size),
    )


def evaluate(
    model: torch.nn.Module,
    batches: Iterable,
    num_classes: int | None = None,
    device: str | torch.device = "cpu",
) -> Metrics:
    """:func:`predict` then :func:`metrics`. The class count is ``num_classes`` or else the
    width of the model's output, so that a dense and a pruned model (same classifier width)
    are always scored over the same classes, whatever each happens to predict."""
    y_true, y_pred, width = _predict(model, batches, device, num_classes)
    return metrics(y_true, y_pred, num_classes if num_classes is not None else width)


# ------------------------------------------------------------------------------- fidelity

IOU_THRESHOLDS = np.linspace(0.5, 0.95, 10)  # mAP50-95's, as COCO and ultralytics take them
DENSE_BOX_CONFIDENCE = 0.25  # ultralytics' predict default: the dense boxes that count
PRUNED_BOX_CONFIDENCE = 0.001  # ultralytics' val default: every pruned box, with its score
NMS_IOU = 0.7  # ultralytics' default


@dataclass
class FidelityTally:
    """Sums over batches from which :func:`fidelity` is computed. Tallies of disjoint shares
    of the batches (the ranks of a torchrun job) add up with :meth:`merge`."""

    samples: int = 0
    top1_agreed: int | None = None  # None: the outputs are not class scores
    squared_error: list[float] = field(default_factory=list)  # per output tensor
    squared_reference: list[float] = field(default_factory=list)
    # detectors: per pruned box, its hits at each IoU threshold, score and class; the classes
    # of the dense boxes; or why there are no boxes to compare
    box_hits: list[np.ndarray] = field(default_factory=list)
    box_scores: list[np.ndarray] = field(default_factory=list)
    box_classes: list[np.ndarray] = field(default_factory=list)
    dense_box_classes: list[np.ndarray] = field(default_factory=list)
    detector: bool = False
    boxes_skipped: str | None = None

    @classmethod
    def merge(cls, tallies: Sequence[FidelityTally]) -> FidelityTally:
        """One tally of all of ``tallies`` (taken over disjoint batches)."""
        if not tallies:
            raise StructPruneError("no fidelity tallies to merge: give at least one")
        tallies = [t for t in tallies if t.samples] or list(tallies[:1])  # a rank had none
        first = tallies[0]
        agreed = [t.top1_agreed for t in tallies]
        return cls(
            samples=sum(t.samples for t in tallies),
            top1_agreed=None if None in agreed else sum(agreed),
            squared_error=list(np.sum([t.squared_error for t in tallies], axis=0)),
            squared_reference=list(np.sum([t.squared_reference for t in tallies], axis=0)),
            box_hits=[a for t in tallies for a in t.box_hits],
            box_scores=[a for t in tallies for a in t.box_scores],
            box_classes=[a for t in tallies for a in t.box_classes],
            dense_box_classes=[a for t in tallies for a in t.dense_box_classes],
            detector=first.detector,
            boxes_skipped=next((t.boxes_skipped for t in tallies if t.boxes_skipped), None))

    def result(self) -> dict[str, Any]:
        """The figures :func:`fidelity` returns."""
        if not self.samples:
            raise StructPruneError("the data gave no batches: check the validation data")
        rel_error = {}
        for i, (error, reference) in enumerate(
                zip(self.squared_error, self.squared_reference, strict=True)):
            rel_error[f"output{i}"] = float(np.sqrt(error / reference)) if reference > 0 \
                else 0.0 if error == 0 else float("inf")
        found: dict[str, Any] = {
            "samples": self.samples,
            "top1_agreement": None if self.top1_agreed is None
            else self.top1_agreed / self.samples,
            "rel_error": rel_error}
        if self.detector:
            found.update(self._box_map())
        return found

    def _box_map(self) -> dict[str, Any]:
        """mAP50 and mAP50-95 of the pruned boxes against the dense boxes, by ultralytics'
        ap_per_class; None and the reason when they cannot be computed."""
        figures: dict[str, Any] = {"box_map50": None, "box_map50_95": None}
        if self.boxes_skipped is not None:
            return {**figures, "box_map_skipped": self.boxes_skipped}
        dense_boxes = sum(len(c) for c in self.dense_box_classes)
        figures.update(dense_boxes=dense_boxes,
                       pruned_boxes=sum(len(c) for c in self.box_classes))
        if not dense_boxes:
            figures["box_map_skipped"] = (f"the dense model finds no box of confidence "
                                          f"{DENSE_BOX_CONFIDENCE} or more on these samples")
            return figures
        from ultralytics.utils.metrics import ap_per_class  # importable: boxes were matched

        ap = ap_per_class(np.concatenate(self.box_hits), np.concatenate(self.box_scores),
                          np.concatenate(self.box_classes),
                          np.concatenate(self.dense_box_classes))[5]
        return {**figures, "box_map50": float(ap[:, 0].mean()), "box_map50_95": float(ap.mean())}


def _ultralytics_head(model: torch.nn.Module) -> torch.nn.Module | None:
    """The model's ultralytics detection head (``Detect`` or a subclass: Segment, Pose,
    OBB, ...), found by class name so that ultralytics is not imported for other models."""
    for module in model.modules():
        if any(c.__name__ == "Detect" and c.__module__.startswith("ultralytics")
               for c in type(module).__mro__):
            return module
    return None


def _box_tools() -> tuple[Any, Any] | str:
    """ultralytics' NMS and box IoU, or why they cannot be had."""
    try:
        from ultralytics.utils.metrics import ap_per_class, box_iou  # noqa: F401 - used later
        try:
            from ultralytics.utils.nms import non_max_suppression
        except ImportError:  # ultralytics before 8.3.180 kept it in ops
            from ultralytics.utils.ops import non_max_suppression
    except ImportError as exc:
        return f"ultralytics is not importable ({exc}), so boxes are not compared"
    return non_max_suppression, box_iou


def box_hits(iou: np.ndarray, same_class: np.ndarray) -> np.ndarray:
    """Which predicted boxes are true positives at each of :data:`IOU_THRESHOLDS`: ``iou``
    and ``same_class`` are (ground-truth boxes, predictions), the predictions in descending
    confidence. Each prediction in turn claims the still unclaimed ground-truth box of its
    class that it overlaps most, and hits when that overlap reaches the threshold (the greedy
    matching of ultralytics' and COCO's validators). Returns (predictions, thresholds)."""
    thresholds = len(IOU_THRESHOLDS)
    hits = np.zeros((iou.shape[1], thresholds), dtype=bool)
    if not iou.size:
        return hits
    iou = np.where(same_class, iou, 0.0)
    claimed = np.zeros((iou.shape[0], thresholds), dtype=bool)
    columns = np.arange(thresholds)
    for j in range(iou.shape[1]):
        available = np.where(claimed, 0.0, iou[:, j, None])
        best = available.argmax(0)
        hits[j] = available[best, columns] >= IOU_THRESHOLDS
        claimed[best, columns] |= hits[j]
    return hits


class _Boxes:
    """Compares a YOLO detector's boxes after NMS with the dense model's, batch by batch."""

    def __init__(self, head: torch.nn.Module, tally: FidelityTally):
        self.tally, self.nc = tally, int(head.nc)
        self.end2end = getattr(head, "end2end", False) is True
        tools = _box_tools()
        if isinstance(tools, str):
            tally.boxes_skipped = tools
        elif any(c.__name__ == "OBB" for c in type(head).__mro__):
            tally.boxes_skipped = "rotated boxes (an OBB head) are not compared"
        else:
            self.nms, self.box_iou = tools

    def _shaped(self, raw: torch.Tensor) -> bool:
        """Whether ``raw`` is the head's output: N,300,6 boxes of an end-to-end head, else
        N,4+nc(+extra),anchors (6 anchors would read as end-to-end to ultralytics' NMS)."""
        if raw.dim() != 3:
            return False
        if self.end2end:
            return raw.shape[-1] == 6
        return raw.shape[1] >= 4 + self.nc and raw.shape[-1] != 6

    def add(self, pruned: torch.Tensor, dense: torch.Tensor) -> None:
        if self.tally.boxes_skipped is not None:
            return
        if not self._shaped(dense) or not self._shaped(pruned):
            self.tally.boxes_skipped = (f"the first output {list(dense.shape)} is not the "
                                        "detection head's boxes and scores")
            return
        truths = self.nms(dense.float(), DENSE_BOX_CONFIDENCE, NMS_IOU, nc=self.nc)
        guesses = self.nms(pruned.float(), PRUNED_BOX_CONFIDENCE, NMS_IOU, nc=self.nc,
                           multi_label=True)
        for truth, guess in zip(truths, guesses, strict=True):
            guess = guess[guess[:, 4].argsort(descending=True)]
            iou = self.box_iou(truth[:, :4], guess[:, :4]).numpy()
            same = (truth[:, 5, None] == guess[None, :, 5]).numpy()
            self.tally.box_hits.append(box_hits(iou, same))
            self.tally.box_scores.append(guess[:, 4].numpy())
            self.tally.box_classes.append(guess[:, 5].numpy())
            self.tally.dense_box_classes.append(truth[:, 5].numpy())


def fidelity_tally(model: torch.nn.Module, reference: torch.nn.Module, batches: Iterable, *,
                   max_batches: int | None = None) -> FidelityTally:
    """The sums :func:`fidelity` is computed from (see there); tallies of disjoint batches
    merge with :meth:`FidelityTally.merge`."""
    tally = FidelityTally()
    head = _ultralytics_head(reference)
    boxes = _Boxes(head, tally) if head is not None else None
    tally.detector = boxes is not None
    chosen = batches if max_batches is None else islice(batches, int(max_batches))
    with _evaluating(model, reference):
        for batch in chosen:
            got = [t.detach().cpu() for t in flatten_outputs(call(model, batch))]
            expected = [t.detach().cpu() for t in flatten_outputs(call(reference, batch))]
            if not expected:
                raise StructPruneError("the dense model's output holds no tensor: return "
                                       "tensors (or tuples, lists or dicts of them)")
            shapes = [list(t.shape) for t in got], [list(t.shape) for t in expected]
            if shapes[0] != shapes[1]:
                raise StructPruneError(f"the model's outputs {shapes[0]} are not shaped as the "
                                       f"dense model's {shapes[1]}: compare a pruned model "
                                       "with its own dense model")
            if not tally.squared_error:
                tally.squared_error = [0.0] * len(expected)
                tally.squared_reference = [0.0] * len(expected)
                classes = _class_count(expected[0])
                tally.top1_agreed = 0 if classes is not None and classes > 1 else None
            for i, (g, e) in enumerate(zip(got, expected, strict=True)):
                g, e = g.double(), e.double()
                tally.squared_error[i] += float(((g - e) ** 2).sum())
                tally.squared_reference[i] += float((e ** 2).sum())
            count = expected[0].shape[0] if expected[0].dim() else 1
            tally.samples += count
            if tally.top1_agreed is not None:
                tally.top1_agreed += int((got[0].argmax(1) == expected[0].argmax(1)).sum())
            if boxes is not None:
                boxes.add(got[0], expected[0])
    return tally


def fidelity(model: torch.nn.Module, reference: torch.nn.Module, batches: Iterable, *,
             max_batches: int | None = None) -> dict[str, Any]:
    """How close ``model`` (the pruned one) is to ``reference`` (the dense one) on the
    inputs of ``batches`` (targets, if any, are not used), both run in eval mode without
    gradients (training flags put back), each on its own device.

    Returns ``samples``; ``top1_agreement``, the fraction of samples whose argmax over the
    first output's dim 1 is the same (None unless that output is N,K class scores, K > 1);
    ``rel_error``, ``||model - reference|| / ||reference||`` over all batches for every
    output tensor (``output0``, ``output1``, ... in :func:`structprune.batches.flatten_outputs`
    order). For an ultralytics YOLO detector also ``box_map50`` and ``box_map50_95``: the
    dense model's boxes after NMS at confidence 0.25 are the ground truth, the pruned model's
    boxes after NMS at confidence 0.001 with their scores the predictions, matched and scored
    by ultralytics (NMS, box IoU, ``ap_per_class``; its interpolated AP tops out at 0.995, so
    a model identical to the dense one scores 0.995), with the ``dense_boxes`` and
    ``pruned_boxes`` counts; when they cannot be computed they are None and
    ``box_map_skipped`` says why. ``max_batches`` stops after that many batches."""
    return fidelity_tally(model, reference, batches, max_batches=max_batches).result()


def plot_confusion(
    metrics_by_name: Mapping[str, Metrics],
    path: str | Path,
    classes: Sequence[str] | None = None,
) -> Path:
    """Draw one confusion-matrix heat map per model, side by side, counts written in the cells
    and accuracy and macro F1 in each title, and save it to ``path`` (PNG, PDF, SVG, ...)."""
    if not metrics_by_name:
        raise StructPruneError("no metrics to plot: give at least one model's metrics")
    panels = len(metrics_by_name)
    size = max(m.num_classes for m in metrics_by_name.values())
    side = min(3.0 + 0.45 * size, 14.0)
    # a bare Figure on the Agg canvas rather than pyplot: no global backend switch (a notebook
    # keeps its own), no figure registered in pyplot's state to leak if drawing fails
    figure = Figure(figsize=(side * panels, side))
    FigureCanvasAgg(figure)
    axes = figure.subplots(1, panels, squeeze=False)
    try:
        for axis, (name, result) in zip(axes[0], metrics_by_name.items(), strict=True):
            counts = np.asarray(result.confusion, dtype=np.int64)
            k = counts.shape[0]
            names = list(classes) if classes is not None and len(classes) == k \
                else [str(i) for i in range(k)]
            image = axis.imshow(counts, cmap="Blues", interpolation="nearest")
            figure.colorbar(image, ax=axis, fraction=0.046, pad=0.04)
            # dark cells get white text so the count stays readable
            threshold = counts.max() / 2 if counts.size else 0
            fontsize = 9 if k <= 12 else 6 if k <= 30 else 0
            if fontsize:
                for t in range(k):
                    for p in range(k):
                        axis.text(p, t, str(counts[t, p]), ha="center", va="center",
                                  fontsize=fontsize,
                                  color="white" if counts[t, p] > threshold else "black")
            axis.set_xticks(range(k), names, rotation=90 if k > 10 else 0)
            axis.set_yticks(range(k), names)
            axis.set_xlabel("predicted")
            axis.set_ylabel("true")
            axis.set_title(f"{name}: accuracy {result.accuracy:.1%}, "
                           f"macro F1 {result.macro_f1:.3f}")
        figure.tight_layout()
        out = Path(path)
        out.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(out, dpi=120)
    finally:
        # drop the figure's artists and canvas at once instead of waiting for the collector
        figure.clear()
    return out
