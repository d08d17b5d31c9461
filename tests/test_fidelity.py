"""Fidelity without labels: top-1 agreement and relative errors against numpy formulas, box
mAP of a hand-made detector against a direct computation, and unlabeled data end to end
(a flat folder of images for YOLOv8n and for a classifier, a labelled folder still scored)."""

from __future__ import annotations

import argparse
import copy
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from torch import nn

from structprune.accuracy.data import load_data
from structprune.accuracy.evaluate import (
    IOU_THRESHOLDS,
    FidelityTally,
    box_hits,
    fidelity,
    fidelity_tally,
)
from structprune.config import PruneConfig, RunConfig
from structprune.errors import StructPruneError
from structprune.front.cli import main
from structprune.front.cli.arguments import data_splits
from structprune.front.workflow import prune_to_dir

# ------------------------------------------------------------------ agreement and rel error


class TwoHeads(nn.Module):
    """Class scores and a second output, both linear in the input, as a dict."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.scores, self.aux, self.drop = nn.Linear(5, 4), nn.Linear(5, 3), nn.Dropout(0.9)

    def forward(self, x):
        return {"scores": self.scores(self.drop(x)), "aux": self.aux(x)}


def _numpy_outputs(model: TwoHeads, x: torch.Tensor) -> list[np.ndarray]:
    """The two outputs written as x W^T + b in float64 (dropout off: eval mode)."""
    x = x.double().numpy()
    return [x @ layer.weight.detach().double().numpy().T + layer.bias.detach().double().numpy()
            for layer in (model.scores, model.aux)]


def test_top1_agreement_and_relative_errors_equal_numpy_formulas():
    reference, model = TwoHeads(0), TwoHeads(0)
    with torch.no_grad():
        model.scores.weight.add_(0.3 * torch.randn(4, 5))
        model.aux.bias.add_(0.1)
    generator = torch.Generator().manual_seed(1)
    xs = [torch.randn(n, 5, generator=generator) for n in (7, 5, 9)]
    # every batch form: inputs only, (inputs, labels) with the labels unused, ((x,), None)
    batches = [xs[0], (xs[1], torch.zeros(5, dtype=torch.long)), ((xs[2],), None)]
    model.train()
    reference.eval()
    found = fidelity(model, reference, batches)  # in eval mode: no dropout
    assert model.training and model.drop.training and not reference.training

    x = torch.cat(xs)
    got, expected = _numpy_outputs(model, x), _numpy_outputs(reference, x)
    assert found["samples"] == 21
    assert found["top1_agreement"] == pytest.approx(
        np.mean(got[0].argmax(1) == expected[0].argmax(1)), abs=1e-12)
    assert 0 < found["top1_agreement"] < 1
    for name, g, e in zip(("output0", "output1"), got, expected, strict=True):
        assert found["rel_error"][name] == pytest.approx(
            np.linalg.norm(g - e) / np.linalg.norm(e), rel=1e-5)
    assert "box_map50" not in found

    first = fidelity(model, reference, batches, max_batches=1)
    assert first["samples"] == 7
    # tallies of two shares of the batches pool to the tally of all of them
    merged = FidelityTally.merge([fidelity_tally(model, reference, batches[:1]),
                                  fidelity_tally(model, reference, batches[1:]),
                                  fidelity_tally(model, reference, [])]).result()
    assert merged["samples"] == 21
    assert merged["top1_agreement"] == pytest.approx(found["top1_agreement"])
    assert merged["rel_error"] == pytest.approx(found["rel_error"])


def test_other_outputs_have_no_agreement_and_mismatched_ones_are_refused():
    class Maps(nn.Module):
        def __init__(self, channels):
            super().__init__()
            self.conv = nn.Conv2d(2, channels, 1)

        def forward(self, x):
            return self.conv(x)

    x = torch.randn(2, 2, 3, 3)
    found = fidelity(Maps(4), Maps(4), [x])
    assert found["top1_agreement"] is None and found["samples"] == 2
    assert found["rel_error"]["output0"] > 0
    same = Maps(4)
    assert fidelity(same, same, [x])["rel_error"] == {"output0": 0.0}
    with pytest.raises(StructPruneError, match="not shaped as the dense model's") as caught:
        fidelity(Maps(3), Maps(4), [x])
    assert "\n" not in str(caught.value)
    with pytest.raises(StructPruneError, match="no batches"):
        fidelity(same, same, [])


# -------------------------------------------------------------------------------- box mAP

pytest.importorskip("ultralytics")
from ultralytics.nn.modules.head import Detect  # noqa: E402 - only with ultralytics

ANCHORS = 8  # columns of the head output; the unused ones score 0


class FixedDetector(nn.Module):
    """The same head output for every image, boxes placed by hand: each column is
    (x, y, w, h, class, score). Holds an ultralytics Detect head (unused), so fidelity
    treats it as a YOLO detector with two classes."""

    def __init__(self, columns):
        super().__init__()
        self.head = Detect(nc=2, ch=(8,))
        head = torch.zeros(4 + 2, ANCHORS)
        for j, (x, y, w, h, cls, score) in enumerate(columns):
            head[:4, j] = torch.tensor([x, y, w, h], dtype=torch.float32)
            head[4 + cls, j] = score
        self.register_buffer("output", head)

    def forward(self, x):
        return self.output.expand(len(x), -1, -1).clone()


DENSE = [(20, 20, 10, 10, 0, 0.9), (60, 20, 10, 10, 0, 0.8), (20, 60, 10, 10, 1, 0.7),
         (100, 20, 10, 10, 1, 0.1)]  # the last is below 0.25: not a ground-truth box
IMAGES = [torch.zeros(3, 1), torch.zeros(2, 1)]  # the detectors ignore their input


def _shifted(columns, dx):
    return [(x + dx, y, w, h, c, s) for x, y, w, h, c, s in columns]


def _flat_ap(precision: float, recall: float) -> float:
    """Average precision, as COCO and ultralytics sample it (the precision envelope at 101
    recall points 0, 0.01, ..., 1, integrated by trapezoids), of a curve whose envelope is
    ``precision`` up to ``recall`` (a multiple of 0.01) and 0 from there: 100 * recall
    full steps, less half of the last one, where the envelope drops to 0 at the grid point.
    So a perfect detector scores 0.995, ultralytics' known ceiling."""
    return precision * (recall - 0.005)


def test_identical_and_shifted_boxes_score_the_direct_map():
    dense = FixedDetector(DENSE)
    perfect = _flat_ap(1.0, 1.0)  # every dense box found, before any false one
    found = fidelity(copy.deepcopy(dense), dense, IMAGES)
    assert found["box_map50"] == pytest.approx(perfect)
    assert found["box_map50_95"] == pytest.approx(perfect)
    assert found["dense_boxes"] == 3 * 5 and found["pruned_boxes"] == 4 * 5
    assert found["rel_error"] == {"output0": 0.0}

    # every box 2 px to the right: IoU 8x10 / 12x10 = 2/3, a hit at 0.5 ... 0.65 only
    iou = 80 / 120
    found = fidelity(FixedDetector(_shifted(DENSE, 2)), dense, IMAGES)
    assert found["box_map50"] == pytest.approx(perfect)
    assert found["box_map50_95"] == pytest.approx(perfect * np.mean(IOU_THRESHOLDS <= iou))
    assert found["box_map50_95"] == pytest.approx(0.398)


def test_a_mixed_case_scores_the_direct_map_per_class_and_threshold():
    dense = FixedDetector(DENSE)
    pruned = FixedDetector([(100, 100, 10, 10, 0, 0.95),  # nothing there: a false positive
                            (20, 20, 10, 10, 0, 0.9),  # exact
                            (62, 20, 10, 10, 0, 0.6),  # IoU 2/3
                            (20, 60, 10, 10, 0, 0.5)])  # right place, wrong class
    found = fidelity(pruned, dense, IMAGES[:1])  # one batch of 3 images
    # class 0, 2 dense boxes per image; the pruned boxes of the 3 images in score order:
    # 3 false (0.95), 3 exact (0.9), 3 shifted (0.6), 3 of the wrong class (0.5).
    # Up to IoU 0.65 the shifted ones hit too: best precision 6/9 at recall 1, and lower
    # before it, so the envelope is 2/3 throughout; above 0.65, 3/6 at recall 1/2.
    # Class 1 has a dense box in each image and no pruned box of its own: AP 0.
    low, high = _flat_ap(2 / 3, 1.0), _flat_ap(1 / 2, 1 / 2)
    assert found["box_map50"] == pytest.approx((low + 0) / 2)
    hits_low = np.mean(IOU_THRESHOLDS <= 80 / 120)  # 4 of the 10 thresholds
    assert found["box_map50_95"] == pytest.approx(
        (hits_low * low + (1 - hits_low) * high + 0) / 2)
    assert 0 < found["box_map50_95"] < found["box_map50"] < 0.5


def test_box_hits_claim_each_ground_truth_box_once_and_only_in_its_class():
    iou = np.array([[0.97, 0.97, 0.6], [0.0, 0.55, 0.0]])  # 2 ground truths x 3 predictions
    same = np.array([[True, True, False], [True, True, True]])
    hits = box_hits(iou, same)
    # the first prediction claims box 0 at every threshold; the second gets box 1 up to
    # 0.55; the third is of another class than box 0 and overlaps nothing else
    assert hits[0].all() and not hits[2].any()
    assert hits[1].tolist() == (IOU_THRESHOLDS <= 0.55).tolist()
    assert box_hits(np.zeros((0, 2)), np.zeros((0, 2), bool)).shape == (2, 10)


def test_without_ultralytics_boxes_are_skipped_and_said_why(monkeypatch):
    dense = FixedDetector(DENSE)
    monkeypatch.setitem(sys.modules, "ultralytics.utils.metrics", None)
    found = fidelity(FixedDetector(_shifted(DENSE, 2)), dense, IMAGES)
    assert found["box_map50"] is None and found["box_map50_95"] is None
    assert "ultralytics is not importable" in found["box_map_skipped"]
    assert found["rel_error"]["output0"] > 0


def test_a_dense_model_without_confident_boxes_or_with_rotated_ones_says_so():
    quiet = FixedDetector([(20, 20, 10, 10, 0, 0.2)])
    found = fidelity(quiet, quiet, IMAGES)
    assert found["box_map50"] is None and "no box of confidence 0.25" in \
        found["box_map_skipped"]
    from ultralytics.nn.modules.head import OBB

    rotated = FixedDetector(DENSE)
    rotated.head = OBB(nc=2, ch=(8,))
    found = fidelity(rotated, rotated, IMAGES)
    assert found["box_map50"] is None and "rotated boxes" in found["box_map_skipped"]
    assert found["rel_error"] == {"output0": 0.0}


# ------------------------------------------------------------------------------ end to end


def _random_images(folder, count: int, size=(48, 40)) -> None:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(
            folder / f"{i}.png")


def _confident_yolo() -> nn.Module:
    """YOLOv8n's random weights with the first three classes' biases raised, so that the
    dense model finds boxes of confidence above 0.25."""
    from structprune.front.models import build_model

    model = build_model("ultralytics:yolov8n.yaml")
    head = next(m for m in model.modules() if isinstance(m, Detect))
    with torch.no_grad():
        for branch in head.cv3:
            branch[-1].bias[:3] = 4.0
    return model


def _check_yolo_fidelity(found: dict) -> None:
    assert found["top1_agreement"] is None and found["dense_boxes"] > 0
    assert 0 <= found["box_map50_95"] <= found["box_map50"] <= 0.995
    assert found["rel_error"]["output0"] > 0


def test_yolov8n_prunes_on_a_flat_folder_and_reports_box_fidelity(tmp_path):
    folder = tmp_path / "images"
    _random_images(folder, 6)
    model, inputs = _confident_yolo(), (torch.rand(1, 3, 64, 64),)
    data = data_splits(_data_args(folder), model, inputs)
    assert data.summary() == f"{folder}: unlabeled, 4 train / 2 val samples"
    result, figures = prune_to_dir(model, inputs, tmp_path / "out", PruneConfig(ratio=0.3),
                                   run=RunConfig(onnx=False, recover="none"), data=data)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fidelity"] == figures["fidelity"] and "metrics" not in report
    _check_yolo_fidelity(report["fidelity"])
    assert report["fidelity"] == fidelity(result.model, model, data.val)  # measured once more

    # a folder of one class's images: YOLO's 84 outputs are no class scores, labels unused
    _random_images(tmp_path / "one_class" / "car", 4)
    data = data_splits(_data_args(tmp_path / "one_class"), model, inputs)
    assert not data.labelled and "labels unused" in data.summary()


@pytest.mark.zoo
def test_yolov8n_on_a_flat_folder_by_the_command_line(tmp_path, capsys):
    folder, out, weights = tmp_path / "images", tmp_path / "out", tmp_path / "yolo.safetensors"
    _random_images(folder, 6)
    save_file({k: v.contiguous() for k, v in _confident_yolo().state_dict().items()},
              str(weights))
    assert main(["prune", "ultralytics:yolov8n.yaml", "--input-shape", "1,3,64,64", "--weights",
                 str(weights), "--data", str(folder), "--ratio", "0.3", "--recover", "none",
                 "--no-onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fidelity to the dense model on 2 samples" in printed and "box mAP50 " in printed
    found = json.loads((out / "report.json").read_text())["fidelity"]
    _check_yolo_fidelity(found)
    assert main(["eval", str(out), "--data", str(folder)]) == 0
    assert "box mAP50" in capsys.readouterr().out
    evaluated = json.loads((out / "eval.json").read_text())["fidelity"]
    assert evaluated["box_map50"] == pytest.approx(found["box_map50"])
    assert evaluated["rel_error"] == pytest.approx(found["rel_error"], rel=1e-4)


def test_digits_cnn_on_a_flat_folder_by_the_command_line(tmp_path, capsys):
    folder, out = tmp_path / "images", tmp_path / "out"
    _random_images(folder, 5, (32, 32))
    assert main(["prune", "structprune:digits_cnn", "--data", str(folder), "--ratio", "0.5",
                 "--recover", "none", "--no-onnx", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "fidelity to the dense model on 2 samples: top-1 agreement" in printed
    found = json.loads((out / "report.json").read_text())["fidelity"]
    assert found["top1_agreement"] in (0.0, 0.5, 1.0) and "box_map50" not in found
    # `eval` measures the saved model again on the same split: the same figures
    assert main(["eval", str(out), "--data", str(folder)]) == 0
    printed = capsys.readouterr().out
    assert "unlabeled, 3 train / 2 val samples" in printed and "top-1 agreement" in printed
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["fidelity"]["top1_agreement"] == found["top1_agreement"]
    assert evaluated["fidelity"]["rel_error"] == pytest.approx(found["rel_error"], rel=1e-4)
    assert not (out / "confusion.png").exists()


class TinyClassifier(nn.Module):
    def __init__(self, classes: int = 3):
        super().__init__()
        torch.manual_seed(0)
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8),
                                      nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, classes)

    def forward(self, x):
        return self.fc(self.features(x))


def _data_args(folder) -> argparse.Namespace:
    return argparse.Namespace(data=str(folder), batch_size=None)


def test_labels_are_used_by_classifiers_only_and_a_flat_folder_gives_fidelity(tmp_path):
    labelled, flat = tmp_path / "labelled", tmp_path / "flat"
    for name in ("ant", "bee", "cat"):
        _random_images(labelled / name, 3, (9, 9))
    _random_images(flat, 5, (9, 9))
    model, inputs = TinyClassifier().eval(), (torch.randn(1, 3, 8, 8),)
    config = PruneConfig(ratio=0.5)
    run = RunConfig(onnx=False, recover="none")

    data = data_splits(_data_args(labelled), model, inputs)
    assert data.labelled and data.num_classes == 3
    _, figures = prune_to_dir(model, inputs, tmp_path / "scored", config, run=run, data=data)
    assert set(figures["metrics"]) == {"dense", "pruned"} and "fidelity" not in figures
    assert figures["metrics"]["dense"]["samples"] == 3

    data = data_splits(_data_args(flat), model, inputs)
    assert not data.labelled
    _, figures = prune_to_dir(model, inputs, tmp_path / "faithful", config, run=run, data=data)
    assert "metrics" not in figures and figures["data"].endswith("unlabeled, 3 train / 2 val "
                                                                 "samples")
    assert figures["fidelity"]["samples"] == 2
    assert figures["fidelity"]["top1_agreement"] in (0.0, 0.5, 1.0)

    # a labelled folder whose class count disagrees with the classifier: one line
    with pytest.raises(StructPruneError, match="has 2 outputs but the data has 3 classes: .*"
                                               "without class sub-folders") as caught:
        data_splits(_data_args(labelled), TinyClassifier(2).eval(), inputs)
    assert "\n" not in str(caught.value)
    # a model that does not output class scores takes the same folder, its labels unused
    maps = nn.Conv2d(3, 5, 1)
    data = data_splits(_data_args(labelled), maps, inputs)
    assert not data.labelled and "labels unused" in data.summary()
    assert all(isinstance(batch, torch.Tensor) for batch in data.val)
    assert load_data(str(labelled), (1, 3, 8, 8)).labelled  # the folder itself has labels
