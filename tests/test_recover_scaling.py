"""lsq that scales: normal equations accumulated in chunks equal the direct ones, grouped and
depthwise convs refitted per group, Conv1d/Conv3d/'same' padding/Linear over positions equal
direct least-squares solves, a memory plan that solves or skips the 22M-parameter case
within a small budget, and steps that would make the model worse undone."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.accuracy import recover as rec
from structprune.accuracy.recover import recover
from structprune.config import RunConfig, memory_size
from structprune.errors import PlanError

from .oracles import randomize

ALL = 10 ** 9  # rows / samples: every one


def _lstsq(a: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Plain least squares [a, 1] w = y in float64 (numpy): (cols + 1, outs)."""
    a = np.concatenate([a.double().numpy(), np.ones((a.shape[0], 1))], 1)
    return torch.from_numpy(np.linalg.lstsq(a, y.double().numpy(), rcond=None)[0])


def _capture(model: nn.Module, name: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A module's input and output on ``x``."""
    seen = {}
    handle = model.get_submodule(name).register_forward_hook(
        lambda m, args, y: seen.update(x=args[0], y=y))
    with torch.no_grad():
        model.eval()(x)
    handle.remove()
    return seen["x"], seen["y"]


def _keep_out(plan: sp.Plan, name: str) -> torch.Tensor:
    return torch.tensor(next(e["keep"] for e in plan.params
                             if e["name"] == f"{name}.weight" and e["dim"] == 0))


def _entry(report: dict, name: str) -> dict:
    return next(e for e in report["layers"] if e["module"] == name and e["method"] == "lsq")


# ------------------------------------------------------------------ chunked normal equations


@pytest.mark.parametrize("kind", ["linear", "conv2d", "grouped"])
def test_chunked_normal_equations_equal_the_direct_ones(kind):
    torch.manual_seed(0)
    if kind == "linear":
        module, x = nn.Linear(12, 5), torch.randn(4, 7, 12)
        out = module(x)
        direct = x.reshape(-1, 12, 1)
    else:
        groups = 1 if kind == "conv2d" else 3
        module = nn.Conv2d(6, 9, 3, stride=2, padding=1, dilation=1, groups=groups)
        x = torch.randn(3, 6, 9, 9)
        out = module(x)
        # (rows, channels, taps), the weight's order
        direct = F.unfold(x, 3, padding=1, stride=2).transpose(1, 2).reshape(-1, 6, 9)
    total = out.numel() // out.shape[1 if kind != "linear" else -1]
    idx = torch.randperm(total)[:40].sort().values
    y = torch.randn(len(idx), module.weight.shape[0])
    taken = rec._Taken(0, 0, out.shape, idx, y)
    layout = rec._Layout(module)
    chunked = rec._Rows(layout, [rec._Part(x, out.shape, taken, None)], "fit", chunk=7)
    gram, xty, yy = rec._normal_equations(layout, chunked)
    # direct: every group's design matrix [rows of its inputs, 1] in float64 at once, its
    # columns tap by tap (each tap's channels of the group), as recover lays them out
    rows = direct[idx].double()
    g, outs = layout.groups, layout.outs
    per = rows.shape[1] // g
    for k in range(g):
        a = rows[:, k * per:(k + 1) * per].transpose(1, 2).reshape(len(idx), -1)
        a = torch.cat([a, torch.ones(len(idx), 1, dtype=a.dtype)], 1)
        target = y[:, k * outs:(k + 1) * outs].double()
        torch.testing.assert_close(gram[k], a.T @ a, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(xty[k], a.T @ target, rtol=1e-5, atol=1e-4)
    assert yy == pytest.approx(float(y.double().square().sum()), rel=1e-6)


@pytest.mark.parametrize("solver, rows", [("cg", 144), ("kernel", 20)])
def test_cg_and_the_dual_form_reach_the_normal_equations_solution(solver, rows):
    torch.manual_seed(0)
    module = nn.Conv2d(8, 6, 3, padding=1, groups=2)  # 37 columns per group
    x = torch.randn(4, 8, 6, 6)
    out = module(x)
    idx = torch.randperm(out.numel() // 6)[:rows].sort().values
    y = torch.randn(len(idx), 6)
    layout = rec._Layout(module)
    part = rec._Part(x, out.shape, rec._Taken(0, 0, out.shape, idx, y), None)
    w0 = layout.current()
    direct, before, after, _ = rec._solve_gram(layout, rec._Rows(layout, [part], "fit", 50),
                                               w0, 1e-3)
    solve = rec._solve_cg if solver == "cg" else rec._solve_kernel
    solved, other_before, other_after, info = solve(
        layout, rec._Rows(layout, [part], "fit", 50, keep=True), w0, 1e-3)
    torch.testing.assert_close(solved, direct, rtol=1e-3, atol=1e-4)
    if solver == "cg":
        assert info["relative_residual"] < 1e-4 and info["iterations"] <= rec.CG_ITERATIONS
    assert other_before == pytest.approx(before, rel=1e-5)
    # the normal equations give the errors as quadratic forms, exact to ~1e-6 of ||Y||^2
    assert other_after == pytest.approx(after, rel=1e-3, abs=1e-5 * before)
    assert after < before


# ------------------------------------------------------------------ layers the refit handles


class GroupedNet(nn.Module):
    """a (loses outputs) -> b (a consumer) -> a grouped conv (loses groups) -> a depthwise
    conv (loses channels) -> c (a consumer)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 1)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.depthwise = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.c = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.a(x))))
        x = torch.relu(self.depthwise(torch.relu(self.grouped(x))))
        return self.c(x)


def test_grouped_and_depthwise_convs_are_refitted_per_group():
    torch.manual_seed(0)
    dense = randomize(GroupedNet(), seed=3).eval()
    fit_x, check_x = torch.randn(16, 3, 8, 8), torch.randn(16, 3, 8, 8)
    result = sp.prune(dense, (fit_x[:1],), 0.5)
    pruned = copy.deepcopy(result.model)
    assert pruned.grouped.groups == 2 and pruned.depthwise.groups == 8
    report = recover(pruned, dense, result.plan, result.analysis, [fit_x, check_x], "lsq",
                     ridge=0.0, max_rows=ALL, lsq_samples=ALL)
    for name, groups in [("grouped", 2), ("depthwise", 8)]:
        entry = _entry(report, name)
        assert entry["groups"] == groups and entry["plan"]["method"] == "gram"
        assert "undone" not in entry and entry["check_mse_after"] < entry["check_mse_before"]
        # reference: its input in the recovered model (the layers before it refitted, as
        # when it was fitted) regressed on the dense output, group by group
        x, _ = _capture(pruned, name, fit_x)
        _, want = _capture(dense, name, fit_x)
        want = want[:, _keep_out(result.plan, name)]
        module = pruned.get_submodule(name)
        per_in, per_out = x.shape[1] // groups, want.shape[1] // groups
        for k in range(groups):
            patches = F.unfold(x[:, k * per_in:(k + 1) * per_in], 3, padding=1)
            a = patches.transpose(1, 2).reshape(-1, per_in * 9)
            y = want[:, k * per_out:(k + 1) * per_out].permute(0, 2, 3, 1).reshape(-1, per_out)
            solution = _lstsq(a, y).float()
            got = module.weight[k * per_out:(k + 1) * per_out].reshape(per_out, -1)
            torch.testing.assert_close(got, solution[:-1].T, rtol=1e-3, atol=1e-4)
            torch.testing.assert_close(module.bias[k * per_out:(k + 1) * per_out],
                                       solution[-1], rtol=1e-3, atol=1e-4)


class Net1d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(2, 12, 3, padding=1)
        self.b = nn.Conv1d(12, 5, 5, stride=2, dilation=2, padding=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class Net3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv3d(2, 8, 3, padding=1)
        self.b = nn.Conv3d(8, 4, (2, 3, 3), stride=(1, 2, 1), padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class NetSame(nn.Module):
    """An even kernel with padding='same': torch pads one more after than before."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 4, padding="same")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class NetTokens(nn.Module):
    """A Linear over (batch, tokens, features): every token a row."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 16)
        self.b = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def _patches_1d(x: torch.Tensor) -> torch.Tensor:
    """Net1d.b's receptive fields by Tensor.unfold: (rows, channels x taps)."""
    windows = F.pad(x, (3, 3)).unfold(2, 9, 2)[..., ::2]  # kernel 5, dilation 2
    return windows.permute(0, 2, 1, 3).reshape(-1, x.shape[1] * 5)


def _patches_3d(x: torch.Tensor) -> torch.Tensor:
    """Net3d.b's receptive fields by Tensor.unfold: (rows, channels x taps)."""
    windows = F.pad(x, (1, 1, 1, 1, 1, 1)).unfold(2, 2, 1).unfold(3, 3, 2).unfold(4, 3, 1)
    n, c, d, h, w = windows.shape[:5]
    return windows.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(n * d * h * w, c * 18)


def _patches_same(x: torch.Tensor) -> torch.Tensor:
    padded = F.pad(x, (1, 2, 1, 2))  # total 3: 1 before, 2 after
    return F.unfold(padded, 4).transpose(1, 2).reshape(-1, x.shape[1] * 16)


@pytest.mark.parametrize("net, shape, patches", [
    (Net1d, (24, 2, 20), _patches_1d),
    (Net3d, (8, 2, 5, 6, 5), _patches_3d),
    (NetSame, (12, 2, 7, 7), _patches_same),
    (NetTokens, (10, 9, 6), lambda x: x.reshape(-1, x.shape[-1])),
], ids=["conv1d", "conv3d", "same-padding", "linear-tokens"])
def test_conv1d_conv3d_same_padding_and_token_linear_equal_a_direct_solve(net, shape, patches):
    torch.manual_seed(0)
    dense = randomize(net(), seed=2).eval()
    fit_x, check_x = torch.randn(*shape), torch.randn(*shape)
    result = sp.prune(dense, (fit_x[:1],), 0.5)
    pruned = copy.deepcopy(result.model)
    report = recover(pruned, dense, result.plan, result.analysis, [fit_x, check_x], "lsq",
                     ridge=0.0, max_rows=ALL, lsq_samples=ALL)
    entry = _entry(report, "b")
    assert "undone" not in entry and "skipped" not in entry
    # b is the first consumer: its pruned input is the dense input's kept channels
    x, y = _capture(dense, "b", fit_x)
    keep_in = torch.tensor(next(e["keep"] for e in result.plan.params
                                if e["name"] == "b.weight" and e["dim"] == 1))
    channel = -1 if isinstance(dense.b, nn.Linear) else 1
    a = patches(x.index_select(channel, keep_in))
    target = y.reshape(-1, y.shape[-1]) if channel == -1 else \
        y.movedim(1, -1).reshape(-1, y.shape[1])
    assert entry["rows"] == a.shape[0]
    solution = _lstsq(a, target).float()
    torch.testing.assert_close(pruned.b.weight.reshape(len(solution[0]), -1), solution[:-1].T,
                               rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(pruned.b.bias, solution[-1], rtol=1e-3, atol=1e-4)


def test_one_forward_and_layer_by_layer_give_the_same_refit(monkeypatch):
    """Batches that cannot be joined run the pruned model as far as each layer instead."""
    torch.manual_seed(0)
    dense = randomize(GroupedNet(), seed=3).eval()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    result = sp.prune(dense, (batches[0][:1],), 0.5)
    one = copy.deepcopy(result.model)
    report_one = recover(one, dense, result.plan, result.analysis, batches, "lsq",
                         max_rows=ALL, lsq_samples=ALL)
    joined = rec._join
    monkeypatch.setattr(rec, "_join", lambda parts: joined(parts) if len(parts) == 1 else None)
    each = copy.deepcopy(result.model)
    report_each = recover(each, dense, result.plan, result.analysis, batches, "lsq",
                          max_rows=ALL, lsq_samples=ALL)
    assert report_one["memory"]["mode"] == "one forward"
    assert report_each["memory"]["mode"] == "a forward as far as each layer"
    # the same rows, up to float32 rounding of the two forwards
    for a, b in zip(report_one["layers"], report_each["layers"], strict=True):
        assert a["module"] == b["module"] and a["rows"] == b["rows"] == 3 * 4 * 64
        assert a.get("undone") == b.get("undone")
        for key in ("mse_before", "mse_after", "check_mse_before", "check_mse_after"):
            assert a[key] == pytest.approx(b[key], rel=1e-3), (a["module"], key)
    with torch.no_grad():
        torch.testing.assert_close(one(batches[3]), each(batches[3]), rtol=1e-3, atol=1e-4)


class Shared(nn.Module):
    """b is called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.c = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b(torch.relu(self.b(torch.relu(self.a(x))))))
        return self.c(x)


def test_a_layer_called_twice_is_fitted_on_both_calls_layer_by_layer():
    torch.manual_seed(0)
    dense = randomize(Shared(), seed=1).eval()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    result = sp.prune(dense, (batches[0][:1],), 0.5)
    report = recover(copy.deepcopy(result.model), dense, result.plan, result.analysis,
                     batches, "lsq", max_rows=ALL)
    assert report["memory"]["mode"] == "a forward as far as each layer"
    b = _entry(report, "b")  # every position of both calls on the 3 fit batches
    assert b["rows"] == 2 * 3 * 4 * 64 and b["check_rows"] == 2 * 4 * 64
    assert b["check_mse_after"] < b["check_mse_before"] and "undone" not in b
    assert report["output_mse_after"] < report["output_mse_before"]


def test_a_single_batch_checks_on_held_out_samples_or_rows():
    torch.manual_seed(0)
    dense = randomize(GroupedNet(), seed=3).eval()
    x = torch.randn(8, 3, 8, 8)
    result = sp.prune(dense, (x[:1],), 0.5)
    report = recover(copy.deepcopy(result.model), dense, result.plan, result.analysis, [x],
                     "lsq")
    assert report["check"]["samples"] == 2 and "last 2 samples" in report["check"]["how"]
    # one sample: lsq checks each layer on rows it did not fit
    report = recover(copy.deepcopy(result.model), dense, result.plan, result.analysis,
                     [x[:1]], "lsq", max_rows=32)
    assert report["check"]["samples"] == 1 and "itself" in report["check"]["how"]
    fitted = [e for e in report["layers"] if not e.get("skipped")]
    assert fitted and all(e["check_rows"] > 0 and e["rows"] <= 32 for e in fitted)


# -------------------------------------------------------------------------- never worse


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


def test_a_method_that_makes_the_check_worse_is_undone_and_the_model_unchanged():
    torch.manual_seed(0)
    dense = randomize(BNNet(), seed=4)
    with torch.no_grad():  # statistics of unit-scale inputs, as the model's training data
        for m in dense.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.reset_running_stats()
                m.momentum = None
        dense.train()(torch.randn(256, 3, 8, 8))
    dense.eval()
    result = sp.prune(dense, (torch.randn(1, 3, 8, 8),), 0.25)
    # fit batches far from what the model sees, the check batch like it: re-estimating the
    # statistics on the fit batches moves the outputs away from the dense model's
    batches = [10 * torch.randn(16, 3, 8, 8) + 3 for _ in range(3)] + [torch.randn(16, 3, 8, 8)]
    pruned = copy.deepcopy(result.model)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    report = recover(pruned, dense, result.plan, result.analysis, batches, ["bn"])
    step = report["steps"][0]
    assert step["method"] == "bn" and "undone" in step
    assert step["check_mse_after"] > step["check_mse_before"]
    assert report["output_mse_after"] == report["output_mse_before"] == \
        step["check_mse_before"]
    for k, v in pruned.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all("undone" in e for e in report["layers"])
    # on batches like the check one it is kept
    same = [torch.randn(16, 3, 8, 8) for _ in range(4)]
    report = recover(copy.deepcopy(result.model), dense, result.plan, result.analysis, same,
                     ["bn"])
    assert "undone" not in report["steps"][0]


# ------------------------------------------------------------------- the memory planner


class Wide22M(nn.Module):
    """The issue's 22M-parameter case: 1024 channels into an 8x8 (64-tap) conv, a 16x16
    (256-tap) conv, a 2048-channel map pooled into a 2048-feature classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 1024, 3, padding=1)
        self.c2 = nn.Conv2d(1024, 256, 8, padding="same")
        self.c3 = nn.Conv2d(256, 64, 16, padding="same")
        self.c4 = nn.Conv2d(64, 2048, 1)
        self.fc = nn.Linear(2048, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.c2(torch.relu(self.c1(x))))
        x = torch.relu(self.c4(torch.relu(self.c3(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def wide():
    torch.manual_seed(0)
    dense = Wide22M().eval()
    assert 22e6 < sum(p.numel() for p in dense.parameters()) < 24e6
    batches = [torch.randn(2, 3, 8, 8) for _ in range(4)]
    return dense, sp.prune(dense, (batches[0][:1],), 0.5), batches


def test_the_22m_case_is_solved_within_a_budget_by_methods_that_fit(wide):
    dense, result, batches = wide
    pruned = copy.deepcopy(result.model)
    report = recover(pruned, dense, result.plan, result.analysis, batches, "lsq",
                     max_rows=128, lsq_samples=4, memory_budget="1G")
    assert report["memory"]["budget_bytes"] == 1 << 30
    for name in ("c2", "c3"):  # 512 x 64 and 128 x 256 columns: 12 GB normal equations
        plan = _entry(report, name)["plan"]
        assert plan["gram_bytes"] > 12e9 > plan["bytes_allowed"]
        # fewer rows than columns: the dual form, from the rows held at once
        assert plan["method"] == "kernel" and plan["bytes_needed"] <= plan["bytes_allowed"]
    for entry in report["layers"]:
        assert entry["plan"]["bytes_needed"] <= entry["plan"]["bytes_allowed"] < 1 << 30
    assert report["output_mse_after"] <= report["output_mse_before"]


def test_the_22m_case_uses_conjugate_gradients_or_skips_in_a_small_budget(wide):
    dense, result, batches = wide
    pruned = copy.deepcopy(result.model)
    before = {k: v.clone() for k, v in pruned.state_dict().items()}
    report = recover(pruned, dense, result.plan, result.analysis, batches, "lsq",
                     max_rows=256, lsq_samples=4, memory_budget="128M")
    c2, c3 = _entry(report, "c2"), _entry(report, "c3")
    # c2 needs ~190 MB whichever way: skipped, its weights untouched
    assert c2["plan"]["method"] == "skip" and "budget leaves" in c2["skipped"]
    assert c2["plan"]["bytes_needed"] > c2["plan"]["bytes_allowed"]
    assert c2["mse_after"] is None and torch.equal(pruned.c2.weight, before["c2.weight"])
    # c3's 32 outputs: the dual form's 256 rows of 32769 columns do not fit, the few
    # weight-sized matrices of conjugate gradients do
    plan = c3["plan"]
    assert plan["method"] == "cg", plan
    assert plan["bytes_needed"] <= plan["bytes_allowed"] < min(plan["kernel_bytes"],
                                                                plan["gram_bytes"])
    assert 1 <= plan["iterations"] <= rec.CG_ITERATIONS
    assert c3["mse_after"] < c3["mse_before"]


# ---------------------------------------------------------------------- settings and CLI


def test_memory_budget_setting_and_flag():
    assert memory_size("8G") == 8 << 30 and memory_size(1000) == 1000
    assert memory_size("1.5GiB") == 3 << 29 and memory_size(None) is None
    assert RunConfig(memory_budget="512M").memory_budget == 512 << 20
    with pytest.raises(PlanError, match="not a size"):
        RunConfig(memory_budget="lots")
    from structprune.front.cli import build_parser
    from structprune.front.cli.prune import configs
    args = build_parser().parse_args(["prune", "torchvision:resnet18", "--ratio", "0.5",
                                      "--out", "x", "--memory-budget", "2G"])
    assert configs(args)[1].memory_budget == 2 << 30
    assert rec.available_memory() > 0


def test_progress_bars_per_layer_and_per_batch(capsys):
    torch.manual_seed(0)
    dense = randomize(BNNet(), seed=4).eval()
    batches = [torch.randn(4, 3, 8, 8) for _ in range(4)]
    result = sp.prune(dense, (batches[0][:1],), 0.5)
    recover(copy.deepcopy(result.model), dense, result.plan, result.analysis, batches,
            ["lsq", "bn"], progress=True)
    shown = capsys.readouterr().err
    assert "lsq" in shown and "layer" in shown and "bn" in shown and "batch" in shown
    recover(copy.deepcopy(result.model), dense, result.plan, result.analysis, batches,
            ["lsq", "bn"])
    assert capsys.readouterr().err == ""
