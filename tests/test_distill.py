"""Label-free distillation: fit with a teacher on batches without targets brings the pruned
model's every output closer to the dense one, feature maps are matched on the plan's kept
channels, a head that answers differently in training mode is handled, and YOLO distils."""

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.accuracy.train import (
    distillation_loss,
    eval_structure,
    fit,
    mixed,
    output_loss,
    relative_mse,
)
from structprune.batches import Inputs, flatten_outputs, split
from structprune.errors import StructPruneError

from .oracles import randomize


class TwoHeads(nn.Module):
    """A classifier and a segmentation map from one body: a tuple of two outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.seg = nn.Conv2d(16, 4, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.body(x)
        return self.fc(features.mean((2, 3))), self.seg(features)


class Segmenter(nn.Module):
    """A fully convolutional model: one (N, C, H, W) output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 3, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class Head(nn.Module):
    """Like an ultralytics head: raw maps in training mode, decoded ones in eval mode."""

    def __init__(self) -> None:
        super().__init__()
        self.box, self.cls = nn.Conv2d(8, 2, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x: torch.Tensor):
        box, cls = self.box(x), self.cls(x)
        if self.training:
            return {"box": box, "cls": cls}
        return torch.cat([box * 4.0, cls.sigmoid()], 1)


class Detector(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = Head()

    def forward(self, x: torch.Tensor):
        return self.head(self.body(x))


def _inputs(count: int, seed: int, shape=(8, 3, 10, 10)) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) for _ in range(count)]


def _trained_like(model: nn.Module, batches: list[torch.Tensor], seed: int = 1) -> nn.Module:
    """Random weights with non-trivial affine parameters and BatchNorm statistics that are
    the data's own, as a trained model's are."""
    randomize(model, seed)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    with torch.no_grad():
        for batch in batches:
            model(batch)
    for m in norms:
        m.momentum = 0.1
    return model.eval()


def _relative_errors(model: nn.Module, teacher: nn.Module, batches) -> np.ndarray:
    """||s - t|| / ||t|| per output tensor, averaged over the batches (eval mode)."""
    model.eval()
    errors = []
    with torch.no_grad():
        for batch in batches:
            pairs = zip(flatten_outputs(model(batch)), flatten_outputs(teacher(batch)),
                        strict=True)
            errors.append([float((s - t).norm() / t.norm()) for s, t in pairs])
    return np.mean(errors, axis=0)


def _kl(model: nn.Module, teacher: nn.Module, batches) -> float:
    model.eval()
    with torch.no_grad():
        return float(np.mean([F.kl_div(model(b)[0].log_softmax(1), teacher(b)[0].log_softmax(1),
                                       reduction="batchmean", log_target=True) for b in batches]))


def test_relative_mse_matches_the_formula():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen)
    sn, tn = s.double().numpy(), t.double().numpy()
    assert float(relative_mse(s, t)) == pytest.approx(((sn - tn) ** 2).mean() / (tn ** 2).mean(),
                                                      rel=1e-5)
    # per channel for maps, one channel near silent: its scale is floored at 1% of the mean
    s, t = torch.randn(2, 3, 5, 5, generator=gen), torch.randn(2, 3, 5, 5, generator=gen)
    t[:, 1] *= 1e-3
    sn, tn = s.double().numpy(), t.double().numpy()
    error = ((sn - tn) ** 2).mean(axis=(0, 2, 3))
    square = (tn ** 2).mean(axis=(0, 2, 3))
    scale = np.maximum(square, 0.01 * square.mean())
    assert scale[1] > square[1]  # the floor acted
    assert float(relative_mse(s, t)) == pytest.approx((error / scale).mean(), rel=1e-5)
    assert float(relative_mse(t, t)) == 0.0
    assert float(relative_mse(torch.zeros_like(t), t)) == pytest.approx(
        (square / scale).mean(), rel=1e-5)


def test_output_loss_sums_kl_for_logits_and_relative_error_for_the_rest():
    gen = torch.Generator().manual_seed(2)
    student = (torch.randn(4, 5, generator=gen), {"map": torch.randn(4, 2, 3, 3, generator=gen),
                                                  "ids": torch.arange(4)})
    teacher = (torch.randn(4, 5, generator=gen), {"map": torch.randn(4, 2, 3, 3, generator=gen),
                                                  "ids": torch.arange(4)})
    want = distillation_loss(student[0], teacher[0], 3.0) \
        + relative_mse(student[1]["map"], teacher[1]["map"])
    assert float(output_loss(student, teacher, 3.0)) == pytest.approx(float(want), rel=1e-6)
    with pytest.raises(StructPruneError, match="do not match"):
        output_loss(student[0], teacher, 3.0)


def test_mixup_blends_every_float_input_alike_and_leaves_integers():
    gen = torch.Generator().manual_seed(5)
    image, extra = torch.randn(6, 3, 4, 4, generator=gen), torch.randn(6, 2, generator=gen)
    ids, scale = torch.arange(6), torch.tensor(2.0)
    torch.manual_seed(7)
    out = mixed(Inputs((image,), {"extra": extra, "ids": ids, "scale": scale}), 1.0)
    torch.manual_seed(7)  # the same draws, in the same order, give the reference
    order = torch.randperm(6).numpy()
    lam = torch.distributions.Beta(1.0, 1.0).sample((6,)).double().numpy()
    for got, x in ((out.args[0], image), (out.kwargs["extra"], extra)):
        xn = x.double().numpy()
        shares = lam.reshape(-1, *[1] * (xn.ndim - 1))
        np.testing.assert_allclose(got.double().numpy(),
                                   shares * xn + (1 - shares) * xn[order], rtol=1e-5, atol=1e-6)
    assert not np.allclose(out.args[0].numpy(), image.numpy())  # it did blend
    assert out.kwargs["ids"] is ids and out.kwargs["scale"] is scale
    same, single = Inputs((image,)), Inputs((image[:1],))
    assert mixed(same, 0.0) is same and mixed(single, 1.0) is single  # nothing to blend
    with pytest.raises(StructPruneError, match="mix"):
        fit(nn.Linear(2, 2), [torch.randn(4, 2)], 1, teacher=nn.Linear(2, 2), mix=-1.0,
            progress=False)


def test_label_free_fit_with_mixup_brings_a_pruned_cnn_closer_too():
    train, held_out = _inputs(12, seed=0), _inputs(4, seed=1)
    teacher = _trained_like(Segmenter(), train)
    student = sp.prune(teacher, (train[0],), 0.5).model
    before = _relative_errors(student, teacher, held_out)[0]
    fit(student, train, 3, lr=1e-2, teacher=teacher, progress=False, mix=1.0)
    after = _relative_errors(student, teacher, held_out)[0]
    assert before > 0.2 and after < 0.7 * before, (before, after)


def test_label_free_fit_brings_a_pruned_cnn_closer_to_the_dense_one():
    train, held_out = _inputs(12, seed=0), _inputs(4, seed=1)
    teacher = _trained_like(Segmenter(), train)
    student = sp.prune(teacher, (train[0],), 0.5).model
    before = _relative_errors(student, teacher, held_out)[0]
    history = fit(student, train, 3, lr=1e-2, teacher=teacher, progress=False)
    after = _relative_errors(student, teacher, held_out)[0]
    assert before > 0.2 and after < 0.7 * before, (before, after)
    assert history[-1]["loss"] < history[0]["loss"]
    assert "eval_mode_layers" not in history[0]  # nothing answers differently in training


def test_a_model_with_two_outputs_distils_both():
    train, held_out = _inputs(12, seed=3), _inputs(4, seed=4)
    teacher = _trained_like(TwoHeads(), train)
    dense_state = copy.deepcopy(teacher.state_dict())
    student = sp.prune(teacher, (train[0],), 0.5).model
    errors, kl = _relative_errors(student, teacher, held_out), _kl(student, teacher, held_out)
    fit(student, train, 3, lr=1e-2, teacher=teacher, progress=False)
    errors_after = _relative_errors(student, teacher, held_out)
    assert _kl(student, teacher, held_out) < 0.2 * kl  # the logits, by the softened KL
    assert errors_after[1] < 0.8 * errors[1]  # the map, by its relative error
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, dense_state[name])  # the teacher never trains


def test_feature_maps_are_matched_on_the_kept_channels():
    train = _inputs(1, seed=5)
    teacher = _trained_like(TwoHeads(), _inputs(4, seed=6))
    result = sp.prune(teacher, (train[0],), 0.5)
    student = result.model
    keep = {e["name"]: e["keep"] for e in result.plan.params if e["dim"] == 0}
    assert len(keep["body.0.weight"]) < 16 and len(keep["body.3.weight"]) < 16

    # the loss of the one step, by hand: the student in training mode, the teacher's maps of
    # each convolution cut to the channels the plan kept
    caught = {}
    probe = copy.deepcopy(student).train()
    for name in ("body.0", "body.3", "seg"):
        for side, model in (("s", probe), ("t", teacher)):
            module = dict(model.named_modules())[name]
            module.register_forward_hook(
                lambda m, a, out, key=(side, name): caught.__setitem__(key, out))
    with torch.no_grad():
        outputs, reference = probe(train[0]), teacher(train[0])
    features = [relative_mse(caught["s", "body.0"], caught["t", "body.0"][:, keep["body.0.weight"]]),
                relative_mse(caught["s", "body.3"], caught["t", "body.3"][:, keep["body.3.weight"]]),
                relative_mse(caught["s", "seg"], caught["t", "seg"])]
    want = output_loss(outputs, reference, 4.0) + 0.5 * torch.stack(features).mean()

    history = fit(student, train, 1, teacher=teacher, feature_weight=0.5, plan=result.plan,
                  progress=False)
    assert history[0]["loss"] == pytest.approx(float(want), rel=1e-5)
    assert history[0]["features"] == ["body.0", "body.3", "seg"]
    assert history[0]["features_skipped"] == {}

    # without the plan the pruned layers cannot be aligned: left out, with the reason
    history = fit(copy.deepcopy(result.model), train, 1, teacher=teacher, feature_weight=0.5,
                  progress=False)
    assert history[0]["features"] == ["seg"]
    assert set(history[0]["features_skipped"]) == {"body.0", "body.3"}
    assert "plan" in history[0]["features_skipped"]["body.0"]
    with pytest.raises(StructPruneError, match="no layer 'nope'"):
        fit(copy.deepcopy(result.model), train, 1, teacher=teacher, feature_weight=0.5,
            features=["nope"], progress=False)


def test_a_head_that_answers_differently_in_training_runs_in_eval_mode_alone():
    train, held_out = _inputs(12, seed=7), _inputs(4, seed=8)
    teacher = _trained_like(Detector(), train)
    student = copy.deepcopy(teacher)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.3 * torch.randn_like(p))
    buffers = copy.deepcopy(dict(student.named_buffers()))
    inputs, _ = split(train[0])
    student.train()
    assert eval_structure(student, inputs) == ["head"]
    assert not student.head.training and student.body[1].training
    for name, tensor in student.named_buffers():
        assert torch.equal(tensor, buffers[name])  # probing left the statistics as they were
    assert student(train[0]).shape == teacher(train[0]).shape

    before = _relative_errors(student, teacher, held_out)[0]
    history = fit(student, train, 3, lr=1e-2, teacher=teacher, progress=False)
    assert history[0]["eval_mode_layers"] == ["head"]
    assert _relative_errors(student, teacher, held_out)[0] < 0.7 * before


def test_batches_without_targets_and_feature_maps_need_a_teacher():
    model = Segmenter()
    with pytest.raises(StructPruneError, match="teacher to distil from needs targets"):
        fit(model, _inputs(1, seed=0), 1, progress=False)
    with pytest.raises(StructPruneError, match="--distill"):
        fit(model, _inputs(1, seed=0), 1, feature_weight=0.5, progress=False)


def test_yolov8n_distils_on_its_decoded_outputs():
    pytest.importorskip("ultralytics")
    from structprune.front.models import build_model

    teacher = build_model("ultralytics:yolov8n.yaml")
    train = _inputs(2, seed=9, shape=(2, 3, 64, 64))
    _trained_like(teacher, train)
    student = copy.deepcopy(teacher)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in student.parameters():
            if p.requires_grad:
                p.mul_(1.0 + 0.05 * torch.randn_like(p))
    dense_state = copy.deepcopy(teacher.state_dict())
    start = copy.deepcopy(student.state_dict())
    history = fit(student, train, 1, teacher=teacher, feature_weight=0.1, progress=False)
    record = history[0]
    assert np.isfinite(record["loss"]) and record["eval_mode_layers"] == ["model.22"]
    assert record["features_skipped"] == {} and len(record["features"]) > 50
    assert any(not torch.equal(t, start[n]) for n, t in student.state_dict().items())
    for name, tensor in teacher.state_dict().items():
        assert torch.equal(tensor, dense_state[name])
    student.eval()
    with torch.no_grad():
        assert student(train[0]).shape == teacher(train[0]).shape
