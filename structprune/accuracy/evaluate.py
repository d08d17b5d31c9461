"""Evaluate: accuracy, per-class recall, macro F1 and a confusion matrix, dense against pruned.

:func:`predict` runs a classifier over batches with targets, :func:`metrics` scores the
predictions with scikit-learn, :func:`evaluate` does both, and :func:`plot_confusion` draws the
confusion matrices of several models side by side (e.g. "dense" and "pruned").
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, recall_score

from structprune.batches import first_tensor, labelled
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


def _predict(
    model: torch.nn.Module,
    batches: Iterable,
    device: str | torch.device,
    num_classes: int | None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """:func:`predict`, plus the width of the model's output (its number of classes)."""
    if num_classes is not None and int(num_classes) < 1:
        raise StructPruneError(f"number of classes {num_classes} must be 1 or more")
    training = {module: module.training for module in model.modules()}
    true_parts: list[np.ndarray] = []
    pred_parts: list[np.ndarray] = []
    largest_target, width = -1, 0
    model.eval()
    try:
        with torch.no_grad():
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
    finally:
        for module, flag in training.items():
            module.training = flag
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
