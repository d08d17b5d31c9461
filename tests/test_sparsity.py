"""Sparsity regularisers: values and gradients against hand loops over the analysis, and
training that drives planted units (a residual stream's shared channel included) to zero."""

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from structprune.accuracy.sparsity import BNL1, GroupLasso
from structprune.core.analyse import analyse
from structprune.core.capture import capture
from structprune.errors import StructPruneError

NORMS = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm, nn.InstanceNorm2d)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny convolutions: on a busy machine, intra-op threads spin far longer than they work
    (200 training steps took 10 s with two threads, 0.2 s with one)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tiny(nn.Module):
    """A concat (its BatchNorm and consumer shared by two groups, one of them blocked because
    ``b``'s output is a model output), a depthwise conv, and a flatten into a linear layer
    (four input columns per channel)."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 1)
        self.bn = nn.BatchNorm2d(7)
        self.dw = nn.Conv2d(7, 7, 3, padding=1, groups=7)
        self.g = nn.Conv2d(7, 6, 3, padding=1)
        self.gn = nn.GroupNorm(6, 6)
        self.fc = nn.Linear(6 * 2 * 2, 5)

    def forward(self, x):
        bx = self.b(x)
        y = torch.relu(self.bn(torch.cat([self.a(x), bx], 1)))
        y = torch.relu(self.gn(self.g(self.dw(y))))
        return self.fc(y.flatten(1)), bx.mean((2, 3))


class Residual(nn.Module):
    """Two branches summed into one stream read by ``c3`` and ``fc``."""

    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 6, 3, padding=1)
        self.n0 = nn.BatchNorm2d(6)
        self.c1 = nn.Conv2d(6, 8, 3, padding=1)
        self.n1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(6, 8, 1)
        self.n2 = nn.BatchNorm2d(8)
        self.c3 = nn.Conv2d(8, 4, 3, padding=1)
        self.fc = nn.Linear(8 + 4, 3)

    def forward(self, x):
        h = torch.relu(self.n0(self.c0(x)))
        y = torch.relu(self.n1(self.c1(h)) + self.n2(self.c2(h)))
        z = torch.relu(self.c3(y))
        return self.fc(torch.cat([y.mean((2, 3)), z.mean((2, 3))], 1))


def small_cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def randomise(model):
    """Random norm weights and biases (their init, ones and zeros, hides sign mistakes)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, NORMS):
                m.weight.copy_(torch.randn_like(m.weight))
                m.bias.copy_(torch.randn_like(m.bias))
    return model


def analysed(model, shape):
    model.eval()
    dtype = next(model.parameters()).dtype
    return analyse(capture(model, (torch.randn(*shape, dtype=dtype),)))


# ------------------------------------------------------------------- hand-written references


def hand_unit_slices(analysis, model, group, comp):
    """Every parameter slice of unit ``comp`` of ``group``, flattened, by explicit loops."""
    params = dict(model.named_parameters())
    pieces = []
    for name, dim in group.members:
        if name not in params:  # a buffer
            continue
        ids = analysis.slots[(name, dim)]
        for s in range(len(ids)):
            if int(analysis.component[ids[s]]) == int(comp):
                pieces.append(params[name].select(dim, s).reshape(-1))
    return pieces


def hand_group_lasso(analysis, model, strength, scaled):
    total = torch.zeros((), dtype=torch.float64)
    norms = {}
    for group in analysis.groups:
        for comp, blocked in zip(group.units, group.blocked, strict=True):
            if blocked:
                continue
            v = torch.cat(hand_unit_slices(analysis, model, group, comp))
            norm = torch.sqrt((v * v).sum())
            norms[(group.index, int(comp))] = norm
            total = total + (math.sqrt(v.numel()) if scaled else 1.0) * norm
    return strength * total, norms


def hand_bnl1(analysis, model, strength):
    """strength * sum |gamma| over the prunable units' norm weights, and the expected gradient
    (strength * sign(gamma) there, zero everywhere else)."""
    params = dict(model.named_parameters())
    total = torch.zeros((), dtype=torch.float64)
    grads = {name: torch.zeros_like(p) for name, p in params.items()}
    for group in analysis.groups:
        for comp, blocked in zip(group.units, group.blocked, strict=True):
            if blocked:
                continue
            for name, dim in group.members:
                owner, _, attr = name.rpartition(".")
                if attr != "weight" or not isinstance(model.get_submodule(owner), NORMS):
                    continue
                ids = analysis.slots[(name, dim)]
                for s in range(len(ids)):
                    if int(analysis.component[ids[s]]) == int(comp):
                        gamma = params[name][s]
                        total = total + gamma.abs()
                        grads[name][s] = strength * torch.sign(gamma.detach())
    return strength * total, grads


def assert_same_gradients(model, got, want):
    params = dict(model.named_parameters())
    g_got = torch.autograd.grad(got, list(params.values()), allow_unused=True)
    g_want = torch.autograd.grad(want, list(params.values()), allow_unused=True)
    for name, a, b, p in zip(params, g_got, g_want, params.values(), strict=True):
        a = torch.zeros_like(p) if a is None else a
        b = torch.zeros_like(p) if b is None else b
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")


# ----------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("scaled", [False, True])
def test_group_lasso_value_and_gradients_equal_a_hand_loop(scaled):
    model = randomise(Tiny()).double()
    analysis = analysed(model, (1, 3, 2, 2))
    # the fixture covers what it should: a group blocked by the output sharing members with
    # a prunable one, and units owning several slots of one member (the flatten)
    assert any(g.blocked.all() and ("bn.weight", 0) in g.members for g in analysis.groups)
    assert any(not g.blocked.any() and ("bn.weight", 0) in g.members for g in analysis.groups)
    reg = GroupLasso(analysis, 0.3, scaled=scaled)
    got = reg(model)
    want, norms = hand_group_lasso(analysis, model, 0.3, scaled)
    assert got.dtype == torch.float64 and got.ndim == 0
    torch.testing.assert_close(got, want)
    assert reg.num_units == len(norms) == 4 + 6  # a's 4 channels, g's 6
    assert_same_gradients(model, got, want)
    # per-unit norms are the hand ones, in the regulariser's unit order
    internal = reg.unit_norms(model)
    for i, (g, comp) in enumerate(zip(reg.unit_group, reg.unit_component, strict=True)):
        torch.testing.assert_close(internal[i], norms[(int(g), int(comp))])
    # g's units: a 7x3x3 filter, a bias, gn's weight and bias, and 4 flatten columns of fc
    g_units = reg.unit_elements[reg.unit_group == reg.unit_group[-1]]
    assert g_units.tolist() == [7 * 9 + 1 + 1 + 1 + 4 * 5] * 6


def test_group_lasso_in_float32_matches_float64_hand_loop():
    model = randomise(Tiny())
    analysis = analysed(model, (1, 3, 2, 2))
    got = GroupLasso(analysis, 0.5)(model)
    assert got.dtype == torch.float32
    want, _ = hand_group_lasso(analysis, copy.deepcopy(model).double(), 0.5, False)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)


def test_group_lasso_at_a_zero_unit_has_a_finite_gradient():
    model = randomise(Tiny()).double()
    analysis = analysed(model, (1, 3, 2, 2))
    reg = GroupLasso(analysis, 1.0)
    group = next(g for g in analysis.groups if ("a.weight", 0) in g.members)
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, dim in group.members:
            if name in params:
                ids = analysis.slots[(name, dim)]
                for s in range(len(ids)):
                    if analysis.component[ids[s]] == group.units[0]:
                        params[name].select(dim, s).zero_()
    value = reg(model)
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    want, _ = hand_group_lasso(analysis, model, 1.0, False)
    torch.testing.assert_close(value.detach(), want.detach())
    assert float(reg.unit_norms(model)[0]) == 0.0


def test_bnl1_value_and_gradient_are_strength_sign_gamma_on_prunable_norms_only():
    model = randomise(Tiny()).double()
    analysis = analysed(model, (1, 3, 2, 2))
    reg = BNL1(analysis, 0.7)
    got = reg(model)
    want, grads = hand_bnl1(analysis, model, 0.7)
    torch.testing.assert_close(got, want)
    params = dict(model.named_parameters())
    computed = torch.autograd.grad(got, list(params.values()), allow_unused=True)
    for (name, p), g in zip(params.items(), computed, strict=True):
        g = torch.zeros_like(p) if g is None else g
        torch.testing.assert_close(g, grads[name], msg=lambda m, name=name: f"{name}: {m}")
    # the blocked half of the concat keeps its BN scales unpenalised; gn's are all penalised
    assert grads["bn.weight"][4:].abs().sum() == 0 and grads["bn.weight"][:4].abs().min() > 0
    assert grads["gn.weight"].abs().min() > 0
    assert reg.parameter_names == ["bn.weight", "gn.weight"]


def test_regularizers_read_the_model_given_at_call_time():
    model = randomise(Tiny())
    analysis = analysed(model, (1, 3, 2, 2))
    for reg in (GroupLasso(analysis, 0.1), BNL1(analysis, 0.1)):
        held = [v for v in vars(reg).values() if isinstance(v, nn.Parameter)]
        assert not held
        other = randomise(copy.deepcopy(model))  # same names, new tensors, new values
        assert not torch.allclose(reg(other), reg(model))
        model.load_state_dict(other.state_dict())
        torch.testing.assert_close(reg(model), reg(other))
        smaller = copy.deepcopy(model)
        smaller.gn = nn.GroupNorm(5, 5)  # as after pruning
        with pytest.raises(StructPruneError, match="gn.weight"):
            reg(smaller)
        with pytest.raises(StructPruneError, match="no parameter"):
            reg(nn.Linear(2, 2))
    assert GroupLasso(analysed(nn.Linear(3, 2), (1, 3)), 1.0)(nn.Linear(3, 2)) == 0


def plant_weak_units(analysis, model, group, positions, factor):
    """Scale every parameter slice of ``group``'s units at ``positions`` by ``factor``."""
    params = dict(model.named_parameters())
    comps = {int(group.units[i]) for i in positions}
    with torch.no_grad():
        for name, dim in group.members:
            if name not in params:
                continue
            ids = analysis.slots[(name, dim)]
            for s in range(len(ids)):
                if int(analysis.component[ids[s]]) in comps:
                    params[name].select(dim, s).mul_(factor)


def descend(model, reg, steps=200, lr=0.1):
    """Gradient descent on a fixed MSE task (plus ``reg``), the step falling linearly to 0."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, 6, 6, generator=gen)
    target = torch.randn(8, model(x).shape[1], generator=gen)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * (1 - step / steps)
        loss = F.mse_loss(model(x), target)
        if reg is not None:
            loss = loss + reg(model)
        opt.zero_grad()
        loss.backward()
        opt.step()


@pytest.mark.parametrize("regularise", [True, False])
def test_group_lasso_drives_planted_units_to_zero(regularise):
    torch.manual_seed(0)
    model = small_cnn().eval()
    analysis = analysed(model, (1, 3, 6, 6))
    reg = GroupLasso(analysis, 0.02)
    first = analysis.groups[reg.unit_group[0]]
    assert ("0.weight", 0) in first.members and ("3.weight", 1) in first.members
    plant_weak_units(analysis, model, first, [0, 1], 0.05)
    start = reg.unit_norms(model).detach()
    descend(model, reg if regularise else None)
    end = reg.unit_norms(model).detach()
    ratio = end / start
    weak = ratio[:2]  # the planted units are the first two of the first group
    if regularise:
        assert (weak < 1e-2).all(), weak
        assert (ratio[2:] > 0.5).all(), ratio  # the strong ones survive
    else:
        assert (weak > 0.5).all(), weak


def test_residual_stream_is_regularised_as_one_unit():
    torch.manual_seed(0)
    model = randomise(Residual()).eval()
    analysis = analysed(model, (1, 3, 6, 6))
    reg = GroupLasso(analysis, 0.02)
    stream = next(g for g in analysis.groups if ("c1.weight", 0) in g.members)
    # one group: both branches' convs and norms, and both consumers of the sum
    params = dict(model.named_parameters())
    want = {("c1.weight", 0), ("c1.bias", 0), ("n1.weight", 0), ("n1.bias", 0),
            ("c2.weight", 0), ("c2.bias", 0), ("n2.weight", 0), ("n2.bias", 0),
            ("c3.weight", 1), ("fc.weight", 1)}
    assert {k for k in stream.members if k[0] in params} == want
    assert stream.size == 8 and not stream.blocked.any()

    def hand_norms():
        return torch.stack([torch.cat(hand_unit_slices(analysis, model, stream, c)).norm()
                            for c in stream.units])

    torch.testing.assert_close(reg.group_norms(model)[stream.index], hand_norms())
    plant_weak_units(analysis, model, stream, [2, 5], 0.05)
    start = {k: params[k[0]].detach().select(k[1], 2).norm() for k in want}
    start_norms = hand_norms().detach()
    descend(model, reg)
    torch.testing.assert_close(reg.group_norms(model)[stream.index], hand_norms())
    ratio = hand_norms().detach() / start_norms
    assert (ratio[[2, 5]] < 1e-2).all(), ratio
    assert (ratio[[0, 1, 3, 4, 6, 7]] > 0.5).all(), ratio
    # every member's slice of the planted channel shrank with it, on both branches
    for key in want:
        assert params[key[0]].detach().select(key[1], 2).norm() < 2e-2 * start[key], key


def test_fit_adds_the_regulariser():
    from structprune.accuracy.train import fit

    torch.manual_seed(0)
    batches = [(torch.randn(8, 3, 6, 6), torch.randint(0, 4, (8,))) for _ in range(4)]
    values = {}
    for strength in (0.0, 0.2):
        model = randomise(small_cnn())
        analysis = analysed(model, (1, 3, 6, 6))
        reg = BNL1(analysis, 1.0)
        before = float(reg(model))
        fit(model, batches, 5, lr=0.05, regularizer=BNL1(analysis, strength), progress=False)
        values[strength] = float(reg(model)) / before
    assert values[0.2] < 0.7 * values[0.0], values
