"""round_to chosen by measurement: the bookkeeping, with synthetic timings."""

import pytest
import torch

import structprune as sp
from structprune.deploy import bench, tune

from .test_plan import small_vgg


@pytest.mark.parametrize("times,chosen", [
    ([10, 9, 7, 5, 6.0, 8], 16),     # fastest wins
    ([10, 5.1, 5.0, 5.05, 9, 9], 1),  # ties within 3%: the smallest multiple
])
def test_fastest_rounding_picks_the_fastest_candidate(monkeypatch, times, chosen):
    monkeypatch.setattr(tune, "_runners", lambda models, *a, **k: [None] * len(models))
    monkeypatch.setattr(bench, "interleaved_many",
                        lambda runners, **k: [[t] * 3 for t in times])
    result = tune.fastest_rounding(small_vgg(), (torch.randn(1, 3, 16, 16),), 0.3,
                                   candidates=(1, 8, 16, 32, 64), runtime="ort-cpu")
    info = result.figures["rounding"]
    assert info["chosen"] == chosen and result.plan.settings["round_to"] == chosen
    assert info["dense_ms"] == 10
    assert [c["round_to"] for c in info["candidates"]] == [1, 8, 16, 32, 64]
    assert result.verification.ok


def test_fastest_rounding_times_real_onnx_models():
    """Real ONNX Runtime timings: the choice follows the recorded medians by the stated rule,
    and each candidate's figures are those of pruning with that multiple directly."""
    model, x = small_vgg(), (torch.randn(1, 3, 16, 16),)
    result = tune.fastest_rounding(model, x, 0.4, candidates=(1, 8), runtime="ort-cpu",
                                   repeats=3)
    info = result.figures["rounding"]
    best = min(c["ms"] for c in info["candidates"])
    assert info["chosen"] == min(c["round_to"] for c in info["candidates"]
                                 if c["ms"] <= best * 1.03)
    for c in info["candidates"]:
        direct = sp.prune(model, x, 0.4, round_to=c["round_to"], check=False)
        assert c["macs_ratio"] == direct.figures["macs_ratio"] and c["ms"] > 0
    assert result.plan.params == sp.prune(model, x, 0.4, round_to=info["chosen"]).plan.params
