"""The reconstruction criterion ``obs`` (structprune.core.obs) against independent references:
convolutions for the unfolded patches, a brute-force search over every removal set for the
greedy, ``torch.linalg.lstsq`` for the compensating update and for the scores of whole
models, and the masked-model oracle for plans made with it."""

import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

import structprune as sp
from structprune.core.analyse import analyse
from structprune.core.capture import capture
from structprune.core.obs import (
    OBS,
    Reconstruction,
    compensated,
    greedy_order,
    patches,
    removal_error,
)
from structprune.core.score import score
from tests.fixtures import small_vgg
from tests.oracles import check_pruned, randomize

# ------------------------------------------------------------------------------------ patches


@pytest.mark.parametrize("conv, shape", [
    (nn.Conv1d(3, 4, 3, padding=2, padding_mode="reflect"), (2, 3, 9)),
    (nn.Conv2d(3, 4, 3, padding=1, stride=2), (2, 3, 7, 6)),
    (nn.Conv2d(3, 4, (3, 2), padding="same", dilation=2), (2, 3, 7, 6)),
    (nn.Conv2d(3, 4, 3, padding="valid"), (3, 7, 6)),  # unbatched
    (nn.Conv3d(2, 4, (2, 3, 3), stride=(1, 2, 1), padding=(1, 0, 1), padding_mode="circular"),
     (2, 2, 5, 6, 7)),
])
def test_patches_times_the_weight_are_the_conv_output(conv, shape):
    torch.manual_seed(0)
    x = torch.randn(*shape, dtype=torch.float64)
    conv = conv.double()
    want = conv(x) - conv.bias.reshape(-1, *[1] * (conv.weight.ndim - 2))
    if x.ndim == conv.weight.ndim - 1:
        want = want.unsqueeze(0)
    want = want.movedim(1, -1).reshape(-1, 4)
    p = patches(conv, x)
    torch.testing.assert_close(p @ conv.weight.reshape(4, -1).T, want)
    rows = torch.tensor([0, 3, len(want) - 1])
    torch.testing.assert_close(patches(conv, x, rows), p[rows])


def test_patches_of_a_linear_layer_are_its_input_rows():
    x = torch.randn(2, 5, 6)
    torch.testing.assert_close(patches(nn.Linear(6, 3), x), x.reshape(10, 6))


# ----------------------------------------------------------------- the greedy and the update


def correlated(seed, rows=40, n=6, out=4):
    gen = torch.Generator().manual_seed(seed)
    mix = torch.randn(n, n, generator=gen, dtype=torch.float64)
    x = torch.randn(rows, n, generator=gen, dtype=torch.float64) @ mix
    return x, torch.randn(out, n, generator=gen, dtype=torch.float64)


def brute_force(hessian, weight, k, columns):
    """The least error over every set of k units (``columns[u]``: unit u's columns)."""
    return min(removal_error(hessian, weight, np.concatenate([columns[u] for u in s]))
               for s in itertools.combinations(range(len(columns)), k))


def run_greedy(hessian, weight, columns, max_steps=None):
    state = Reconstruction(torch.linalg.inv(hessian), weight, columns)
    return greedy_order([(state, 1.0)], len(columns), max_steps)


@pytest.mark.parametrize("seed", range(6))
def test_greedy_errors_against_a_brute_force_search_on_a_linear_layer(seed):
    """Linear layer of 6 inputs: after k removals the greedy's cumulative error is exactly
    the error (1) of the set it removed, at least the optimum over all 6-choose-k sets, and
    within a factor 2 of it (on these seeds; greedy can do worse on other data)."""
    x, w = correlated(seed)
    h = x.T @ x
    columns = [np.array([i]) for i in range(6)]
    order, cumulative = run_greedy(h, w, columns)
    assert sorted(order) == list(range(6))
    for k in range(1, 6):
        mine = removal_error(h, w, order[:k])
        assert cumulative[order[k - 1]] == pytest.approx(mine, rel=1e-9)
        best = brute_force(h, w, k, columns)
        assert best <= mine * (1 + 1e-12) and mine <= 2 * best
    assert cumulative[order[-1]] == pytest.approx(float(((x @ w.T) ** 2).sum()), rel=1e-9)


def test_greedy_is_optimal_when_the_inputs_are_uncorrelated():
    """Orthogonal input columns: errors add up, so the greedy's set is the optimum."""
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(30, 6, generator=gen, dtype=torch.float64))
    x = q * torch.tensor([1.0, 3.0, 0.5, 2.0, 1.5, 0.2], dtype=torch.float64)
    w = torch.randn(4, 6, generator=gen, dtype=torch.float64)
    h, columns = x.T @ x, [np.array([i]) for i in range(6)]
    order, cumulative = run_greedy(h, w, columns)
    for k in range(1, 6):
        assert cumulative[order[k - 1]] == pytest.approx(brute_force(h, w, k, columns),
                                                         rel=1e-9)


def conv_case(seed=0):
    """A conv of 5 input channels x 3x3 taps on correlated channels: its unfolded inputs
    (damped Hessian with the ridge obs uses) and weight."""
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(5, 4, 3, padding=1, bias=False).double()
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
    base = torch.randn(6, 3, 6, 6, generator=gen, dtype=torch.float64)
    mix = torch.randn(5, 3, generator=gen, dtype=torch.float64)
    x = torch.einsum("nchw,kc->nkhw", base, mix) \
        + 0.3 * torch.randn(6, 5, 6, 6, generator=gen, dtype=torch.float64)
    rows = patches(conv, x)
    return rows, conv.weight.reshape(4, -1), [np.arange(9 * c, 9 * c + 9) for c in range(5)]


@pytest.mark.parametrize("ridge", [0.0, 0.01])
def test_greedy_and_update_on_a_conv_with_5_channels_of_9_taps(ridge):
    """Removing channels (blocks of 9 columns): the greedy's errors equal formula (1) on its
    sets and are at least the brute-force optimum; the compensating update equals the
    least-squares solve of ``Y = X W^T`` on the kept columns (with a ridge: the rows
    ``sqrt(l) I`` and targets ``sqrt(l) W^T`` appended: the problem (1) solves with the
    damped H), and the error (1) equals that solve's residual."""
    x, w, columns = conv_case()
    gram = x.T @ x
    lam = ridge * float(gram.diagonal().mean())
    h = gram + lam * torch.eye(45, dtype=torch.float64)
    order, cumulative = run_greedy(h, w, columns)
    for k in range(1, 5):
        removed = np.concatenate([columns[u] for u in order[:k]])
        mine = removal_error(h, w, removed)
        assert cumulative[order[k - 1]] == pytest.approx(mine, rel=1e-9)
        assert brute_force(h, w, k, columns) <= mine * (1 + 1e-12)

        kept = np.setdiff1d(np.arange(45), removed)
        design = torch.cat([x[:, kept], lam ** 0.5 * torch.eye(45, dtype=torch.float64)[:, kept]])
        target = torch.cat([x @ w.T, lam ** 0.5 * w.T])
        solved = torch.linalg.lstsq(design, target, driver="gelsd").solution.T
        new = compensated(h, w, removed)
        torch.testing.assert_close(new[:, kept], solved, rtol=1e-7, atol=1e-9)
        assert new[:, removed].abs().max() < 1e-9 * w.abs().max()
        residual = float(((design @ solved.T - target) ** 2).sum())  # lam ||W_S||^2 too
        assert mine == pytest.approx(residual, rel=1e-7)


def test_several_units_a_step_keep_exact_errors_after_each_step():
    """With max_steps, each step removes the units adding least error alone; after each
    step the cumulative error is exactly (1) for everything removed, and scores rise."""
    x, w, columns = conv_case(seed=2)
    h = x.T @ x + 1e-3 * torch.eye(45, dtype=torch.float64)
    order, cumulative = run_greedy(h, w, columns, max_steps=2)  # 3 units, then 2
    assert np.all(np.diff(cumulative[order]) >= 0)
    for k in (3, 5):
        removed = np.concatenate([columns[u] for u in order[:k]])
        assert cumulative[order[k - 1]] == pytest.approx(removal_error(h, w, removed),
                                                         rel=1e-9)


# --------------------------------------------------------------------------- the criterion


class Producer(nn.Module):
    """Six channels made by ``make``, read by one consumer with a bias (``read``)."""

    def __init__(self, make: nn.Module, read: nn.Module):
        super().__init__()
        self.make, self.read = make, read

    def forward(self, x):
        return self.read(torch.tanh(self.make(x)))


def lstsq_greedy(x, y, w, lam, columns, bias):
    """An independent greedy: at each step, the unit whose removal (with those removed
    before) leaves the least ridge least-squares error of ``y`` on the kept columns (and a
    ones column with a bias), by torch.linalg.lstsq; returns each unit's cumulative
    error."""
    n = x.shape[1]
    removed, scores = [], {}

    def error(units):
        drop = np.concatenate([columns[u] for u in units])
        kept = np.setdiff1d(np.arange(n), drop)
        design = torch.cat([x[:, kept], lam ** 0.5 * torch.eye(n, dtype=x.dtype)[:, kept]])
        target = torch.cat([y, lam ** 0.5 * w.T])
        if bias:
            ones = torch.cat([torch.ones(len(x), 1), torch.zeros(n, 1)]).to(x.dtype)
            design = torch.cat([design, ones], 1)
        solution = torch.linalg.lstsq(design, target, driver="gelsd").solution
        return float(((design @ solution - target) ** 2).sum())

    while len(removed) < len(columns):
        left = [u for u in range(len(columns)) if u not in removed]
        errors = [error(removed + [u]) for u in left]
        best = left[int(np.argmin(errors))]
        removed.append(best)
        scores[best] = min(errors)
    return np.array([scores[u] for u in range(len(columns))])


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_scores_equal_an_independent_least_squares_greedy(kind):
    """End to end, with a bias refitted: the criterion's raw scores are the cumulative
    errors of a greedy run by lstsq on the consumer's inputs, over its output energy."""
    torch.manual_seed(0)
    if kind == "linear":
        model = Producer(nn.Linear(4, 6), nn.Linear(6, 3))
        data = [torch.randn(16, 4) for _ in range(2)]
    else:
        model = Producer(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1))
        data = [torch.randn(3, 3, 5, 5) for _ in range(2)]
    model = model.double().eval()
    data = [d.double() for d in data]
    analysis = analyse(capture(model, (data[0],)))
    group = next(g for g in analysis.groups if ("make.weight", 0) in g.members)
    criterion = OBS(analysis, data, max_rows=10_000)
    got = score(analysis, criterion, [group], normalize="none")[group.index]

    inputs = []
    hook = model.read.register_forward_pre_hook(lambda m, a: inputs.append(a[0].detach()))
    with torch.no_grad():
        for d in data:
            model(d)
    hook.remove()
    x = torch.cat([patches(model.read, i) for i in inputs])
    w = model.read.weight.detach().reshape(model.read.weight.shape[0], -1)
    taps = w.shape[1] // 6
    columns = [np.arange(taps * c, taps * c + taps) for c in range(6)]
    gram = x.T @ x
    lam = 0.01 * float(gram.diagonal().mean())
    energy = float(((x @ w.T) ** 2).sum())
    want = lstsq_greedy(x, x @ w.T, w, lam, columns, bias=True) / energy
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert criterion.notes["consumers"] == 1 and not criterion.fallbacks


def test_a_small_memory_budget_uses_channel_blocks_then_skips_and_falls_back():
    torch.manual_seed(0)
    model = Producer(nn.Conv2d(3, 6, 3, padding=1), nn.Conv2d(6, 4, 3, padding=1,
                                                               bias=False)).double().eval()
    data = [torch.randn(3, 3, 5, 5, dtype=torch.float64)]
    analysis = analyse(capture(model, (data[0],)))
    group = next(g for g in analysis.groups if ("make.weight", 0) in g.members)

    blocks = OBS(analysis, data, memory_budget=6 * 4 * 81)  # six 9x9 float32 blocks
    got = score(analysis, blocks, [group], normalize="none")[group.index]
    assert list(blocks.notes["block_diagonal"]) == ["read"]
    x = patches(model.read, torch.tanh(model.make(data[0])))
    w = model.read.weight.detach().reshape(4, -1)
    own = np.array([float(((x[:, 9 * c:9 * c + 9] @ w[:, 9 * c:9 * c + 9].T) ** 2).sum())
                    for c in range(6)])  # no compensation: each channel's output energy
    total = np.cumsum(np.sort(own))
    want = np.empty(6)
    want[np.argsort(own, kind="stable")] = total / own.sum()
    np.testing.assert_allclose(got, want, rtol=1e-5)

    none = OBS(analysis, data, memory_budget=0)
    got = score(analysis, none, [group], normalize="none")[group.index]
    assert list(none.notes["skipped"]) == ["read"] and none.fallbacks == [group.index]
    assert group.index in none.notes["fallback_reasons"]
    np.testing.assert_allclose(got, score(analysis, "l2", [group], normalize="none")
                               [group.index])


class Chain(nn.Module):
    """Two groups in a row: ``a``'s six outputs (read by ``b``), ``b``'s five (read by
    ``c``)."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def ridge_fit(x, y, w, lam, kept):
    """``min ||[x_kept 1] B^T - y||^2 + lam ||B_kept - w_kept||^2 + lam ||w_removed||^2`` by
    lstsq: the refitted weights (removed columns zero), bias and the error."""
    n = x.shape[1]
    design = torch.cat([x[:, kept], lam ** 0.5 * torch.eye(n, dtype=x.dtype)[:, kept]])
    ones = torch.cat([torch.ones(len(x), 1), torch.zeros(n, 1)]).to(x.dtype)
    design = torch.cat([design, ones], 1)
    target = torch.cat([y, lam ** 0.5 * w.T])
    solution = torch.linalg.lstsq(design, target, driver="gelsd").solution
    weight = torch.zeros_like(w)
    weight[:, kept] = solution[:-1].T
    return weight, solution[-1], float(((design @ solution - target) ** 2).sum())


def chain_groups():
    """The seeded double ``Chain``, two batches, its analysis and the groups of ``a`` and
    ``b``'s outputs."""
    torch.manual_seed(0)
    model = Chain().double().eval()
    data = [torch.randn(16, 4, dtype=torch.float64) for _ in range(2)]
    analysis = analyse(capture(model, (data[0],)))
    first, second = (next(g for g in analysis.groups if (f"{m}.weight", 0) in g.members)
                     for m in "ab")
    return model, data, analysis, first, second


def test_sequential_scores_follow_the_pruned_inputs_and_the_dense_outputs():
    """``rescore``: the first group scores as on the dense model; the second group's scores
    are the cumulative errors of an independent lstsq greedy on the inputs the model gives
    once the first group lost its two lowest units and ``b`` was refitted to the dense
    output (ridge toward the dense weights), with the dense model's output as the target,
    above the error of the full refit, over the output energy."""
    model, data, analysis, first, second = chain_groups()
    criterion = OBS(analysis, data, max_rows=10_000, max_steps=None)
    dense = score(analysis, criterion, [first, second], normalize="none")
    got = criterion.rescore({first.index: 2, second.index: 2})
    np.testing.assert_allclose(got[first.index], dense[first.index], rtol=1e-5)

    with torch.no_grad():
        x = torch.cat(data)
        xa = torch.tanh(model.a(x))  # b's input, the same pruned or not
        gone = np.argsort(got[first.index], kind="stable")[:2]
        kept = np.setdiff1d(np.arange(6), gone)
        lam = 0.01 * float((xa.T @ xa).diagonal().mean())
        wb, bb, _ = ridge_fit(xa, model.b(xa), model.b.weight, lam, kept)
        xp = torch.tanh(xa @ wb.T + bb)  # c's input in the pruned model
        y = model.c(torch.tanh(model.b(xa)))  # the dense output
        lam = 0.01 * float((xp.T @ xp).diagonal().mean())
        w = model.c.weight
        base = ridge_fit(xp, y, w, lam, np.arange(5))[2]
        energy = float(((xp @ w.T) ** 2).sum())
    columns = [np.array([u]) for u in range(5)]
    want = (lstsq_greedy(xp, y, w, lam, columns, bias=True) - base) / energy
    np.testing.assert_allclose(got[second.index], want, rtol=1e-5, atol=1e-12)
    # the dense scores of the second group differ: its inputs changed
    assert not np.allclose(dense[second.index], got[second.index], rtol=1e-3)


@pytest.mark.parametrize("max_rows, budget, dense_calls", [
    (10_000, 2 << 30, {"b": 0, "c": 0}),  # every row, both consumers' kept
    (8, 2 << 30, {"b": 0, "c": 0}),  # 4 seeded draws of 16 rows a batch
    (10_000, 300_000, {"b": 2, "c": 2}),  # a budget for b's rows alone: c's drawn anew
])
def test_sequential_reads_the_dense_rows_the_first_pass_kept(max_rows, budget, dense_calls):
    """With ``expect_rescore`` the dense pass keeps each consumer's rows: ``rescore`` gives the
    same scores as when it runs the dense model again, the dense model's consumers whose rows
    were kept are not called during it (the dense model runs as far as ``c`` on both batches
    when ``c``'s rows did not fit), and the rows are let go afterwards."""
    model, data, analysis, first, second = chain_groups()
    removals = {first.index: 2, second.index: 2}
    settings = {"max_rows": max_rows, "max_steps": None, "memory_budget": budget}
    anew = OBS(analysis, data, **settings)
    score(analysis, anew, [first, second], normalize="none")
    want = anew.rescore(removals)

    kept = OBS(analysis, data, **settings)
    kept.expect_rescore()
    score(analysis, kept, [first, second], normalize="none")
    calls = {"b": 0, "c": 0}  # of the dense model's modules (rescore's copy has the hooks)
    dense = {n: getattr(model, n) for n in calls}
    handles = [dense[n].register_forward_pre_hook(
        lambda m, a, n=n: calls.__setitem__(n, calls[n] + (m is dense[n]))) for n in calls]
    try:
        got = kept.rescore(removals)
        assert calls == dense_calls
        # the kept rows are let go: a second rescore draws them from the dense model, alike
        calls.update(b=0, c=0)
        again = kept.rescore(removals)
        assert calls == {"b": 4, "c": 2}  # as far as b for the first group, c for the second
    finally:
        for handle in handles:
            handle.remove()
    for index in want:
        np.testing.assert_array_equal(got[index], want[index])
        np.testing.assert_array_equal(again[index], want[index])


class Repeated(nn.Module):
    """``c`` is called as often as ``reps`` says, which a pre-hook sets per batch."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 6), nn.Linear(6, 5), nn.Linear(5, 3)
        self.reps = 1

    def forward(self, x):
        y = torch.tanh(self.b(torch.tanh(self.a(x))))
        out = 0
        for _ in range(self.reps):
            out = out + self.c(y)
            y = y * 0.9
        return out


def test_sequential_draws_anew_the_rows_of_a_layer_called_unevenly_across_batches():
    """``c`` is called 2, 0 and 1 times in three batches: the sequential pass stops each batch
    at one call, so the rows the dense pass drew of it would fall out of step; they are not
    kept, and the scores equal those of running the dense model again (random draws)."""
    torch.manual_seed(0)
    model = Repeated().double().eval()
    data = [torch.randn(16, 4, dtype=torch.float64) for _ in range(3)]
    analysis = analyse(capture(model, (data[0],)))
    reps = {float(d[0, 0]): r for d, r in zip(data, (2, 0, 1), strict=True)}
    handle = model.register_forward_pre_hook(
        lambda m, args: setattr(m, "reps", reps.get(float(args[0][0, 0]), 1)))
    try:
        groups = [next(g for g in analysis.groups if (f"{m}.weight", 0) in g.members)
                  for m in "ab"]
        removals = {g.index: 2 for g in groups}
        found = []
        for keep in (False, True):
            criterion = OBS(analysis, data, max_rows=12, max_steps=None)
            if keep:
                criterion.expect_rescore()
            score(analysis, criterion, groups, normalize="none")
            if keep:
                assert sorted(criterion._dense_rows) == ["b"]  # c's let go
            found.append(criterion.rescore(removals))
    finally:
        handle.remove()
    for index in found[0]:
        np.testing.assert_array_equal(found[1][index], found[0][index])


class Concatenated(nn.Module):
    """Two groups read by one layer: ``a``'s three outputs and ``b``'s three, concatenated
    into ``c``."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 3), nn.Linear(4, 3), nn.Linear(6, 2)

    def forward(self, x):
        return self.c(torch.cat([torch.tanh(self.a(x)), torch.tanh(self.b(x))], 1))


def test_sequential_cuts_an_earlier_groups_removed_columns_out_of_a_shared_consumer():
    """``c`` reads both groups: once the first loses a unit (``c`` refitted without it), the
    second group's scores are the lstsq greedy over its own columns with that column gone
    for good (not used to compensate), above the error of that state, over the energy of the
    refitted ``c``; the ridge is 1% of the mean diagonal of the remaining columns."""
    torch.manual_seed(1)
    model = Concatenated().double().eval()
    data = [torch.randn(24, 4, dtype=torch.float64) for _ in range(2)]
    analysis = analyse(capture(model, (data[0],)))
    first, second = sorted((next(g for g in analysis.groups if (f"{m}.weight", 0) in g.members)
                            for m in "ab"), key=lambda g: g.index)
    criterion = OBS(analysis, data, max_rows=10_000, max_steps=None)
    score(analysis, criterion, [first, second], normalize="none")
    got = criterion.rescore({first.index: 1, second.index: 1})

    with torch.no_grad():
        x = torch.cat(data)
        xc = torch.cat([torch.tanh(model.a(x)), torch.tanh(model.b(x))], 1)
        y, w = model.c(xc), model.c.weight
        own = [np.flatnonzero(np.isin(np.arange(6) // 3, [k])) for k in (0, 1)]
        mine, theirs = (own[0], own[1]) if ("a.weight", 0) in first.members else (own[1], own[0])
        gone = mine[np.argsort(got[first.index], kind="stable")[0]]
        lam = 0.01 * float((xc.T @ xc).diagonal().mean())
        alive = np.setdiff1d(np.arange(6), [gone])
        refitted, _, _ = ridge_fit(xc, y, w, lam, alive)
        lam = 0.01 * float((xc.T @ xc).diagonal()[alive].mean())
        base = ridge_fit(xc, y, w, lam, alive)[2]
        energy = float(((xc @ refitted.T) ** 2).sum())
    # the greedy over the second group's columns, the first group's removed column dropped
    errors, removed = {}, []
    for _ in range(3):
        trial = {u: ridge_fit(xc, y, w, lam, np.setdiff1d(
            alive, [theirs[v] for v in removed + [u]]))[2] for u in range(3) if u not in removed}
        best = min(trial, key=trial.get)
        removed.append(best)
        errors[best] = trial[best]
    want = (np.array([errors[u] for u in range(3)]) - base) / energy
    np.testing.assert_allclose(got[second.index], want, rtol=1e-5, atol=1e-12)


def test_prune_with_sequential_removes_what_rescore_ranks_lowest():
    """Through ``structprune.prune``: the same widths as plain obs, and the second group
    keeps the units ``rescore`` ranks highest, which here differ from plain obs's choice."""
    torch.manual_seed(1)
    model = Chain().eval()
    data = [torch.randn(16, 4) for _ in range(2)]
    plain = sp.prune(model, (data[0],), 0.4, criterion="obs", data=data)
    sequential = sp.prune(model, (data[0],), 0.4, criterion="obs", data=data, sequential=True)
    assert [g["kept"] for g in sequential.plan.groups] == [g["kept"] for g in plain.plan.groups]
    assert sequential.verification.ok

    analysis = analyse(capture(model, (data[0],)))
    criterion = OBS(analysis, data)
    score(analysis, criterion, analysis.prunable_groups())
    removals = {g["index"]: g["units"] - g["kept"] for g in plain.plan.groups}
    second = next(g for g in analysis.groups if ("b.weight", 0) in g.members)
    ranked = np.argsort(criterion.rescore(removals)[second.index], kind="stable")
    want = sorted(ranked[removals[second.index]:].tolist())

    def kept(result):
        return next(p["keep"] for p in result.plan.params
                    if p["name"] == "b.weight" and p["dim"] == 0)
    assert kept(sequential) == want and kept(plain) != want


@pytest.mark.parametrize("settings", [
    {"ratio": 0.5}, {"macs_budget": 0.5},
    {"ratio": 0.7, "global_ranking": True, "normalize": "none"},
])
def test_sequential_plans_keep_the_widths_and_prune_and_verify(settings):
    model = randomize(small_vgg())
    settings = dict(settings)
    ratio = settings.pop("ratio", None)
    plain = check_pruned(model, X, ratio, criterion="obs", data=calibration(), **settings)
    sequential = check_pruned(model, X, ratio, criterion="obs", data=calibration(),
                              sequential=True, **settings)
    assert [g["kept"] for g in sequential.plan.groups] == [g["kept"] for g in plain.plan.groups]
    assert sequential.plan.extra == plain.plan.extra


X = (torch.randn(2, 3, 16, 16),)


def calibration(n=3, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 3, 16, 16, generator=gen) for _ in range(n)]


@pytest.mark.parametrize("settings", [
    {"ratio": 0.5}, {"ratio": 0.5, "global_ranking": True, "normalize": "none"},
    {"threshold": 0.6}, {"macs_budget": 0.5}, {"params_budget": 0.6, "normalize": "none"},
])
def test_plans_made_with_obs_prune_and_verify(settings):
    model = randomize(small_vgg())
    ratio = settings.pop("ratio", None)
    result = check_pruned(model, X, ratio, criterion="obs", data=calibration(), **settings)
    assert result.figures["groups_pruned"] > 0
    assert result.figures["criterion"]["name"] == "obs"
    assert result.figures["criterion"]["consumers"] == 5  # four convs and the first linear
    if "macs_budget" in settings:
        assert result.figures["macs_ratio"] <= 0.5 + 1e-9


def test_obs_keeps_the_channel_the_consumer_needs_and_drops_a_redundant_copy():
    """Channel 3 of the first conv is an exact copy of channel 2, both ten times louder than
    the others: removing either costs little once the other's weights take over (only the
    ridge's price), so obs removes one of the pair before most channels and keeps the other
    last, where magnitude keeps both first."""
    model = randomize(small_vgg()).eval()
    with torch.no_grad():
        for t in (model[0].weight, model[0].bias, model[1].weight, model[1].bias,
                  model[1].running_mean, model[1].running_var):
            t[3] = t[2]
        model[0].weight[2:4] *= 10  # the pair is large: magnitude keeps both
    analysis = analyse(capture(model, X))
    group = next(g for g in analysis.groups if ("0.weight", 0) in g.members)
    got = score(analysis, "obs", [group], data=calibration(), normalize="none")[group.index]
    assert max(got[2], got[3]) == got.max()
    assert min(got[2], got[3]) < np.median(got)
    l2 = score(analysis, "l2", [group])[group.index]
    assert np.argsort(l2)[-2:].tolist() in ([2, 3], [3, 2])
