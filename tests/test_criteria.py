"""The importance criteria of structprune.core.criteria, each against an independent computation:
autograd by hand for the gradient criteria, numpy formulas for FPGM and LAMP, forward hooks
for activations, the BN scales themselves for network slimming."""

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.core.analyse import analyse
from structprune.core.capture import capture
from structprune.core.criteria import LABELS, PROJECTION, PSEUDO_LABELS
from structprune.core.score import IMPORTANCE, NEEDS_DATA, make_criterion, score
from structprune.errors import PlanError
from tests.oracles import randomize


class Chain(nn.Module):
    """conv-BN-relu-conv-BN-relu, then pooled (``pool``) or flattened into the linear layer
    (a unit of conv2 then owns 16 columns of fc's weight)."""

    def __init__(self, pool: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 6, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(6)
        self.pool = pool
        self.fc = nn.Linear(6 if pool else 6 * 4 * 4, 5)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3)) if self.pool else x.flatten(1)
        return self.fc(x)


class Residual(nn.Module):
    """Two conv-BN branches joined by an add: one group holds both BNs."""

    def __init__(self):
        super().__init__()
        self.conv_a, self.bn_a = nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6)
        self.conv_b, self.bn_b = nn.Conv2d(3, 6, 1), nn.BatchNorm2d(6)
        self.conv_c = nn.Conv2d(6, 7, 3, padding=1)  # no norm after it
        self.fc = nn.Linear(7, 4)

    def forward(self, x):
        x = F.relu(self.bn_a(self.conv_a(x)) + self.bn_b(self.conv_b(x)))
        return self.fc(F.relu(self.conv_c(x)).mean(dim=(2, 3)))


def batches(sizes=(6, 6), classes=5, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 3, 4, 4, generator=gen, dtype=dtype),
             torch.randint(0, classes, (n,), generator=gen)) for n in sizes]


def analysed(model, dtype=torch.float32):
    return analyse(capture(model, (torch.randn(2, 3, 4, 4, dtype=dtype),)))


def group_of(analysis, member):
    return next(g for g in analysis.groups if member in g.members)


def prunable(analysis):
    return [g for g in analysis.groups if (~g.blocked).any()]


def unit_positions(analysis, group, name, dim):
    """For each slot of member (name, dim): the position of its unit in the group, or -1."""
    where = {int(c): i for i, c in enumerate(group.units)}
    return [where.get(int(analysis.component[a]), -1) for a in analysis.slots[(name, dim)]]


# ---------------------------------------------------------------------- a planted dead channel


DEAD = 5


def dead_channel_model():
    torch.manual_seed(0)
    model = randomize(Chain(), seed=3).eval()
    with torch.no_grad():
        for tensor in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias):
            tensor[DEAD] = 0
    return model


@pytest.mark.parametrize("name", [n for n in IMPORTANCE if n != "random"])
def test_a_dead_channel_is_ranked_last_by_every_criterion(name):
    model = dead_channel_model()
    analysis = analysed(model)
    group = group_of(analysis, ("conv1.weight", 0))
    s = score(analysis, name, [group], data=batches())[group.index]
    assert s.shape == (8,)
    others = np.delete(s, DEAD)
    assert s[DEAD] < others.min(), (name, s)


# -------------------------------------------------------------------------- gradient criteria


def hand_gradients(model, data):
    """d/dW of the sum of the per-batch cross-entropy losses, by torch.autograd.grad."""
    params = dict(model.named_parameters())
    loss = sum(F.cross_entropy(model(x), y) for x, y in data)
    grads = torch.autograd.grad(loss, list(params.values()))
    return params, {name: g.detach() for name, g in zip(params, grads, strict=True)}


def hand_scores(analysis, group, params, grads, criterion):
    total, members = np.zeros(group.size), 0
    for name, dim in group.members:
        if name not in params:
            continue  # buffers (BN statistics) do not count
        members += 1
        w, g = params[name].detach(), grads[name]
        for slot, unit in enumerate(unit_positions(analysis, group, name, dim)):
            if unit < 0:
                continue
            if criterion == "taylor":
                total[unit] += float((w.select(dim, slot) * g.select(dim, slot)).sum())
            else:
                total[unit] += float(g.select(dim, slot).abs().mean())
    return np.abs(total) if criterion == "taylor" else total / members


@pytest.mark.parametrize("criterion", ["taylor", "gradient"])
def test_gradient_criteria_equal_a_hand_computation(criterion):
    torch.manual_seed(0)
    model = randomize(Chain(pool=False), seed=2).double().eval()
    data = batches((5, 3), dtype=torch.float64)
    analysis = analysed(model, torch.float64)
    groups = prunable(analysis)
    assert len(groups) == 2 and any(len(unit_positions(analysis, g, "fc.weight", 1)) == 96
                                    for g in groups)
    # the user's gradients, flags and BN statistics come back as they were
    model.train()
    sentinel = torch.full_like(model.conv1.weight, 7.0)
    model.conv1.weight.grad = sentinel
    model.fc.bias.requires_grad_(False)
    running = model.bn1.running_mean.clone()

    got = score(analysis, criterion, groups, data=data, normalize="none")

    assert model.training and model.bn1.training
    assert model.conv1.weight.grad is sentinel and model.conv2.weight.grad is None
    assert not model.fc.bias.requires_grad
    torch.testing.assert_close(model.bn1.running_mean, running, rtol=0, atol=0)
    model.fc.bias.requires_grad_(True)
    model.eval()
    params, grads = hand_gradients(model, data)
    for group in groups:
        want = hand_scores(analysis, group, params, grads, criterion)
        np.testing.assert_allclose(got[group.index], want, rtol=1e-5)


# ------------------------------------------------------------- gradient criteria without labels


def inputs_only(data):
    return [x for x, _ in data]


@pytest.mark.parametrize("criterion", ["taylor", "gradient"])
def test_without_targets_a_classifier_is_scored_against_its_own_argmax(criterion):
    """Inputs only, classifier-shaped output: the gradients of the cross-entropy against
    the dense model's argmax (nonzero scores); with targets, the labelled loss as before."""
    torch.manual_seed(0)
    model = randomize(Chain(pool=False), seed=2).double().eval()
    data = batches((5, 3), dtype=torch.float64)
    analysis = analysed(model, torch.float64)
    groups = prunable(analysis)
    made = make_criterion(criterion, analysis, data=inputs_only(data))
    got = score(analysis, made, groups, normalize="none")
    assert made.notes == {"label_free": True, "loss": PSEUDO_LABELS}
    with torch.no_grad():
        pseudo = [(x, model(x).argmax(dim=1)) for x, _ in data]
    params, grads = hand_gradients(model, pseudo)
    for group in groups:
        want = hand_scores(analysis, group, params, grads, criterion)
        np.testing.assert_allclose(got[group.index], want, rtol=1e-5)
        assert got[group.index].any()  # (a channel ReLU silences everywhere scores 0)
    with_targets = make_criterion(criterion, analysis, data=data)
    labelled = score(analysis, with_targets, groups, normalize="none")
    assert with_targets.notes == {"label_free": False, "loss": LABELS}
    params, grads = hand_gradients(model, data)
    for group in groups:
        np.testing.assert_allclose(labelled[group.index],
                                   hand_scores(analysis, group, params, grads, criterion),
                                   rtol=1e-5)


class Segmenter(nn.Module):
    """Chain's convolutions returning a feature map and a slice of it: no logits."""

    def __init__(self):
        super().__init__()
        self.chain = Chain(pool=False)
        self.head = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        c = self.chain
        x = F.relu(c.bn1(c.conv1(x)))
        x = F.relu(c.bn2(c.conv2(x)))
        y = self.head(x)
        return {"mask": y, "corner": 10 * y[:, :, 0, 0]}


def projected_by_hand(model, data, seed, analysis, groups):
    """The label-free projections written out: per sample, the gradient of
    sum_k <f_k, r_k> / s_k (r seeded in the criterion's order, s_k the RMS of output k on
    the first batch), then per unit 1/2 sum_n (sum W * g_n)^2 (taylor) and
    sqrt(sum_n g_n^2) per element (gradient)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        first = model(data[0])
        scales = [float(first[k].double().square().mean().sqrt()) for k in ("mask", "corner")]
    gen = torch.Generator().manual_seed(seed)
    taylor = {g.index: np.zeros(g.size) for g in groups}
    squares = {name: torch.zeros_like(p) for name, p in params.items()}
    for x in data:
        for i in range(len(x)):
            out = model(x[i:i + 1])
            loss = sum((out[k] * torch.randn(out[k].shape, generator=gen).to(out[k])).sum() / s
                       for k, s in zip(("mask", "corner"), scales, strict=True))
            grads = dict(zip(params, torch.autograd.grad(loss, list(params.values()),
                                                         allow_unused=True), strict=True))
            grads = {n: torch.zeros_like(params[n]) if g is None else g
                     for n, g in grads.items()}
            for name in params:
                squares[name] += grads[name].square()
            for group in groups:
                term = np.zeros(group.size)
                for name, dim in group.members:
                    if name not in params:
                        continue
                    for slot, unit in enumerate(unit_positions(analysis, group, name, dim)):
                        if unit >= 0:
                            term[unit] += float((params[name].detach().select(dim, slot)
                                                 * grads[name].select(dim, slot)).sum())
                taylor[group.index] += 0.5 * term ** 2
    return taylor, {name: q.sqrt() for name, q in squares.items()}


def test_without_targets_other_outputs_are_scored_by_squared_random_projections():
    torch.manual_seed(0)
    model = randomize(Segmenter(), seed=3).double().eval()
    data = inputs_only(batches((3, 2), dtype=torch.float64))
    analysis = analysed(model, torch.float64)
    groups = prunable(analysis)
    taylor = make_criterion("taylor", analysis, data=data, seed=5)
    got = score(analysis, taylor, groups, normalize="none")
    gradient = make_criterion("gradient", analysis, data=data, seed=5)
    got_gradient = score(analysis, gradient, groups, normalize="none")
    assert taylor.notes == gradient.notes == {"label_free": True, "loss": PROJECTION}

    want, rms = projected_by_hand(model, data, 5, analysis, groups)
    params = dict(model.named_parameters())
    for group in groups:
        np.testing.assert_allclose(got[group.index], want[group.index], rtol=1e-4)
        assert got[group.index].any()
        np.testing.assert_allclose(got_gradient[group.index],
                                   hand_scores(analysis, group, params, rms, "gradient"),
                                   rtol=1e-5)


def test_squared_projections_estimate_the_gauss_newton_error():
    """Averaged over seeds, taylor's projected score of a unit approaches
    1/2 sum_n ||J_n d_u||^2 (outputs scaled by their RMS), d_u the unit's weights: the
    second-order increase of the squared error to the dense model when they are zeroed,
    by forward-mode autograd (torch.func.jvp)."""
    torch.manual_seed(0)
    model = randomize(Segmenter(), seed=3).double().eval()
    data = inputs_only(batches((32,), dtype=torch.float64))
    analysis = analysed(model, torch.float64)
    group = group_of(analysis, ("chain.conv1.weight", 0))
    seeds = 20  # 640 projections a unit: within 9% on these seeds
    mean = sum(score(analysis, "taylor", [group], data=data, seed=s, normalize="none")
               [group.index] for s in range(seeds)) / seeds

    params = {n: p.detach() for n, p in model.named_parameters()}
    with torch.no_grad():
        first = model(data[0])
    scales = {k: first[k].square().mean().sqrt() for k in first}

    def scaled(p):
        out = torch.func.functional_call(model, p, (data[0],))
        return tuple(out[k] / scales[k] for k in ("mask", "corner"))

    want = np.zeros(group.size)
    for unit in range(group.size):
        tangent = {n: torch.zeros_like(p) for n, p in params.items()}
        for name, dim in group.members:
            if name in params:
                for slot, u in enumerate(unit_positions(analysis, group, name, dim)):
                    if u == unit:
                        tangent[name].select(dim, slot).copy_(params[name].select(dim, slot))
        _, jd = torch.func.jvp(scaled, (params,), (tangent,))
        want[unit] = 0.5 * sum(float(t.square().sum()) for t in jd)
    np.testing.assert_allclose(mean, want, rtol=0.15)


def test_the_report_says_the_scores_were_label_free():
    torch.manual_seed(0)
    model = randomize(Chain(), seed=2).eval()
    data = inputs_only(batches((6, 6)))
    result = sp.prune(model, (torch.randn(2, 3, 4, 4),), 0.5, criterion="taylor", data=data)
    assert result.figures["criterion"] == {"name": "taylor", "label_free": True,
                                           "loss": PSEUDO_LABELS}
    result = sp.prune(model, (torch.randn(2, 3, 4, 4),), 0.5, criterion="taylor",
                      data=batches((6, 6)))
    assert result.figures["criterion"]["label_free"] is False


def test_calibration_batches_default_to_eight_of_an_iterator_all_of_a_list():
    torch.manual_seed(0)
    model = randomize(Chain(), seed=2).double().eval()
    analysis = analysed(model, torch.float64)
    group = group_of(analysis, ("conv1.weight", 0))
    data = batches((2,) * 10, dtype=torch.float64)
    taken = []

    def stream():
        for batch in data:
            taken.append(batch)
            yield batch

    from_stream = score(analysis, "taylor", [group], data=stream())[group.index]
    assert len(taken) == 8
    np.testing.assert_allclose(from_stream,
                               score(analysis, "taylor", [group], data=data[:8])[group.index])
    all_ten = score(analysis, "taylor", [group], data=data)[group.index]
    assert not np.allclose(all_ten, from_stream)
    np.testing.assert_allclose(score(analysis, "taylor", [group], data=data, batches=3)
                               [group.index],
                               score(analysis, "taylor", [group], data=data[:3])[group.index])


# ------------------------------------------------------------------------------- FPGM and LAMP


def chain_with_a_tie():
    """Chain with channel 2 of conv1 a copy of channel 1 in every member: equal magnitudes."""
    torch.manual_seed(0)
    model = randomize(Chain(pool=False), seed=4).eval()
    with torch.no_grad():
        for tensor in (model.conv1.weight, model.conv1.bias, model.bn1.weight, model.bn1.bias):
            tensor[2] = tensor[1]
        model.conv2.weight[:, 2] = model.conv2.weight[:, 1]
    return model


def test_fpgm_equals_the_sum_of_distances_to_the_other_filters():
    model = chain_with_a_tie()
    analysis = analysed(model)
    params = dict(model.named_parameters())
    got = score(analysis, "fpgm", prunable(analysis), normalize="none")
    for group in prunable(analysis):
        total, members = np.zeros(group.size), 0
        for name, dim in group.members:
            if name not in params or params[name].ndim < 2 or dim != 0:
                continue  # filters only: weights sliced on their output axis
            members += 1
            w = params[name].detach().double().numpy()
            v = np.moveaxis(w, dim, 0).reshape(w.shape[dim], -1)
            distances = np.sqrt(((v[:, None, :] - v[None, :, :]) ** 2).sum(-1))
            for slot, unit in enumerate(unit_positions(analysis, group, name, dim)):
                if unit >= 0:
                    total[unit] += distances[slot].sum()
        np.testing.assert_allclose(got[group.index], total / members, rtol=1e-6)


def test_lamp_equals_its_formula_with_ties_in_stable_order():
    model = chain_with_a_tie()
    analysis = analysed(model)
    params = dict(model.named_parameters())
    group = group_of(analysis, ("conv1.weight", 0))
    magnitude, members = np.zeros(group.size), 0
    for name, dim in group.members:
        if name not in params:
            continue
        members += 1
        w = params[name].detach().double().numpy()
        v = np.moveaxis(w, dim, 0).reshape(w.shape[dim], -1)
        for slot, unit in enumerate(unit_positions(analysis, group, name, dim)):
            magnitude[unit] += np.sqrt((v[slot] ** 2).sum())
    m = (magnitude / members) ** 2
    rank_order = sorted(range(group.size), key=lambda u: m[u])  # Python's sort is stable
    rank = {u: r for r, u in enumerate(rank_order)}
    want = np.zeros(group.size)
    for u in range(group.size):
        want[u] = m[u] / sum(m[v] for v in range(group.size) if rank[v] >= rank[u])

    got = score(analysis, "lamp", [group], normalize="none")[group.index]
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert abs(m[1] - m[2]) <= 1e-12 * m[1] and got[1] < got[2]  # the tie: first ranked lower


# ------------------------------------------------------------------------------ network slimming


def test_bn_scale_sums_every_norm_of_a_group_and_reports_fallbacks():
    torch.manual_seed(0)
    model = randomize(Residual(), seed=5).eval()
    with torch.no_grad():
        model.bn_a.weight.copy_(torch.randn(6))  # negative scales too: magnitudes count
        model.bn_b.weight.copy_(torch.randn(6))
    analysis = analysed(model)
    joined = group_of(analysis, ("bn_a.weight", 0))
    assert ("bn_b.weight", 0) in joined.members
    plain = group_of(analysis, ("conv_c.weight", 0))
    criterion = make_criterion("bn", analysis)
    got = score(analysis, criterion, [joined, plain], normalize="none")
    want = (model.bn_a.weight.abs() + model.bn_b.weight.abs()).detach().double().numpy()
    np.testing.assert_allclose(got[joined.index], want, rtol=1e-6)
    assert criterion.fallbacks == [plain.index]  # no norm: scored by l2 magnitude instead
    np.testing.assert_allclose(got[plain.index],
                               score(analysis, "l2", [plain], normalize="none")[plain.index])


# ---------------------------------------------------------------------------------- activations


def test_activation_equals_the_consumers_inputs_measured_with_hooks():
    torch.manual_seed(0)
    model = randomize(Chain(pool=False), seed=6).double().eval()
    data = batches((5, 2, 4), dtype=torch.float64)  # uneven: every sample counts the same
    seen = {"conv2": [], "fc": []}
    hooks = [getattr(model, name).register_forward_pre_hook(
        lambda module, args, name=name: seen[name].append(args[0].detach().abs()))
        for name in seen]
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for hook in hooks:
        hook.remove()
    conv2_in = torch.cat(seen["conv2"])  # (N, 8, 4, 4): conv1's channels
    fc_in = torch.cat(seen["fc"]).reshape(-1, 6, 16)  # flattened conv2 channels

    analysis = analysed(model, torch.float64)
    first, second = group_of(analysis, ("conv1.weight", 0)), group_of(analysis, ("fc.weight", 1))
    criterion = make_criterion("activation", analysis, data=data)
    got = score(analysis, criterion, [first, second], normalize="none")
    np.testing.assert_allclose(got[first.index], conv2_in.mean(dim=(0, 2, 3)).numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(got[second.index], fc_in.mean(dim=(0, 2)).numpy(), rtol=1e-5)
    assert criterion.fallbacks == []


# ------------------------------------------------------------------------- random and settings


def test_random_is_seeded():
    analysis = analysed(randomize(Chain(), seed=0).eval())
    groups = prunable(analysis)
    a, b = score(analysis, "random", groups, seed=3), score(analysis, "random", groups, seed=3)
    c = score(analysis, "random", groups, seed=4)
    for g in groups:
        np.testing.assert_array_equal(a[g.index], b[g.index])
        assert not np.allclose(a[g.index], c[g.index])


def test_normalize_modes():
    analysis = analysed(Chain().eval())
    groups = prunable(analysis)

    def raw(analysis, group):
        return np.arange(1.0, group.size + 1) ** 2

    for how, scale in (("mean", np.mean), ("max", np.max), ("sum", np.sum),
                       ("none", lambda s: 1.0)):
        got = score(analysis, raw, groups, normalize=how)
        for g in groups:
            r = np.arange(1.0, g.size + 1) ** 2
            np.testing.assert_allclose(got[g.index], r / scale(r), rtol=1e-12)
    zeros = score(analysis, lambda a, g: np.zeros(g.size), groups, normalize="max")
    assert all(not s.any() and np.isfinite(s).all() for s in zeros.values())


def test_errors_are_one_line_plan_errors():
    analysis = analysed(Chain().eval())
    with pytest.raises(PlanError) as info:
        score(analysis, "hessian")
    message = str(info.value)
    assert "\n" not in message and all(name in message for name in IMPORTANCE)
    assert set(NEEDS_DATA) <= set(IMPORTANCE)
    for name in NEEDS_DATA:
        with pytest.raises(PlanError) as info:
            score(analysis, name)
        assert str(info.value) == (f"criterion {name!r} needs calibration data: pass data=... "
                                   "(CLI: --data digits|DIR|file.py:FACTORY)")
    for name in set(IMPORTANCE) - set(NEEDS_DATA):
        score(analysis, name)  # no data needed
    with pytest.raises(PlanError) as info:
        score(analysis, "l2", normalize="median")
    assert "\n" not in str(info.value) and "mean" in str(info.value)
    for bad, kwargs in ((batches(), {"batches": 0}), ([], {}), ([torch.zeros(2)], {})):
        with pytest.raises(PlanError) as info:
            score(analysis, "taylor", data=bad, **kwargs)
        assert "\n" not in str(info.value)
