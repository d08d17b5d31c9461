"""Evaluate: metrics against a direct numpy computation, predictions of a model whose answer
is known, the class-count check and the confusion plot."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from structprune.accuracy.evaluate import (
    Metrics,
    classifier_width,
    evaluate,
    metrics,
    plot_confusion,
    predict,
)
from structprune.errors import StructPruneError


def _numpy_metrics(y_true: np.ndarray, y_pred: np.ndarray, k: int) -> dict:
    """Reference metrics written out by hand, a class without samples (or predictions) giving
    recall (precision) 0 and a class with precision + recall = 0 giving F1 0."""
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y_true, y_pred), 1)
    hits = np.diag(confusion).astype(float)
    rows, cols = confusion.sum(axis=1), confusion.sum(axis=0)
    recall = np.divide(hits, rows, out=np.zeros(k), where=rows > 0)
    precision = np.divide(hits, cols, out=np.zeros(k), where=cols > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros(k), where=both > 0)
    return {
        "accuracy": float(np.mean(y_true == y_pred)),
        "recall": recall,
        "macro_f1": float(f1.mean()),
        "confusion": confusion,
    }


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_metrics_equal_a_direct_numpy_computation(seed):
    rng = np.random.default_rng(seed)
    k = 6
    # class 5 never occurs as a target and class 4 is never predicted: both edge cases count
    y_true = rng.integers(0, 5, size=300)
    y_pred = np.where(rng.random(300) < 0.6, y_true, rng.integers(0, k, size=300))
    y_pred[y_pred == 4] = 0
    result = metrics(y_true, y_pred, k)
    reference = _numpy_metrics(y_true, y_pred, k)
    assert result.samples == 300
    assert result.accuracy == pytest.approx(reference["accuracy"], abs=1e-12)
    np.testing.assert_allclose(result.recall, reference["recall"], atol=1e-12)
    assert result.macro_f1 == pytest.approx(reference["macro_f1"], abs=1e-12)
    assert result.confusion == reference["confusion"].tolist()
    assert result.recall[5] == 0.0 and result.recall[4] == 0.0


def test_metrics_json_round_trip_and_errors():
    result = metrics([0, 1, 1, 2], [0, 1, 2, 2], 3)
    data = json.loads(json.dumps(result.to_json()))
    assert Metrics.from_json(data) == result
    assert data["confusion"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]
    for args in (([], [], 3), ([0, 1], [0], 3), ([0, 3], [0, 1], 3), ([0, 1], [0, -1], 2)):
        with pytest.raises(StructPruneError) as caught:
            metrics(*args)
        assert "\n" not in str(caught.value)


def _argmax_model() -> nn.Module:
    """A linear layer with identity weights: it predicts the index of the largest input."""
    layer = nn.Linear(4, 4)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(4))
        layer.bias.zero_()
    return nn.Sequential(nn.Dropout(0.9), layer)


def _batches(seed: int = 0, n: int = 3, size: int = 10) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        x = torch.randn(size, 4, generator=generator)
        batches.append((x, torch.randint(0, 4, (size,), generator=generator)))
    return batches


def test_predict_is_the_argmax_of_a_known_model_and_restores_training_flags():
    model = _argmax_model()
    model.train()
    model[1].eval()  # mixed flags must come back exactly as they were
    batches = _batches()
    y_true, y_pred = predict(model, batches)
    # dropout would scramble this if the model were not put in eval mode
    assert y_pred.tolist() == torch.cat([x for x, _ in batches]).argmax(dim=1).tolist()
    assert y_true.tolist() == torch.cat([y for _, y in batches]).tolist()
    assert model.training and model[0].training and not model[1].training
    assert all(p.grad is None for p in model.parameters())


class _Wrapped(nn.Module):
    """Returns the class scores inside a tuple or a dict, after something that is not them."""

    def __init__(self, kind: str):
        super().__init__()
        self.inner, self.kind = _argmax_model(), kind

    def forward(self, x):
        scores = self.inner(x)
        if self.kind == "tuple":
            return ("not a tensor", scores, -scores)
        return {"logits": scores, "negated": -scores}


@pytest.mark.parametrize("kind", ["tuple", "dict"])
def test_predict_takes_the_first_tensor_of_tuple_and_dict_outputs(kind):
    batches = _batches(seed=1)
    _, y_pred = predict(_Wrapped(kind), batches)
    assert y_pred.tolist() == torch.cat([x for x, _ in batches]).argmax(dim=1).tolist()


def test_evaluate_matches_known_predictions():
    batches = _batches(seed=2, n=4, size=25)
    x = torch.cat([x for x, _ in batches])
    answers = x.argmax(dim=1)
    # make exactly the first 30 targets right and the other 70 wrong
    targets = torch.where(torch.arange(100) < 30, answers, (answers + 1) % 4)
    labelled = [(x[i:i + 25], targets[i:i + 25]) for i in range(0, 100, 25)]
    result = evaluate(_argmax_model(), labelled)
    assert result.samples == 100 and result.accuracy == pytest.approx(0.3)
    assert result.num_classes == 4  # the model's output width
    reference = _numpy_metrics(targets.numpy(), answers.numpy(), 4)
    assert result.confusion == reference["confusion"].tolist()
    assert result.macro_f1 == pytest.approx(reference["macro_f1"])


def test_class_count_mismatch_is_one_line():
    model = _argmax_model()  # 4 outputs
    too_many = [(torch.randn(3, 4), torch.tensor([0, 5, 1]))]
    with pytest.raises(StructPruneError, match="the model has 4 outputs but the data has 6 "
                                               "classes: ") as caught:
        predict(model, too_many)
    assert "\n" not in str(caught.value)
    with pytest.raises(StructPruneError, match="the model has 4 outputs but the data has 3 "):
        evaluate(model, [(torch.randn(3, 4), torch.tensor([0, 2, 1]))], num_classes=3)
    with pytest.raises(StructPruneError, match="class indices"):
        predict(model, [(torch.randn(3, 4), torch.tensor([0, -100, 1]))])
    with pytest.raises(StructPruneError, match="no batches"):
        predict(model, [])


def test_plot_confusion_writes_a_png_with_one_panel_per_model(tmp_path):
    dense = metrics([0, 1, 2, 2, 1], [0, 1, 2, 1, 1], 3)
    pruned = metrics([0, 1, 2, 2, 1], [0, 0, 2, 1, 1], 3)
    path = plot_confusion({"dense": dense, "pruned": pruned}, tmp_path / "out" / "cm.png",
                          classes=["ant", "bee", "cat"])
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
    with Image.open(path) as image:
        width, height = image.size
    assert width > 1.5 * height  # two panels side by side
    with pytest.raises(StructPruneError):
        plot_confusion({}, tmp_path / "none.png")


def test_classifier_width_tells_class_scores_from_other_outputs_and_leaves_bn_alone():
    x = torch.randn(3, 4)
    assert classifier_width(_argmax_model(), x) == 4
    assert classifier_width(_Wrapped("dict"), x) == 4

    class Shaped(nn.Module):
        def __init__(self, *shape):
            super().__init__()
            self.shape, self.bn = shape, nn.BatchNorm1d(4)

        def forward(self, x):
            return self.bn(x).reshape(len(x), *self.shape)

    assert classifier_width(Shaped(4, 1, 1), x) == 4  # a convolutional classifier's N,K,1,1
    assert classifier_width(Shaped(2, 2), x) is None  # a map, not class scores
    model = Shaped(4)
    model.train()
    assert classifier_width(model, x) == 4
    # run in eval mode: the BatchNorm statistics are untouched and the flag comes back
    assert model.training and model.bn.num_batches_tracked == 0
    assert torch.equal(model.bn.running_mean, torch.zeros(4))
