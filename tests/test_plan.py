import json

import pytest
import torch
import torch.nn as nn
import torchvision

import structprune as sp
from structprune.core.capture import capture

from .fixtures import small_vgg
from .oracles import check_pruned, randomize

X = (torch.randn(2, 3, 16, 16),)


def kept(result, name, dim=0):
    """Kept count on an axis (the dense size when the plan leaves it alone)."""
    entry = [p for p in result.plan.params if p["name"] == name and p["dim"] == dim]
    if entry:
        return len(entry[0]["keep"])
    return result.analysis.sizes[name][dim]


def test_plan_file_follows_the_contract():
    result = check_pruned(randomize(small_vgg()), X)
    data = json.loads(result.plan.dumps())
    assert data["format"] == "structprune.plan/1"
    state = dict(small_vgg().state_dict())
    for entry in data["params"]:
        assert set(entry) >= {"name", "dim", "size", "keep"}
        assert state[entry["name"]].shape[entry["dim"]] == entry["size"]
        assert entry["keep"] == sorted(set(entry["keep"]))
    names = {(e["name"], e["dim"]) for e in data["params"]}
    assert {("0.weight", 0), ("0.bias", 0), ("1.running_mean", 0), ("3.weight", 1)} <= names
    assert ("17.weight", 0) not in names  # the output layer keeps its 10 classes


def test_plan_reapplies_to_a_fresh_model_and_reproduces_the_architecture(tmp_path):
    model = randomize(small_vgg())
    result = sp.prune(model, X, 0.5)
    result.plan.save(tmp_path / "plan.json")
    fresh = small_vgg()
    rebuilt = sp.apply_plan(fresh, sp.Plan.load(tmp_path / "plan.json"))
    shapes = {k: v.shape for k, v in rebuilt.state_dict().items()}
    assert shapes == {k: v.shape for k, v in result.model.state_dict().items()}
    assert fresh[0].out_channels == 16  # the fresh model itself is untouched


def test_same_inputs_give_byte_identical_plans():
    model = randomize(small_vgg())
    assert sp.prune(model, X, 0.4).plan.dumps() == sp.prune(model, X, 0.4).plan.dumps()


ODD_WIDTHS = (12, 20, 37)  # multiples of neither 4 nor 8


def odd_widths_cnn():
    """Three convolutions whose widths are not multiples of 4 or 8, then a classifier."""
    layers, c = [], 3
    for width in ODD_WIDTHS:
        layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
        c = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 10))


@pytest.mark.parametrize("round_to", [4, 8])
def test_round_to_gives_multiples(round_to):
    """Each layer keeps the multiple of ``round_to`` nearest to what the ratio alone keeps
    (at least one multiple, at most the layer): 12, 20, 37 channels at ratio 0.45 keep
    7, 11, 21 before rounding, none a multiple of 4 or 8 nor halfway between two, so a plan
    that rounds nothing or prunes nothing fails."""
    ratio = 0.45
    result = check_pruned(randomize(odd_widths_cnn()), X, ratio, round_to=round_to)
    for name, width in zip(("0.weight", "3.weight", "6.weight"), ODD_WIDTHS, strict=True):
        unrounded = width - int(width * ratio)
        assert unrounded % round_to and (unrounded / round_to) % 1 != 0.5
        want = min(width, max(round_to, round(unrounded / round_to) * round_to))
        got = kept(result, name)
        assert got == want < width, (name, got, want)
        assert got % round_to == 0


def test_min_width_ignore_and_per_module_ratio():
    model = randomize(small_vgg())
    result = check_pruned(model, X, 0.9, min_width=8, ignore=["10"], ratios={"15": 0.5})
    assert kept(result, "0.weight") == 8
    assert not [p for p in result.plan.params if p["name"].startswith("10.")]
    assert kept(result, "7.weight") == 40  # its output feeds the ignored conv
    assert kept(result, "15.weight") == 15


def test_global_ranking_keeps_the_important_channels():
    model = randomize(small_vgg())
    with torch.no_grad():
        model[0].weight[:8] *= 100  # eight channels clearly matter most
    result = check_pruned(model, X, 0.5, global_ranking=True)
    entry = next(p for p in result.plan.params if p["name"] == "0.weight" and p["dim"] == 0)
    assert set(range(8)) <= set(entry["keep"])
    total = sum(g["units"] for g in result.plan.groups if g["status"] == "exact")
    removed = sum(g["units"] - g["kept"] for g in result.plan.groups if g["status"] == "exact")
    assert abs(removed / total - 0.5) < 0.05


def test_magnitude_scores_drop_the_smallest_filters():
    model = randomize(small_vgg())
    with torch.no_grad():
        model[0].weight[[1, 5, 9]] *= 1e-3
    result = sp.prune(model, X, 3 / 16)
    entry = next(p for p in result.plan.params if p["name"] == "0.weight" and p["dim"] == 0)
    assert sorted(set(range(16)) - set(entry["keep"])) == [1, 5, 9]


@pytest.mark.parametrize("bad", [{"ratio": 1.0}, {"ratio": -0.1}, {"round_to": 0},
                                 {"ignore": ["nothing.here"]}])
def test_bad_settings_are_refused(bad):
    settings = {"ratio": 0.5, **bad}
    ratio = settings.pop("ratio")
    with pytest.raises(sp.PlanError):
        sp.prune(small_vgg(), X, ratio, **settings)


def test_plan_for_a_different_model_is_refused():
    plan = sp.prune(randomize(small_vgg()), X, 0.5).plan
    with pytest.raises(sp.PlanError, match="different model"):
        sp.apply_plan(torchvision.models.resnet18(), plan)


def test_corrupt_plan_files_are_refused(tmp_path):
    path = tmp_path / "plan.json"
    text = sp.prune(randomize(small_vgg()), X, 0.5).plan.dumps()
    path.write_text(text[: len(text) // 2])
    with pytest.raises(sp.PlanError, match="not valid JSON"):
        sp.Plan.load(path)
    path.write_text(json.dumps({"format": "structprune.plan/1", "params": [{"name": "x"}]}))
    with pytest.raises(sp.PlanError, match="malformed"):
        sp.Plan.load(path)


def test_exact_only_skips_approximate_groups():
    model = torchvision.models.convnext_tiny()
    analysis = sp.analyse(capture(model, (torch.randn(1, 3, 32, 32),)))
    approx = [g for g in analysis.groups if g.approximate.any()]
    assert approx
    plan = sp.make_plan(analysis, sp.score(analysis), sp.PruneConfig(ratio=0.5, exact_only=True))
    removed = analysis.removed_components(plan.params)
    assert not any(removed[g.units].any() for g in approx)
    assert plan.params
