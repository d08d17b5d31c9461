"""Sensitivity (``--auto``): each trial measured as the model will be used (after BatchNorm
recalibration when it follows), and the allocation over groups of any width."""

import numpy as np
import pytest
import torch
import torch.nn as nn

from structprune.accuracy.recover import recover
from structprune.accuracy.sensitivity import RATIOS, GroupRatios, allocate, measure, quality
from structprune.config import PruneConfig
from structprune.core.apply import apply_plan
from structprune.core.cost import PruneCost
from structprune.core.prepare import prepare

from .fixtures import small_vgg
from .oracles import randomize

X = (torch.randn(2, 3, 16, 16),)


def _selection(model: nn.Module, config: PruneConfig) -> GroupRatios:
    prepared = prepare(model, X, config)
    return GroupRatios(prepared.analysis, prepared.scores, config)


def _feature_net() -> nn.Module:
    """Conv + BatchNorm + ReLU twice and a conv head: its output is a feature map, so the
    quality measured is 1 - relative output error, which every change moves."""
    return randomize(nn.Sequential(
        nn.Conv2d(3, 12, 3, padding=1), nn.BatchNorm2d(12), nn.ReLU(),
        nn.Conv2d(12, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 4, 1)).eval())


def test_each_trial_is_measured_after_batchnorm_recalibration_when_it_follows():
    model = _feature_net()
    gen = torch.Generator().manual_seed(1)
    val, calibration = ([torch.randn(n, 3, 16, 16, generator=gen) * 2 + 0.5 for _ in range(k)]
                        for n, k in ((32, 2), (16, 4)))  # no labels
    # statistics of the data, as a trained model has: pruning then shifts them
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    with torch.no_grad():
        model.train()(torch.cat(calibration))
    model.eval()
    selection = _selection(model, PruneConfig())
    raw = measure(model, selection, val, ratios=(0.5, 0.8), progress=False)
    recalibrated = measure(model, selection, val, ratios=(0.5, 0.8), progress=False,
                           recalibrate=calibration)
    assert "recalibrated" in recalibrated and "recalibrated" not in raw
    assert recalibrated["measured"] == "1 - relative output error"
    # every point recomputed: the group alone pruned, recovered with ``bn``, compared
    changed = []
    for row, row_raw in zip(recalibrated["groups"], raw["groups"], strict=True):
        for ratio, got, got_raw in zip((0.5, 0.8), row["accuracy"], row_raw["accuracy"],
                                       strict=True):
            plan = selection.plan({row["group"]: ratio})
            alone = apply_plan(model, plan)
            assert quality(alone, model, val)[0] == pytest.approx(got_raw)
            recover(alone, model, plan, selection.analysis, calibration, "bn")
            assert quality(alone, model, val)[0] == pytest.approx(got)
            changed.append(got != pytest.approx(got_raw))
    # recalibration changes what is measured here (where it brings the output closer to
    # the dense one; elsewhere recover undoes it), so the test tells the two apart
    assert any(changed)


def test_a_model_without_batchnorm_is_measured_as_it_is():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(8 * 12 * 12, 4)).eval()
    val = [torch.randn(8, 3, 16, 16)]
    found = measure(model, _selection(model, PruneConfig()), val, ratios=(0.5,),
                    progress=False, recalibrate=[torch.randn(8, 3, 16, 16)])
    assert "recalibrated" not in found and found["groups"]


def test_the_allocation_prunes_a_group_narrower_than_one_ratio_step():
    """A 16-unit group loses no unit at a 0.05 step; the allocation goes on to the next
    ratio that removes one (it used to stop there: such groups were never pruned, and
    ResNet-20's 16-wide stage could not be narrowed at all)."""
    model = randomize(small_vgg().eval())
    config = PruneConfig(macs_budget=0.9)
    selection = _selection(model, config)
    analysis = selection.analysis
    narrow = next(g for g in selection.candidates if analysis.groups[g].size == 16)
    macs_after = PruneCost(analysis).macs_after
    dense = macs_after(np.zeros(analysis.n_components, bool))
    budget = macs_after(selection.removed({narrow: 0.5})) / dense

    def curves(narrow_loss: float, others_loss: float) -> dict:
        return {"dense_accuracy": 1.0, "ratios": list(RATIOS),
                "groups": [{"group": g, "accuracy": [
                    1.0 - (narrow_loss if g == narrow else others_loss) * r for r in RATIOS]}
                    for g in selection.candidates]}

    # the narrow group costs little to prune, every other group loses much
    assert allocate(curves(0.01, 1.0), selection, macs_after, budget) == {narrow: 0.5}
    # and the other way round it is left whole: the cost is the loss per MAC saved
    assert narrow not in allocate(curves(1.0, 0.01), selection, macs_after, budget)
