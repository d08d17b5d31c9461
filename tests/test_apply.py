import copy
import io
import json

import pytest
import torch
import torch.nn as nn
import torchvision

import structprune as sp
from structprune.core.capture import capture

from .oracles import randomize


def test_pruned_module_is_consistent_and_usable(tmp_path):
    model = randomize(torchvision.models.mobilenet_v2(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    result = sp.prune(model, (x,), 0.5)
    pruned = result.model
    assert type(pruned) is type(model)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels
            assert m.weight.shape[1] * m.groups == m.in_channels
        if isinstance(m, nn.BatchNorm2d):
            assert m.weight.shape[0] == m.num_features == m.running_var.shape[0]
        if isinstance(m, nn.Linear):
            assert m.weight.shape == (m.out_features, m.in_features)
    assert "Conv2d" in repr(pruned)
    capture(pruned, (x,))  # traces again
    buffer = io.BytesIO()
    torch.save(pruned, buffer)
    buffer.seek(0)
    reloaded = torch.load(buffer, weights_only=False)
    with torch.no_grad():
        assert torch.allclose(reloaded.eval()(x), pruned.eval()(x))
    pruned.train()
    optimizer = torch.optim.SGD(pruned.parameters(), lr=0.1)
    loss = pruned(x).logsumexp(1).mean()
    loss.backward()
    optimizer.step()
    assert all(p.grad is not None for p in pruned.parameters())


def test_copy_by_default_and_in_place_on_request():
    model = randomize(torchvision.models.resnet18(num_classes=10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = (torch.randn(1, 3, 32, 32),)
    result = sp.prune(model, x, 0.5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert result.model is not model
    in_place = sp.prune(model, x, 0.5, inplace=True)
    assert in_place.model is model and model.conv1.out_channels == 32
    assert in_place.verification.ok
    assert in_place.figures["macs_ratio"] == pytest.approx(result.figures["macs_ratio"])
    assert in_place.figures["params_dense"] == result.figures["params_dense"]


def test_tied_weights_stay_tied():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 8)
            self.b = nn.Linear(8, 6)
            self.c = nn.Linear(6, 8)
            self.c.weight = self.a.weight
            self.out = nn.Linear(8, 2)

        def forward(self, x):
            return self.out(torch.relu(self.a(x)) + torch.relu(self.c(torch.relu(self.b(self.a(x))))))

    model = Tied()
    result = sp.prune(model, (torch.randn(3, 6),), 0.5)
    assert result.model.a.weight is result.model.c.weight
    assert result.verification.ok


def test_the_copy_shares_no_mutable_state_with_the_original():
    model = randomize(torchvision.models.resnet18(num_classes=10)).eval()
    calls = []
    model.conv1.register_forward_hook(lambda *_: calls.append("original"))
    pruned = sp.prune(model, (torch.randn(1, 3, 32, 32),), 0.5).model
    pruned.conv1.register_forward_hook(lambda *_: calls.append("copy"))
    # tables that were empty in the original are the copy's own too (the memo makes them)
    pruned.bn1.register_forward_pre_hook(lambda *_: calls.append("copy"))
    pruned.layer1[0].conv2.register_forward_hook(lambda *_: calls.append("copy"))
    pruned.fc.extra = 1  # a new attribute on the copy only
    calls.clear()
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    assert calls == ["original"] and not hasattr(model.fc, "extra")
    assert type(pruned.conv1) is nn.Conv2d and pruned.conv1.padding_mode == "zeros"
    assert all(p.data_ptr() != q.data_ptr() for p, q in
               zip(pruned.state_dict().values(), model.state_dict().values(), strict=True))


class WeightlessNorms(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(16)
        self.bn = nn.BatchNorm2d(16, affine=False, track_running_stats=False)
        self.b = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        return self.b(torch.relu(self.bn(self.inorm(self.a(x)))))


def test_norms_without_tensors_get_their_channel_count_from_the_plan(tmp_path):
    import warnings

    model = randomize(WeightlessNorms()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    result = sp.prune(model, x, 0.5)
    pruned = result.model
    assert pruned.inorm.num_features == pruned.bn.num_features == pruned.a.out_channels == 8
    assert {(a["module"], a["attr"], a["value"]) for a in result.plan.attributes} == \
        {("inorm", "num_features", 8), ("bn", "num_features", 8)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # InstanceNorm warns on a num_features mismatch
        pruned(*x)
    path = tmp_path / "plan.json"
    result.plan.save(path)
    again = sp.apply_plan(randomize(WeightlessNorms()), sp.Plan.load(path))
    assert again.inorm.num_features == again.bn.num_features == 8
    data = json.loads(path.read_text())
    data["attributes"][0]["module"] = "nothing"
    path.write_text(json.dumps(data))
    with pytest.raises(sp.PlanError, match="different model"):
        sp.apply_plan(WeightlessNorms(), sp.Plan.load(path))


def test_weights_cut_on_both_axes_keep_exactly_the_listed_slices():
    """A weight cut on its output and input axes keeps the rows and columns the plan lists,
    in order, against a numpy reference."""
    gen = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(10, 12, 3))
    with torch.no_grad():
        model[0].weight.copy_(torch.randn(12, 10, 3, 3, generator=gen))
    rows, columns = [0, 3, 4, 11], [1, 2, 7, 9]
    plan = sp.Plan([{"name": "0.weight", "dim": 0, "size": 12, "keep": rows},
                    {"name": "0.weight", "dim": 1, "size": 10, "keep": columns},
                    {"name": "0.bias", "dim": 0, "size": 12, "keep": rows}])
    pruned = sp.apply_plan(model, plan)
    got = pruned[0].weight.detach()
    want = model[0].weight.detach().numpy()[rows][:, columns]
    assert got.is_contiguous() and tuple(got.shape) == (4, 4, 3, 3)
    assert (got.numpy() == want).all()
    assert (pruned[0].in_channels, pruned[0].out_channels) == (4, 4)
    assert model[0].weight.shape == (12, 10, 3, 3)  # the dense model is untouched


class CopiesItself(nn.Module):
    """A module whose own __deepcopy__ ignores deepcopy's memo."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x))

    def __deepcopy__(self, memo):
        new = CopiesItself.__new__(CopiesItself)
        new.__dict__ = copy.deepcopy(self.__dict__)
        return new


def test_a_module_that_copies_itself_without_the_memo_is_still_pruned():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), CopiesItself(), nn.Conv2d(8, 2, 1)).eval()
    result = sp.prune(model, (torch.randn(1, 3, 6, 6),), 0.5)
    assert result.verification.ok
    assert result.model[1].conv.weight.shape == (4, 4, 3, 3)
    assert model[1].conv.weight.shape == (8, 8, 3, 3)
