"""round_to chosen by measurement: the bookkeeping, with synthetic timings."""

import functools

import pytest
import torch
import torch.nn as nn

import structprune as sp
from structprune.deploy import bench, tune

from .fixtures import small_vgg


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


def test_fastest_rounding_times_candidates_without_the_sequential_pass(monkeypatch):
    """Only the chosen candidate's channels are chosen sequentially: its widths are what was
    timed; every candidate skips the pass."""
    monkeypatch.setattr(tune, "_runners", lambda models, *a, **k: [None] * len(models))
    monkeypatch.setattr(bench, "interleaved_many",
                        lambda runners, **k: [[t] * 3 for t in [10, 9, 5, 8]])
    calls = []
    real = tune.prune
    monkeypatch.setattr(tune, "prune", lambda *a, config, **k: calls.append(config.sequential)
                        or real(*a, config=config, **k))
    torch.manual_seed(0)
    data = [torch.randn(4, 3, 16, 16) for _ in range(2)]
    result = tune.fastest_rounding(small_vgg(), (torch.randn(1, 3, 16, 16),), 0.5,
                                   candidates=(1, 8, 16), runtime="ort-cpu", criterion="obs",
                                   data=data, sequential=True)
    assert calls == [False, False, False, True]
    assert result.plan.settings["round_to"] == 8 and result.plan.settings["sequential"]
    timed = result.figures["rounding"]["candidates"][1]["macs_ratio"]
    assert result.figures["macs_ratio"] == pytest.approx(timed)
    assert result.verification.ok


def _hidden_widths(model: nn.Module) -> list[int]:
    """Output widths of every convolution and linear layer but the last (the classes)."""
    layers = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return [m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            for m in layers[:-1]]


@pytest.mark.parametrize("fast_multiple,chosen", [
    (16, 16),  # only round_to 16 leaves every width a multiple of 16 (8 leaves 24 channels)
    (8, 8),    # 8 and 16 both leave multiples of 8: a tie, and the smaller multiple wins
])
def test_fastest_rounding_times_real_onnx_models(monkeypatch, fast_multiple, chosen):
    """Real ONNX models run on ONNX Runtime, timed on a clock the test controls: a run of a
    model whose hidden widths are all multiples of ``fast_multiple`` takes 1 ms, any other
    2 ms, so the right multiple is known in advance. Each candidate's figures are those of
    pruning with that multiple directly."""
    now = [0.0]

    def cost_ms(model: nn.Module) -> float:
        return 1.0 if all(w % fast_multiple == 0 for w in _hidden_widths(model)) else 2.0

    def timed(runner, ms):
        def run():
            out = runner()  # the real session runs; the test's clock says how long it took
            now[0] += ms / 1e3
            return out
        return bench.SessionRunner(run)

    real_runners = tune._runners
    monkeypatch.setattr(tune, "_runners", lambda models, *a, **k: [
        timed(runner, cost_ms(m))
        for runner, m in zip(real_runners(models, *a, **k), models, strict=True)])
    monkeypatch.setattr(bench, "interleaved_many",
                        functools.partial(bench.interleaved_many, clock=lambda: now[0]))
    model, x = small_vgg(), (torch.randn(1, 3, 16, 16),)
    result = tune.fastest_rounding(model, x, 0.4, candidates=(1, 8, 16), runtime="ort-cpu",
                                   repeats=3)
    info = result.figures["rounding"]
    assert info["chosen"] == chosen and result.plan.settings["round_to"] == chosen
    assert [c["round_to"] for c in info["candidates"]] == [1, 8, 16]
    assert info["dense_ms"] == pytest.approx(cost_ms(model))
    best = min(c["ms"] for c in info["candidates"])
    assert info["chosen"] == min(c["round_to"] for c in info["candidates"]
                                 if c["ms"] <= best * 1.03)
    for c in info["candidates"]:
        direct = sp.prune(model, x, 0.4, round_to=c["round_to"], check=False)
        assert c["macs_ratio"] == direct.figures["macs_ratio"] and c["ms"] > 0
        assert c["ms"] == pytest.approx(cost_ms(direct.model))
    assert result.plan.params == sp.prune(model, x, 0.4, round_to=info["chosen"]).plan.params
