"""One small model per coupling; each must prune to the masked dense model, and the
groups must have the structure the coupling implies."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.core.capture import capture

from .oracles import check_pruned, randomize


def groups_of(model, inputs):
    return sp.analyse(capture(model, inputs)).groups


def group_with(groups, member):
    found = [g for g in groups if member in g.members]
    assert len(found) == 1, f"{member} in {len(found)} groups"
    return found[0]


def x4(c=3, s=8, n=2):
    return (torch.randn(n, c, s, s),)


def cbr(i, o, **kw):
    return nn.Sequential(nn.Conv2d(i, o, 3, padding=1, **kw), nn.BatchNorm2d(o), nn.ReLU())


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cbr(3, 16)
        self.a = cbr(16, 16)
        self.b = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16))
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.stem(x)
        y = self.b(self.a(x))
        return self.head(F.relu(x + y) - 0.5 * x)


def test_residual_add_couples_both_branches():
    model = randomize(Residual())
    g = group_with(groups_of(model, x4()), ("stem.0.weight", 0))
    assert ("b.0.weight", 0) in g.members and ("head.weight", 1) in g.members
    assert g.size == 16 and not g.blocked.any()
    inner = group_with(groups_of(model, x4()), ("a.0.weight", 0))
    assert ("b.0.weight", 1) in inner.members and ("stem.0.weight", 0) not in inner.members
    result = check_pruned(model, x4())
    assert result.model.stem[0].out_channels == 8 and result.model.head.in_channels == 8


class SE(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = cbr(3, 16)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.scale = nn.Parameter(torch.rand(1, 16, 1, 1) + 0.5)
        self.out = nn.Conv2d(16, 5, 1)

    def forward(self, x):
        x = self.conv(x)
        gate = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True)))))
        return self.out(x * gate * self.scale)


def test_se_gating_and_broadcast_parameter():
    model = randomize(SE())
    g = group_with(groups_of(model, x4()), ("conv.0.weight", 0))
    assert {("fc2.weight", 0), ("fc2.bias", 0), ("scale", 1), ("fc1.weight", 1)} <= set(g.members)
    result = check_pruned(model, x4())
    assert result.model.scale.shape == (1, 8, 1, 1)


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(3, 12)
        self.out = nn.Conv2d(8 + 12 + 8 + 3, 4, 1)

    def forward(self, x):
        a = self.a(x)
        return self.out(torch.cat([a, self.b(x), a, x], dim=1))


def test_concat_offsets_same_tensor_twice_and_the_input_itself():
    model = randomize(Concat())
    groups = groups_of(model, x4())
    ga = group_with(groups, ("a.0.weight", 0))
    gb = group_with(groups, ("b.0.weight", 0))
    assert ("out.weight", 1) in ga.members and ("out.weight", 1) in gb.members
    result = check_pruned(model, x4())
    # a kept 4 (used twice), b kept 6, the 3 input channels stay
    assert result.model.out.in_channels == 4 + 6 + 4 + 3
    cols = next(p for p in result.plan.params if p["name"] == "out.weight" and p["dim"] == 1)
    a_keep = [k for k in cols["keep"] if k < 8]
    assert [k - 20 for k in cols["keep"] if 20 <= k < 28] == a_keep
    assert cols["keep"][-3:] == [28, 29, 30]


class Split(nn.Module):
    def __init__(self, uneven):
        super().__init__()
        self.uneven = uneven
        self.a = cbr(3, 16)
        self.l = nn.Conv2d(4 if uneven else 8, 4, 1)
        self.r = nn.Conv2d(12 if uneven else 8, 4, 1)

    def forward(self, x):
        x = self.a(x)
        if self.uneven:
            left, right = torch.split(x, [4, 12], dim=1)
        else:
            left, right = x.chunk(2, dim=1)
        return self.l(left) + self.r(right)


def test_chunk_pairs_halves_and_uneven_split_is_left_unpruned():
    even = randomize(Split(False))
    g = group_with(groups_of(even, x4()), ("a.0.weight", 0))
    assert g.size == 8 and not g.blocked.any()  # channel i and 8+i go together
    result = check_pruned(even, x4())
    assert result.model.l.in_channels == result.model.r.in_channels == 4

    uneven = randomize(Split(True))
    g = group_with(groups_of(uneven, x4()), ("a.0.weight", 0))
    assert g.blocked.all() and any("hard-coded" in r for r in g.reasons)
    check_pruned(uneven, x4())


class FlattenHead(nn.Module):
    def __init__(self, hard_coded=False):
        super().__init__()
        self.hard_coded = hard_coded
        self.conv = cbr(3, 8)
        self.fc = nn.Linear(8 * 4 * 4, 6)
        self.cls = nn.Linear(6, 3)

    def forward(self, x):
        x = F.max_pool2d(self.conv(x), 2)
        x = x.view(-1, 128) if self.hard_coded else x.flatten(1)
        return self.cls(F.relu(self.fc(x)))


def test_flatten_into_linear_takes_channel_blocks():
    model = randomize(FlattenHead())
    g = group_with(groups_of(model, x4()), ("conv.0.weight", 0))
    assert ("fc.weight", 1) in g.members and g.size == 8
    result = check_pruned(model, x4())
    assert result.model.fc.in_features == 4 * 16
    cols = next(p for p in result.plan.params if p["name"] == "fc.weight" and p["dim"] == 1)
    channels = sorted({k // 16 for k in cols["keep"]})
    assert cols["keep"] == [c * 16 + s for c in channels for s in range(16)]


def test_hard_coded_view_is_left_unpruned():
    model = randomize(FlattenHead(hard_coded=True))
    g = group_with(groups_of(model, x4()), ("conv.0.weight", 0))
    assert g.blocked.all() and any("hard-coded" in r for r in g.reasons)
    result = check_pruned(model, x4())
    assert result.model.conv[0].out_channels == 8 and result.model.fc.out_features == 3


class Depthwise(nn.Module):
    def __init__(self, multiplier=1, groups=None):
        super().__init__()
        self.a = cbr(3, 8)
        g = groups or 8
        self.dw = nn.Conv2d(8, 8 * multiplier, 3, padding=1, groups=g)
        self.bn = nn.BatchNorm2d(8 * multiplier)
        self.pw = nn.Conv2d(8 * multiplier, 5, 1)

    def forward(self, x):
        return self.pw(F.relu(self.bn(self.dw(self.a(x)))))


@pytest.mark.parametrize("multiplier,groups,unit", [(1, None, 1), (3, None, 1), (2, 4, 2)])
def test_depthwise_multiplier_and_grouped_conv_lose_whole_groups(multiplier, groups, unit):
    model = randomize(Depthwise(multiplier, groups))
    g = group_with(groups_of(model, x4()), ("a.0.weight", 0))
    assert ("dw.weight", 0) in g.members and ("pw.weight", 1) in g.members
    assert g.size == 8 // unit and g.width == unit
    result = check_pruned(model, x4())
    dw = result.model.dw
    assert dw.in_channels == 4 and dw.out_channels == 4 * multiplier
    assert dw.groups == (groups or 8) // 2 and dw.weight.shape[1] == 8 // (groups or 8)


class Shuffle(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(3, 8)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        y = torch.cat([self.a(x), self.b(x)], 1)
        n, c, h, w = y.size()
        y = y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)
        return self.out(y)


def test_channel_shuffle_is_a_permutation():
    model = randomize(Shuffle())
    groups = groups_of(model, x4())
    ga = group_with(groups, ("a.0.weight", 0))
    assert ("b.0.weight", 0) in ga.members  # channel i of a and of b land side by side
    result = check_pruned(model, x4())
    cols = next(p for p in result.plan.params if p["name"] == "out.weight" and p["dim"] == 1)
    assert all(k % 2 == 0 and k + 1 in cols["keep"] for k in cols["keep"][::2])


class SharedConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(3, 8)
        self.shared = nn.Conv2d(8, 6, 3, padding=1)
        self.out = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.out(self.shared(self.a(x)) + self.shared(self.b(x)))


def test_module_called_twice_couples_its_inputs():
    model = randomize(SharedConv())
    g = group_with(groups_of(model, x4()), ("a.0.weight", 0))
    assert ("b.0.weight", 0) in g.members and ("shared.weight", 1) in g.members
    check_pruned(model, x4())


class BareParams(nn.Module):
    def __init__(self):
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8) * 0.1)
        self.w2 = nn.Parameter(torch.randn(6, 8) * 0.3)

    def forward(self, x):
        y = F.relu(F.conv2d(x, self.w1, self.b1, padding=1))
        return F.linear(y.mean((2, 3)), self.w2)


def test_bare_parameters_through_functional_calls():
    model = BareParams()
    g = group_with(groups_of(model, x4()), ("w1", 0))
    assert set(g.members) == {("w1", 0), ("b1", 0), ("w2", 1)}
    result = check_pruned(model, x4(), weight_oracle=False)
    assert result.model.w1.shape == (4, 3, 3, 3) and result.model.w2.shape == (6, 4)


class MultiIO(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.b = cbr(2, 8)
        self.mix = cbr(8, 8)
        self.head = nn.Conv2d(8, 3, 1)

    def forward(self, x, y):
        z = self.mix(self.a(x) + self.b(y))
        return {"logits": self.head(z), "features": (z, self.a(x))}


def test_several_inputs_and_dict_outputs_keep_output_channels():
    model = randomize(MultiIO())
    inputs = (torch.randn(2, 3, 8, 8), torch.randn(2, 2, 8, 8))
    groups = groups_of(model, inputs)
    assert group_with(groups, ("mix.0.weight", 0)).blocked.all()  # reaches an output
    assert group_with(groups, ("a.0.weight", 0)).blocked.all()
    check_pruned(model, inputs)


class Norms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.b = nn.Conv2d(16, 12, 3, padding=1)
        self.ln = nn.LayerNorm(12)
        self.c = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        y = self.b(F.relu(self.gn(self.a(x))))
        y = self.ln(y.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        return self.c(y)


def test_group_norm_loses_whole_groups_and_layer_norm_is_approximate():
    model = randomize(Norms())
    groups = groups_of(model, x4())
    gn = group_with(groups, ("a.weight", 0))
    assert gn.size == 4 and gn.width == 4 and not gn.approximate.any()
    ln = group_with(groups, ("b.weight", 0))
    assert ln.approximate.all() and any("LayerNorm" in r for r in ln.reasons)
    exact = check_pruned(model, x4(), exact_only=True)
    assert exact.model.gn.num_groups == 2 and exact.model.gn.num_channels == 8
    assert exact.model.b.out_channels == 12
    default = sp.prune(model, x4(), 0.5)
    assert default.model.ln.normalized_shape == (6,)
    assert default.figures["approximate_groups_pruned"] == 1


class Mixers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.b = cbr(3, 8)
        self.c = cbr(3, 8)
        self.d = nn.Conv2d(4, 4, 3, padding=1)
        self.out = nn.Conv2d(16 + 4 + 4, 3, 1)

    def forward(self, x):
        a = self.a(x)
        attention = torch.softmax(a, dim=1)  # mixes channels
        ps = F.pixel_shuffle(self.b(x), 2)  # 8 -> 2 channels at 2x
        glu = F.glu(self.c(x), dim=1)  # 8 -> 4
        ps = F.avg_pool2d(ps, 2).repeat(1, 2, 1, 1)
        return self.out(torch.cat([a * attention, ps, self.d(glu)], 1))


def test_softmax_pixel_shuffle_glu():
    model = randomize(Mixers())
    groups = groups_of(model, x4())
    assert group_with(groups, ("a.0.weight", 0)).approximate.all()
    ps = group_with(groups, ("b.0.weight", 0))
    assert ps.size == 2 and ps.width == 2  # 4 inputs per output channel, repeated twice after
    glu = group_with(groups, ("c.0.weight", 0))
    assert glu.size == 4 and ("d.weight", 1) in glu.members
    result = check_pruned(model, x4(), exact_only=True, weight_oracle=False)
    assert result.model.c[0].out_channels == 4 and result.model.d.in_channels == 2


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.aux = nn.Conv2d(8, 8, 1)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        y = self.a(x)
        unused = self.aux(y.detach())  # noqa: F841 - a branch nobody reads
        return self.out(y)


def test_detached_and_dead_branches():
    model = randomize(Detached())
    g = group_with(groups_of(model, x4()), ("aux.weight", 0))
    assert not g.blocked.any()
    result = check_pruned(model, x4())
    assert result.model.aux.out_channels == 4 and result.model.aux.in_channels == 4


class Layers1d3dTransposed(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm1d(8)
        self.c1b = nn.Conv1d(8, 4, 1)
        self.c3 = nn.Conv3d(1, 6, 3, padding=1)
        self.c3b = nn.Conv3d(6, 2, 1)
        self.up = nn.ConvTranspose2d(4, 10, 2, stride=2)
        self.up_g = nn.ConvTranspose2d(10, 6, 2, stride=2, groups=2)
        self.out = nn.Conv2d(6, 3, 1)

    def forward(self, x):
        seq = self.c1b(F.relu(self.bn1(self.c1(x.mean(3)))))  # [N, 4, 8]
        vol = self.c3b(F.relu(self.c3(x[:, :1].unsqueeze(1))))  # [N, 2, 1, 8, 8]
        img = seq.unsqueeze(-1) * vol.mean((1, 2)).unsqueeze(1)  # [N, 4, 8, 8]
        return self.out(F.interpolate(self.up_g(self.up(img)), size=(8, 8)))


def test_conv1d_conv3d_and_transposed_convs():
    model = randomize(Layers1d3dTransposed())
    groups = groups_of(model, x4())
    assert not group_with(groups, ("c1.weight", 0)).blocked.any()
    assert not group_with(groups, ("c3.weight", 0)).blocked.any()
    up = group_with(groups, ("up.weight", 1))
    assert ("up_g.weight", 0) in up.members and up.width == 3 and up.size == 2
    result = check_pruned(model, x4(), weight_oracle=False)
    assert result.model.up_g.groups == 1 and result.model.up_g.out_channels == 3


class Unknown(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(torch.fft.fft2(self.a(x)).real)


def test_unknown_op_leaves_its_channels_unpruned():
    model = randomize(Unknown())
    g = group_with(groups_of(model, x4()), ("a.0.weight", 0))
    assert g.blocked.all() and any("no channel rule" in r for r in g.reasons)


class Gate(nn.Module):
    def forward(self, x):
        return x * torch.sigmoid(x.mean((2, 3), keepdim=True))


class WithCustomLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cbr(3, 8)
        self.gate = Gate()
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x):
        return self.out(self.gate(self.a(x)))


def test_user_registered_rule_for_a_leaf_module():
    registry = sp.DEFAULT_REGISTRY.copy()
    registry.op(Gate, rule=lambda ctx, module, x: ctx.result(x.maps))
    model = randomize(WithCustomLeaf())
    cap = capture(model, x4(), registry=registry)
    assert any(n.op == "call_module" and n.target == "gate" for n in cap.graph.nodes)
    g = group_with(sp.analyse(cap, registry).groups, ("a.0.weight", 0))
    assert not g.blocked.any()
    result = sp.prune(model, x4(), 0.5, registry=registry)
    assert result.verification.ok and result.model.out.in_channels == 4


def test_leaf_module_without_a_rule_is_opaque():
    model = randomize(WithCustomLeaf())
    cap = capture(model, x4(), leaf_modules=[Gate])
    assert any(n.op == "call_module" and n.target == "gate" for n in cap.graph.nodes)
    g = group_with(sp.analyse(cap).groups, ("a.0.weight", 0))
    assert g.blocked.all() and any("no channel rule for Gate" in r for r in g.reasons)
    result = sp.prune(model, x4(), 0.5, leaf_modules=[Gate])
    assert result.verification.ok and result.model.a[0].out_channels == 8


class MixedParts(nn.Module):
    """Like timm's MixedConv2d: uneven parts by a sizes attribute, one conv per part."""

    def __init__(self):
        super().__init__()
        self.a = cbr(3, 16)
        self.parts = nn.ModuleList([nn.Conv2d(2, 2, 3, padding=1, groups=2),
                                    nn.Conv2d(6, 4, 5, padding=2), nn.Conv2d(8, 8, 1)])
        self.splits = [2, 6, 8]
        self.out = nn.Conv2d(14, 3, 1)

    def forward(self, x):
        pieces = torch.split(self.a(x), self.splits, dim=1)
        return self.out(torch.cat([conv(pieces[i]) for i, conv in enumerate(self.parts)], dim=1))


def _resize_mixed_parts(module: MixedParts) -> None:
    module.splits = [conv.in_channels for conv in module.parts]


def test_split_by_sizes_a_resizer_maintains_is_pruned_part_by_part():
    blocked = randomize(MixedParts())
    g = group_with(groups_of(blocked, x4()), ("a.0.weight", 0))
    assert g.blocked.all() and any("hard-coded" in r for r in g.reasons)

    registry = sp.DEFAULT_REGISTRY.copy()
    registry.op(MixedParts, resize=_resize_mixed_parts, maintains=("splits",))
    model = randomize(MixedParts())
    groups = [g for g in sp.analyse(capture(model, x4(), registry=registry), registry).groups
              if ("a.0.weight", 0) in g.members]
    assert sorted(g.size for g in groups) == [2, 6, 8]  # one group per part
    assert [g.blocked.sum() for g in groups] == [1, 1, 1]  # its first channel stays
    result = check_pruned(model, x4(), 0.6, registry=registry)
    pruned = result.model
    assert pruned.splits == [c.in_channels for c in pruned.parts]
    assert sum(pruned.splits) == pruned.a[0].out_channels < 16
    assert all(s >= 1 for s in pruned.splits)
    again = sp.apply_plan(randomize(MixedParts()), result.plan, registry=registry)
    assert again.splits == pruned.splits and again(x4()[0]).shape == (2, 3, 8, 8)
    exported = check_pruned(model, x4(), 0.6, registry=registry, capture_method="export")
    assert exported.figures["capture"] == "export" and exported.plan.params == result.plan.params


class BufferScale(nn.Module):
    """Per-channel statistics kept as buffers and read in forward, as FrozenBatchNorm2d does."""

    def __init__(self, channels):
        super().__init__()
        self.register_buffer("scale", torch.rand(channels) + 0.5)
        self.register_buffer("shift", torch.randn(channels))

    def forward(self, x):
        return x * self.scale.reshape(1, -1, 1, 1) + self.shift.reshape(1, -1, 1, 1)


def test_buffers_read_in_forward_are_sliced_with_their_channels():
    from torchvision.ops import FrozenBatchNorm2d

    model = randomize(nn.Sequential(nn.Conv2d(3, 16, 3), BufferScale(16), nn.ReLU(),
                                    nn.Conv2d(16, 8, 3), FrozenBatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 4, 1)))
    result = check_pruned(model, x4())
    pruned = result.model
    assert pruned[1].scale.shape == pruned[1].shift.shape == (pruned[0].out_channels,) == (8,)
    assert pruned[4].running_var.shape == (pruned[3].out_channels,) == (4,)
    names = {p["name"] for p in result.plan.params}
    assert {"1.scale", "1.shift", "4.weight", "4.bias", "4.running_mean", "4.running_var"} <= names


class ConvAttention(nn.Module):
    """Multi-head attention over pixels, heads laid out by a view of conv outputs."""

    def __init__(self, c=32, head_dim=8):
        super().__init__()
        self.head_dim = head_dim
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.q, self.k, self.v, self.o = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x):
        x = self.stem(x)
        b, _, h, w = x.shape
        q, k, v = (f(x).view(b, -1, self.head_dim, h * w) for f in (self.q, self.k, self.v))
        attention = (q.transpose(-2, -1) @ k).softmax(-1)
        return self.o((v @ attention.transpose(-2, -1)).reshape(b, -1, h, w))


def test_attention_heads_are_pruned_together_across_q_k_v():
    model = randomize(ConvAttention()).eval()
    heads = group_with(groups_of(model, x4()), ("q.weight", 0))
    assert ("k.weight", 0) in heads.members and ("v.weight", 0) in heads.members
    assert ("o.weight", 1) in heads.members and heads.size == 4 and heads.width == 8
    result = check_pruned(model, x4(), exact_only=True)
    assert result.model.q.out_channels == result.model.v.out_channels == \
        result.model.o.in_channels == 16


class SizeFromOther(nn.Module):
    """A reshape of one tensor to a channel count read from another."""

    def __init__(self, halve=False):
        super().__init__()
        self.halve = halve
        self.a, self.b = nn.Conv2d(3, 16, 3, padding=1), nn.Conv2d(16, 16, 1)
        self.c, self.d = nn.Conv2d(16, 4, 1), nn.Conv2d(16, 4, 1)

    def forward(self, x):
        x = self.a(x)
        b, c, h, w = x.shape
        if self.halve:  # arithmetic on the size: kept as it is
            y = self.b(x).flatten(2).reshape(b, c // 2, 2, h * w).flatten(1, 2)
        else:
            y = self.b(x).flatten(2).reshape(b, c, h, w)
        return self.c(y.reshape(b, -1, h, w)) + self.d(x)


def test_a_size_read_from_another_tensor_ties_or_keeps_both():
    tied = randomize(SizeFromOther()).eval()
    group = group_with(groups_of(tied, x4()), ("a.weight", 0))
    assert ("b.weight", 0) in group.members and not group.blocked.any()
    for settings in ({"global_ranking": True}, {"ratios": {"a": 0.25}}):
        result = check_pruned(tied, x4(), **settings)
        assert result.model.a.out_channels == result.model.b.out_channels < 16

    halved = randomize(SizeFromOther(halve=True)).eval()
    groups = groups_of(halved, x4())
    assert group_with(groups, ("a.weight", 0)).blocked.all()
    assert group_with(groups, ("b.weight", 0)).blocked.all()
    check_pruned(halved, x4(), global_ranking=True)


class CountScaled(nn.Module):
    """Scales by a number computed from the channel count, as attention does."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = cbr(3, 16), cbr(3, 16), nn.Conv2d(32, 4, 1)

    def forward(self, x):
        y = self.a(x)
        z = self.b(x)
        return self.c(torch.cat([y * y.shape[1] ** -0.5, z], 1))


def test_channels_whose_count_is_used_as_a_number_are_kept():
    model = randomize(CountScaled()).eval()
    groups = groups_of(model, x4())
    counted = group_with(groups, ("a.0.weight", 0))
    assert counted.blocked.all() and any("used as a number" in r for r in counted.reasons)
    assert not group_with(groups, ("b.0.weight", 0)).blocked.any()
    check_pruned(model, x4())
