"""Budgets and thresholds: the cost model counts the pruned model's MACs and parameters
exactly from the dense graph, and a budget lands on its fraction of the dense MACs."""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision

import structprune as sp
from structprune.core.capture import capture
from structprune.core.cost import PruneCost
from structprune.core.counts import count_macs, node_macs
from structprune.core.counts import count_macs as recount

from .fixtures import small_vgg
from .oracles import randomize

X64 = (torch.randn(1, 3, 64, 64),)


def _tv(name):
    torch.manual_seed(0)
    return randomize(getattr(torchvision.models, name)().eval())


def _stages(model, inputs, method="auto"):
    analysis = sp.analyse(capture(model, inputs, method=method))
    scores = sp.score(analysis, "l2", [g for g in analysis.groups if (~g.blocked).any()])
    return analysis, scores


class Functional(nn.Module):
    """Bare parameters through F.conv2d and F.linear, and a product of two activations."""

    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(12, 3, 3, 3))
        self.w2 = nn.Parameter(torch.randn(10, 12, 3, 3))
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.fc = nn.Parameter(torch.randn(6, 10))

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w1, padding=1))
        y = self.dw(F.conv2d(y, self.w2, padding=1))
        z = y.flatten(2)
        gram = z @ z.transpose(1, 2)  # activation x activation: its MACs follow no parameter
        return F.linear(y.mean((2, 3)), self.fc), gram.sum((1, 2))


def _exact(model, inputs, **settings):
    result = sp.prune(model, inputs, check=False, **settings)
    cost = PruneCost(result.analysis)
    removed = result.analysis.removed_components(result.plan.params)
    figures = result.figures
    assert (cost.dense_macs, cost.dense_params) == (figures["macs_dense"], figures["params_dense"])
    assert cost.macs_after(removed) == figures["macs_pruned"] < figures["macs_dense"]
    assert cost.params_after(removed) == figures["params_pruned"]
    return result, cost


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "vgg11"])
def test_cost_model_equals_a_recount_of_the_pruned_model(name):
    result, cost = _exact(_tv(name), X64, ratio=0.3, round_to=4)
    # the marginal cost of one unit is the MACs (parameters) its removal alone saves
    units = [g.units[0] for g in result.analysis.groups if (~g.blocked).any()][:4]
    for unit in units:
        alone = np.zeros(result.analysis.n_components, bool)
        alone[unit] = True
        assert math.isclose(cost.unit_macs()[unit], cost.dense_macs - cost.macs_after(alone))
        assert math.isclose(cost.unit_params()[unit],
                            cost.dense_params - cost.params_after(alone))


@pytest.mark.parametrize("method", ["fx", "export"])
def test_cost_model_on_functional_weights_and_both_capture_paths(method):
    torch.manual_seed(0)
    model, x = Functional().eval(), (torch.randn(2, 3, 8, 8),)
    analysis, scores = _stages(model, x, method)
    cost = PruneCost(analysis)
    weights = set(cost.node_weight.values())
    assert {"w1", "w2", "dw.weight", "fc"} <= weights and None in weights  # the gram matrix
    plan = sp.make_plan(analysis, scores, sp.PruneConfig(ratio=0.5))
    pruned = sp.apply_plan(model, plan)
    removed = analysis.removed_components(plan.params)
    after = node_macs(capture(pruned, x, method=method))
    gram = next(n for n, w in cost.node_weight.items() if w is None)
    assert after[gram] < cost.node_macs[gram]  # the one figure the model leaves dense
    assert cost.macs_after(removed) == sum(after.values()) - after[gram] + cost.node_macs[gram]
    assert cost.params_after(removed) == sum(p.numel() for p in pruned.parameters())


def test_node_macs_sum_to_count_macs():
    cap = capture(_tv("resnet18"), X64)
    per_node = node_macs(cap)
    assert all(v > 0 for v in per_node.values()) and "fc" in per_node
    assert sum(per_node.values()) == recount(cap)


@pytest.mark.parametrize("name", ["vgg16", "resnet50", "mobilenet_v2"])
def test_macs_budget_lands_on_its_fraction(name):
    model = _tv(name)
    analysis, scores = _stages(model, X64)
    plan = sp.make_plan(analysis, scores, sp.PruneConfig(macs_budget=0.4))
    result = sp.prune(model, X64, plan=plan, check=name == "mobilenet_v2")
    kept = result.figures["macs_ratio"]
    assert 0.38 <= kept <= 0.4, kept
    assert plan.extra["budget"]["macs_ratio_predicted"] == kept
    assert plan.settings["macs_budget"] == 0.4
    assert sp.Plan.from_json(plan.to_json()).extra["budget"]["kind"] == "macs"


def test_macs_budget_at_224_on_resnet50():
    model = _tv("resnet50")
    x = (torch.randn(1, 3, 224, 224),)
    analysis, scores = _stages(model, x)
    plan = sp.make_plan(analysis, scores, sp.PruneConfig(macs_budget=0.4))
    pruned = sp.apply_plan(model, plan)
    kept = count_macs(capture(pruned, x)) / count_macs(analysis.capture)
    assert 0.38 <= kept <= 0.4, kept


def test_params_budget_and_rounding_stay_within_the_budget():
    model = _tv("resnet50")
    analysis, scores = _stages(model, X64)
    cost = PruneCost(analysis)
    plan = sp.make_plan(analysis, scores, sp.PruneConfig(params_budget=0.5), cost=cost)
    pruned = sp.apply_plan(model, plan)
    kept = sum(p.numel() for p in pruned.parameters()) / cost.dense_params
    assert 0.48 <= kept <= 0.5, kept

    plan = sp.make_plan(analysis, scores, sp.PruneConfig(macs_budget=0.5, round_to=16),
                        cost=cost)
    removed = analysis.removed_components(plan.params)
    assert 0.48 <= cost.macs_after(removed) / cost.dense_macs <= 0.5
    for entry in plan.params:
        if entry["name"].endswith("conv1.weight") and entry["dim"] == 0:
            assert len(entry["keep"]) % 16 == 0
    assert count_macs(capture(sp.apply_plan(model, plan), X64)) == cost.macs_after(removed)


def test_a_full_budget_removes_nothing_and_an_unreachable_one_says_what_is():
    model = _tv("resnet18")
    analysis, scores = _stages(model, X64)
    assert sp.make_plan(analysis, scores, sp.PruneConfig(macs_budget=1.0)).params == []
    with pytest.raises(sp.PlanError, match="lowest reachable is 0.0[0-9]+ of the dense MACs"):
        sp.make_plan(analysis, scores, sp.PruneConfig(macs_budget=0.01))
    with pytest.raises(sp.PlanError, match="lowest reachable"):
        sp.make_plan(analysis, scores, sp.PruneConfig(params_budget=0.3, ignore=["layer4"]))


@pytest.mark.parametrize("min_width", [1, 20])
def test_threshold_keeps_the_units_scoring_at_least_it(min_width):
    torch.manual_seed(0)
    model = randomize(small_vgg())
    with torch.no_grad():
        model[0].weight[:3] *= 1e-3  # a clear bottom of three filters
    analysis, scores = _stages(model, (torch.randn(2, 3, 16, 16),))
    plan = sp.make_plan(analysis, scores, sp.PruneConfig(threshold=0.9, min_width=min_width))
    removed = analysis.removed_components(plan.params)
    bound = 0
    for group in analysis.groups:
        if group.index not in scores or group.blocked.all():
            continue
        s = scores[group.index]
        gone = removed[group.units]
        fewest = min(group.size, max(math.ceil(min_width / group.width),
                                     group.size - int(group.size * 0.9)))
        if (s >= 0.9).sum() >= fewest:
            assert np.array_equal(~gone, s >= 0.9), group.index
        else:  # the best scores below the threshold fill up to the minimum width
            bound += 1
            assert (~gone).sum() == fewest
            assert not gone.any() or s[~gone].min() >= s[gone].max()
    assert (bound > 0) == (min_width == 20)
    assert plan.settings["threshold"] == 0.9 and plan.params


@pytest.mark.parametrize("bad, says", [
    ({"macs_budget": 0.4, "params_budget": 0.4}, "only one"),
    ({"threshold": 0.5, "macs_budget": 0.4}, "only one"),
    ({"macs_budget": 0.0}, r"outside \(0, 1\]"),
    ({"params_budget": 1.5}, r"outside \(0, 1\]"),
    ({"macs_budget": float("nan")}, r"outside \(0, 1\]"),
    ({"threshold": -0.1}, ">= 0"),
    ({"macs_budget": 0.5, "ratios": {"0": 0.2}}, "ratio overrides"),
])
def test_bad_budget_settings_are_refused(bad, says):
    with pytest.raises(sp.PlanError, match=says):
        sp.PruneConfig(**bad)
