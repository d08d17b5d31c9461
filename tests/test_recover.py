"""Recover: BN recalibration, bias compensation and least-squares reconstruction of a pruned
model, checked against statistics and solutions computed here independently, and on held-out
batches the methods never saw."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.accuracy.data import digits
from structprune.accuracy.recover import (
    LSQ_FORWARD_MACS,
    LSQ_MIN_SAMPLES,
    lsq_sample_count,
    output_mse,
    recover,
)
from structprune.batches import Inputs, take
from structprune.errors import StructPruneError

from .oracles import randomize


class Net(nn.Module):
    """conv-bn-relu x 3 with a max-pool, flatten, linear; conv2 and fc have biases, conv1
    and conv3 do not (conv3's bias compensation goes into bn3)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.3)  # must stay off while BN statistics are estimated
        self.conv2 = nn.Conv2d(16, 32, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(32)
        self.pool = nn.MaxPool2d(2)
        self.conv3 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(32)
        self.avg = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(32 * 4, 10)

    def block1(self, x: torch.Tensor) -> torch.Tensor:  # conv2's input
        return self.drop(torch.relu(self.bn1(self.conv1(x))))

    def block2(self, x: torch.Tensor) -> torch.Tensor:  # conv3's input
        return self.pool(torch.relu(self.bn2(self.conv2(self.block1(x)))))

    def features(self, x: torch.Tensor) -> torch.Tensor:  # fc's input
        return torch.flatten(self.avg(torch.relu(self.bn3(self.conv3(self.block2(x))))), 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


def _norms(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}


@pytest.fixture(scope="module")
def setup():
    """A dense model whose BN statistics describe the data (as a trained one's do), pruned
    by half; digits' training batches calibrate, its validation batches are held out."""
    torch.manual_seed(0)
    data = digits((1, 1, 8, 8), batch_size=64)
    fit, held_out = take(data.train, 6), take(data.val, 4)
    dense = randomize(Net(), seed=1)
    with torch.no_grad():
        dense.eval()
        for m in _norms(dense).values():
            m.train()
            m.reset_running_stats()
            m.momentum = None
        for x, _ in fit:
            dense(x)
        for m in _norms(dense).values():
            m.momentum = 0.1
        dense.eval()
    result = sp.prune(dense, (fit[0][0][:2],), 0.5)
    return dense, result, fit, held_out


def _recovered(setup, method, **kwargs):
    dense, result, fit, _ = setup
    pruned = copy.deepcopy(result.model)
    report = recover(pruned, dense, result.plan, result.analysis, fit, method, **kwargs)
    return pruned, report


def _layer_mse(pruned: nn.Module, dense: nn.Module, name: str, keep, batches) -> float:
    """MSE of a module's output in the pruned model against the dense one's kept channels."""
    got, want = [], []
    hooks = [pruned.get_submodule(name).register_forward_hook(lambda m, a, y: got.append(y)),
             dense.get_submodule(name).register_forward_hook(lambda m, a, y: want.append(y))]
    with torch.no_grad():
        for x, _ in batches:
            pruned.eval()(x)
            dense.eval()(x)
    for h in hooks:
        h.remove()
    want = [w if keep is None else w[:, keep] for w in want]
    errors = [(g - w).square().flatten() for g, w in zip(got, want, strict=True)]
    return float(torch.cat(errors).mean())


def _fitted(batches: list) -> list:
    """The batches recover() fits on: all but every 4th (which it checks on)."""
    return [b for i, b in enumerate(batches) if i % 4 != 3]


def _keep(plan: sp.Plan, name: str, dim: int):
    entry = next((e for e in plan.params if e["name"] == name and e["dim"] == dim), None)
    return None if entry is None else torch.tensor(entry["keep"])


def _removed(plan: sp.Plan, name: str) -> torch.Tensor:
    entry = next(e for e in plan.params if e["name"] == name and e["dim"] == 1)
    drop = torch.ones(entry["size"], dtype=torch.bool)
    drop[entry["keep"]] = False
    return drop


# --------------------------------------------------------------------------------------- bn


def test_bn_recalibration_equals_the_statistics_of_each_bn_input(setup):
    dense, result, fit, _ = setup
    # reference: every BN's input over the fit batches, with the BN layers normalising by
    # batch statistics (their running statistics play no part then) and dropout off
    reference = copy.deepcopy(result.model).eval()
    inputs = {name: [] for name in _norms(reference)}
    for name, m in _norms(reference).items():
        m.train()
        m.register_forward_pre_hook(lambda mod, args, name=name: inputs[name].append(args[0]))
    with torch.no_grad():
        for x, _ in _fitted(fit):
            reference(x)

    pruned = copy.deepcopy(result.model).train()
    pruned.bn2.momentum = 0.3
    report = recover(pruned, dense, result.plan, result.analysis, fit, "bn")
    for name, m in _norms(pruned).items():
        x = torch.cat(inputs[name])
        torch.testing.assert_close(m.running_mean, x.mean((0, 2, 3)), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(m.running_var, x.var((0, 2, 3), unbiased=True),
                                   rtol=1e-4, atol=1e-5)
        assert int(m.num_batches_tracked) == len(_fitted(fit))
    # flags and momenta as they were
    assert all(m.training for m in pruned.modules())
    assert pruned.bn2.momentum == 0.3 and pruned.bn1.momentum == 0.1
    assert [layer["module"] for layer in report["layers"]] == ["bn1", "bn2", "bn3"]
    # bn2 and bn3 follow consumers that lost inputs: their outputs move toward the dense ones
    for layer in report["layers"][1:]:
        assert layer["mse_after"] < 0.9 * layer["mse_before"], layer


# ------------------------------------------------------------------------------------- bias


def test_bias_compensation_adds_the_removed_channels_mean_contribution(setup):
    dense, result, fit, _ = setup
    plan = result.plan
    pruned, report = _recovered(setup, "bias")
    x = torch.cat([b[0] for b in _fitted(fit)])
    with torch.no_grad():
        dense.eval()
        inputs = {"conv2": dense.block1(x), "conv3": dense.block2(x), "fc": dense.features(x)}
    shifts = {}
    for name, feats in inputs.items():
        drop = _removed(plan, f"{name}.weight")
        weight = dense.get_submodule(name).weight.double()
        means = feats.double().mean((0, 2, 3)) if feats.ndim == 4 else feats.double().mean(0)
        taps = weight.sum((2, 3)) if weight.ndim == 4 else weight
        shift = taps[:, drop] @ means[drop]
        keep = _keep(plan, f"{name}.weight", 0)
        shifts[name] = (shift if keep is None else shift[keep]).float()
    before = result.model
    torch.testing.assert_close(pruned.conv2.bias - before.conv2.bias, shifts["conv2"],
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(pruned.fc.bias - before.fc.bias, shifts["fc"], rtol=1e-4,
                               atol=1e-5)
    # conv3 has no bias and feeds bn3 alone: subtracted from bn3's running mean
    torch.testing.assert_close(before.bn3.running_mean - pruned.bn3.running_mean,
                               shifts["conv3"], rtol=1e-4, atol=1e-5)
    assert torch.equal(pruned.conv3.weight, before.conv3.weight)
    targets = {layer["module"]: layer["target"] for layer in report["layers"]}
    assert targets == {"conv2": "bias", "conv3": "folded into bn3.running_mean", "fc": "bias"}


def test_bias_compensation_reduces_the_error_on_held_out_batches(setup):
    dense, result, _, held_out = setup
    pruned, report = _recovered(setup, "bias")
    # measured: conv2 0.072 -> 0.055, bn3 (conv3 folded into it) 1.55 -> 1.10, output
    # 0.056 -> 0.038
    keep2 = _keep(result.plan, "conv2.weight", 0)
    for name, keep, most in [("conv2", keep2, 0.85),
                             ("bn3", _keep(result.plan, "bn3.weight", 0), 0.8)]:
        before = _layer_mse(result.model, dense, name, keep, held_out)
        after = _layer_mse(pruned, dense, name, keep, held_out)
        assert after < most * before, (name, before, after)
    before, after = output_mse(result.model, dense, held_out), output_mse(pruned, dense, held_out)
    assert after < 0.8 * before, (before, after)
    assert report["output_mse_after"] < 0.8 * report["output_mse_before"]


def test_bias_compensation_skips_a_layer_without_bias_or_bn():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, bias=False), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(8, 3, 10, 10)
    result = sp.prune(randomize(model), (x,), 0.5)
    report = recover(result.model, model, result.plan, result.analysis, [(x, None)], "bias")
    skipped = {layer["module"]: layer.get("skipped") for layer in report["layers"]}
    assert skipped["3"] is not None and "BatchNorm" in skipped["3"]
    assert skipped["5"] is None


# -------------------------------------------------------------------------------------- lsq


def _patches(x: torch.Tensor) -> torch.Tensor:
    """3x3 patches of a zero-padded input, channel-major like a conv weight, by slicing."""
    n, c, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    taps = [padded[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)]
    stacked = torch.stack(taps, 2)  # n, c, 9, h, w
    return stacked.permute(0, 3, 4, 1, 2).reshape(n * h * w, c * 9)


def test_lsq_equals_an_independent_least_squares_solve(setup):
    dense, result, fit, _ = setup
    plan = result.plan
    # every row of every fit sample, no ridge: conv2 (the first consumer; its pruned input
    # is the dense one's kept channels) gets the plain least-squares solution
    pruned, report = _recovered(setup, "lsq", max_rows=10 ** 9, ridge=0.0, lsq_samples=10 ** 6)
    x = torch.cat([b[0] for b in _fitted(fit)])
    keep_in = torch.tensor(next(e["keep"] for e in plan.params
                                if e["name"] == "conv2.weight" and e["dim"] == 1))
    keep_out = _keep(plan, "conv2.weight", 0)
    with torch.no_grad():
        dense.eval()
        inputs = dense.block1(x)[:, keep_in]
        target = dense.conv2(dense.block1(x))[:, keep_out]
    a = _patches(inputs).double().numpy()
    a = np.concatenate([a, np.ones((a.shape[0], 1))], 1)
    y = target.permute(0, 2, 3, 1).reshape(-1, len(keep_out)).double().numpy()
    solution = np.linalg.lstsq(a, y, rcond=None)[0]
    weight = torch.from_numpy(solution[:-1].T).float().reshape(pruned.conv2.weight.shape)
    bias = torch.from_numpy(solution[-1]).float()
    torch.testing.assert_close(pruned.conv2.weight, weight, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(pruned.conv2.bias, bias, rtol=1e-3, atol=1e-4)
    first = report["layers"][0]
    assert first["module"] == "conv2" and first["rows"] == a.shape[0]
    assert [layer["module"] for layer in report["layers"]] == ["conv2", "conv3", "fc"]


def test_lsq_folds_the_intercept_of_a_bias_free_conv_into_its_batchnorm(setup):
    dense, result, fit, _ = setup
    # conv3 has no bias and feeds bn3 alone: it is regressed with a ones column (its input
    # is the pruned model's, conv2 already refitted), the weights written to conv3 and the
    # intercept subtracted from bn3's running mean
    pruned, report = _recovered(setup, "lsq", max_rows=10 ** 9, ridge=0.0, lsq_samples=10 ** 6)
    x = torch.cat([b[0] for b in _fitted(fit)])
    keep_out = _keep(result.plan, "conv3.weight", 0)
    with torch.no_grad():
        pruned.eval()
        dense.eval()
        inputs = pruned.block2(x)
        target = dense.conv3(dense.block2(x))[:, keep_out]
    a = _patches(inputs).double().numpy()
    a = np.concatenate([a, np.ones((a.shape[0], 1))], 1)
    y = target.permute(0, 2, 3, 1).reshape(-1, len(keep_out)).double().numpy()
    solution = np.linalg.lstsq(a, y, rcond=None)[0]
    weight = torch.from_numpy(solution[:-1].T).float().reshape(pruned.conv3.weight.shape)
    intercept = torch.from_numpy(solution[-1]).float()
    assert pruned.conv3.bias is None
    torch.testing.assert_close(pruned.conv3.weight, weight, rtol=1e-3, atol=1e-4)
    shift = result.model.bn3.running_mean - pruned.bn3.running_mean
    torch.testing.assert_close(shift, intercept, rtol=1e-3, atol=1e-4)
    assert intercept.abs().max() > 1e-2  # the removed channels' mean is worth fitting
    assert next(e for e in report["layers"] if e["module"] == "conv3").get("undone") is None


def test_lsq_reduces_the_error_on_held_out_batches(setup):
    dense, result, _, held_out = setup
    pruned, report = _recovered(setup, "lsq", lsq_samples=320)  # all the fit samples
    # measured: conv2 0.072 -> 0.0077, conv3 0.26 -> 0.025, output 0.056 -> 0.0057
    for name in ("conv2", "conv3"):
        keep = _keep(result.plan, f"{name}.weight", 0)
        before = _layer_mse(result.model, dense, name, keep, held_out)
        after = _layer_mse(pruned, dense, name, keep, held_out)
        assert after < 0.5 * before, (name, before, after)
    before, after = output_mse(result.model, dense, held_out), output_mse(pruned, dense, held_out)
    assert after < 0.2 * before, (before, after)
    assert all(layer["rows"] <= 20_000 + 6 for layer in report["layers"])


def test_lsq_undoes_a_layer_refit_that_is_worse_on_the_check_rows(setup):
    """64 samples give fc 64 rows for its 65 unknowns: the refit interpolates them and is
    worse on the check batch's rows, so fc keeps its pruned weights."""
    dense, result, fit, _ = setup
    pruned, report = _recovered(setup, "lsq", lsq_samples=64)
    fc = next(layer for layer in report["layers"] if layer["module"] == "fc")
    assert fc["rows"] == 64 and fc["check_rows"] == 16
    assert fc["mse_after"] < 0.1 * fc["mse_before"]  # the fit rows: nearly interpolated
    assert fc["check_mse_after"] > fc["check_mse_before"] and "undone" in fc
    assert torch.equal(pruned.fc.weight, result.model.fc.weight)
    assert torch.equal(pruned.fc.bias, result.model.fc.bias)
    # the check: the model's output on the check batch (every 4th, capped at 16 samples)
    x = fit[3][0][:16]
    with torch.no_grad():
        want, before, after = dense.eval()(x), result.model.eval()(x), pruned.eval()(x)
    assert report["output_mse_before"] == pytest.approx(float((before - want).square().mean()),
                                                        rel=1e-5)
    assert report["output_mse_after"] == pytest.approx(float((after - want).square().mean()),
                                                       rel=1e-5)
    assert report["check"] == {"how": "every 4th batch", "batches": 1, "samples": 16,
                               "fit_batches": 5}


# ----------------------------------------------------------------------- what never changes


@pytest.mark.parametrize("method", ["bn", "bias", "lsq", ["bias", "bn"], ["lsq", "bn"]])
def test_architecture_plan_and_dense_model_are_unchanged(setup, method):
    dense, result, _, _ = setup
    plan_params = copy.deepcopy(result.plan.params)
    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    pruned, report = _recovered(setup, method)
    shapes = {k: tuple(v.shape) for k, v in pruned.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in result.model.state_dict().items()}
    assert shapes == {k: tuple(v.shape)
                      for k, v in sp.apply_plan(dense, result.plan).state_dict().items()}
    assert [n for n, _ in pruned.named_parameters()] == \
        [n for n, _ in result.model.named_parameters()]
    assert all(p.requires_grad for p in pruned.parameters())
    assert result.plan.params == plan_params
    assert all(torch.equal(dense_state[k], v) for k, v in dense.state_dict().items())
    assert report["method"] == ([method] if isinstance(method, str) else method)
    assert set(report) == {"method", "layers", "steps", "output_mse_before",
                           "output_mse_after", "check", "memory"}
    assert report["output_mse_after"] < report["output_mse_before"]
    changed = [k for k, v in pruned.state_dict().items()
               if not torch.equal(v, result.model.state_dict()[k])]
    assert changed


def test_none_changes_nothing(setup):
    dense, result, fit, _ = setup
    pruned = copy.deepcopy(result.model)
    batches = [((x,), y) for x, y in fit]  # inputs as a tuple of forward arguments
    report = recover(pruned, dense, result.plan, result.analysis, batches, "none")
    for (k, v), (k2, v2) in zip(pruned.state_dict().items(),
                                result.model.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2)
    assert report["layers"] == []
    assert report["output_mse_before"] == report["output_mse_after"] > 0


def test_refuses_unknown_methods_and_no_batches(setup):
    dense, result, fit, _ = setup
    with pytest.raises(StructPruneError, match="unknown recovery method"):
        recover(copy.deepcopy(result.model), dense, result.plan, result.analysis, fit,
                ["bias", "finetune"])
    with pytest.raises(StructPruneError, match="batch"):
        recover(copy.deepcopy(result.model), dense, result.plan, result.analysis, [], "bn")


def test_lsq_takes_as_many_samples_as_a_bounded_dense_forward():
    """MACs per sample from the capture, scaled by the calibration inputs' size: a 3->8 3x3
    conv at 16x16 costs 8*3*9*256 multiply-adds a sample, 4x that at 32x32."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    analysis = sp.analyse(sp.capture(model, (torch.randn(2, 3, 16, 16),)))
    per_sample = 8 * 3 * 9 * 256 + 4 * 8 * 256
    small, large = Inputs((torch.randn(5, 3, 16, 16),)), Inputs((torch.randn(5, 3, 32, 32),))
    assert lsq_sample_count(analysis, [small]) == int(LSQ_FORWARD_MACS // per_sample)
    assert lsq_sample_count(analysis, [large]) == int(LSQ_FORWARD_MACS // (4 * per_sample))
    wide = nn.Sequential(nn.Conv2d(3, 2048, 7, padding=3), nn.Conv2d(2048, 2048, 7, padding=3))
    huge = sp.analyse(sp.capture(wide, (torch.randn(1, 3, 64, 64),)))
    assert lsq_sample_count(huge, [Inputs((torch.randn(1, 3, 64, 64),))]) == LSQ_MIN_SAMPLES
