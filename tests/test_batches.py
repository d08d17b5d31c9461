"""The batch contract (structprune.batches): each form a batch may take, the rule that tells
(inputs, targets) from two inputs, and every form through the real users (the gradient and
activation criteria, recovery, training, evaluation, the data sources' class count), each
checked against the same numbers from another form."""

from __future__ import annotations

import copy
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.accuracy.data import from_factory
from structprune.accuracy.evaluate import predict
from structprune.accuracy.recover import output_mse, recover
from structprune.accuracy.train import fit
from structprune.batches import (
    Inputs,
    call,
    device_of,
    first_tensor,
    labelled,
    split,
    take,
    to_device,
)
from structprune.core.analyse import analyse
from structprune.core.capture import capture
from structprune.core.score import score
from structprune.errors import PlanError, StructPruneError


class Single(nn.Module):
    """conv-BN-relu, pooled, a linear head: one input ``x``."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class Gained(Single):
    """The same, its scores scaled per sample by a float second input ``gain``."""

    def forward(self, x: torch.Tensor, gain: torch.Tensor) -> torch.Tensor:
        return super().forward(x) * gain[:, None]


def _model(cls: type[nn.Module], seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = cls().double()
    with torch.no_grad():  # statistics away from the defaults, so that recovery moves them
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model.eval()


def _data(count: int = 3, size: int = 5, seed: int = 1) -> list[tuple[torch.Tensor, ...]]:
    """(x, gain, labels) triples."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, 3, 4, 4, generator=gen, dtype=torch.float64),
             torch.rand(size, generator=gen, dtype=torch.float64) + 0.5,
             torch.randint(0, 4, (size,), generator=gen)) for _ in range(count)]


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message, message
    return message


# ------------------------------------------------------------------------------ the contract


def test_each_form_splits_into_model_arguments_and_targets():
    x, g, y = _data(1)[0]
    arrays = split((x.numpy(), y.numpy()))
    cases = {
        "tensor": (x, (x,), {}, None),
        "dict": ({"x": x, "gain": g}, (), {"x": x, "gain": g}, None),
        "inputs": ((x, g, x), (x, g, x), {}, None),
        "list of inputs": ([x], (x,), {}, None),
        "pair": ((x, y), (x,), {}, y),
        "list pair": ([x, y], (x,), {}, y),
        "explicitly no targets": ((x, None), (x,), {}, None),
        "grouped inputs": (((x, g), y), (x, g), {}, y),
        "grouped, float targets": (((x,), g), (x,), {}, g),
        "dict and targets": (({"x": x}, y), (), {"x": x}, y),
    }
    for name, (batch, args, kwargs, targets) in cases.items():
        inputs, got = split(batch)
        assert len(inputs.args) == len(args) and set(inputs.kwargs) == set(kwargs), name
        assert all(a is b for a, b in zip(inputs.args, args, strict=True)), name
        assert all(inputs.kwargs[k] is v for k, v in kwargs.items()), name
        assert got is targets, name
    # numpy arrays count as tensors
    assert torch.equal(arrays[0].args[0], x) and np.array_equal(arrays[1], y.numpy())
    # already split: as it is
    assert split(Inputs((x,))) == (Inputs((x,)), None)


def test_a_pair_is_inputs_and_targets_only_when_the_second_item_is_labels_or_none():
    x, g, y = _data(1)[0]
    for labels in (y, y.int(), y.to(torch.uint8), y.numpy(), None):
        assert split((x, labels))[0].args == (x,)  # class labels (or None): targets
    for second in (g, g.float(), y.bool(), g.numpy(), 2.0, "mode"):
        inputs, targets = split((x, second))  # anything else: a second input
        assert targets is None and len(inputs.args) == 2 and inputs.args[0] is x
    # an integer second *input* is passed grouped (with or without targets) or by name
    assert split(((x, y), None))[0].args == (x, y)
    assert split({"x": x, "ids": y})[0].kwargs == {"x": x, "ids": y}


def test_what_is_not_a_batch_and_missing_targets_are_one_line():
    for bad, kind in (("images", "a str"), (3, "an int"), ([], "an empty list"),
                      ({}, "an empty dict"), (None, "a NoneType"),
                      ({1: 2}, "a dict with keys that are not names")):
        with pytest.raises(StructPruneError) as error:
            split(bad)
        assert _one_line(error).startswith(f"a batch is {kind}: give a tensor"), bad
    x, g, _ = _data(1)[0]
    for unlabelled in (x, (x, g), [x], {"x": x}, (x, None)):
        with pytest.raises(PlanError) as error:
            labelled(unlabelled, "training", error=PlanError)
        assert _one_line(error).startswith("training needs targets, but a batch has none: "
                                           "give (inputs, targets) pairs")
    with pytest.raises(StructPruneError, match="a tensor of class labels, not a dict"):
        labelled(((x,), {"boxes": x}), "evaluation")


def test_take_takes_the_first_batches_as_given():
    data = _data(10)
    assert take(data) == data and take(data, 3) == data[:3]
    assert take(iter(data)) == data[:8]  # not a list: 8 at most
    with pytest.raises(PlanError, match="^number of calibration batches 0 must be 1 or more$"):
        take(data, 0, error=PlanError)
    for bad, message in (([], "the data gave no batches"), (data[0][0], "not batches"),
                         ([1], "a batch is an int")):
        with pytest.raises(StructPruneError, match=message):
            take(bad)


def test_to_device_moves_every_nested_tensor_and_keeps_the_structure():
    Pair = namedtuple("Pair", "a b")
    x = torch.ones(2)
    value = ({"a": [x, 3, "s"], "b": Pair(x, None)}, (x,), x)
    moved = to_device(value, "meta")
    assert moved[0]["a"][0].is_meta and moved[0]["a"][1:] == [3, "s"]
    assert isinstance(moved[0]["b"], Pair) and moved[0]["b"].a.is_meta and moved[0]["b"].b is None
    assert isinstance(moved[1], tuple) and moved[1][0].is_meta and moved[2].is_meta
    assert to_device(value, None) is value
    inputs = Inputs((x, 1), {"gain": x}).to("meta")
    assert inputs.args[0].is_meta and inputs.args[1] == 1 and inputs.kwargs["gain"].is_meta
    assert not x.is_meta  # nothing moved in place


def test_device_of_a_model():
    assert device_of(nn.Linear(2, 2)) == torch.device("cpu")
    assert device_of(nn.BatchNorm1d(2, affine=False)) == torch.device("cpu")  # buffers only
    assert device_of(nn.ReLU()) is None
    assert device_of(nn.Linear(2, 2, device="meta")) == torch.device("meta")


@dataclass
class _Output:
    loss: float
    logits: torch.Tensor


def test_first_tensor_of_every_output_form():
    a, b = torch.randn(2, 3), torch.randn(2, 5)
    for output in (a, (a, b), ["text", a, b], {"logits": a, "aux": b}, (a, [b, b]),
                   ([a, b], b), ((None, {"y": a}), b), _Output(0.5, a)):
        assert first_tensor(output) is a, output
    with pytest.raises(PlanError) as error:
        first_tensor(("no", 1, None), error=PlanError)
    assert "the model's output (tuple) holds no tensor" in _one_line(error)


def test_call_runs_a_model_on_each_form_of_its_inputs():
    model = _model(Gained)
    x, g, y = _data(1)[0]
    want = model(x, g)
    for batch in ((x, g), [x, g], ((x, g), y), ((x, g), None), {"x": x, "gain": g},
                  ({"gain": g, "x": x}, y), (x.numpy(), g.numpy())):
        torch.testing.assert_close(call(model, batch), want, rtol=0, atol=0)


# ----------------------------------------------------------------------- through the criteria


@pytest.mark.parametrize("criterion", ["taylor", "gradient"])
def test_gradient_criteria_score_every_form_alike(criterion):
    model = _model(Single)
    data = _data()
    analysis = analyse(capture(model, (data[0][0],)))
    groups = [group for group in analysis.groups if (~group.blocked).any()]
    assert groups

    def scores(batches):
        return score(analysis, criterion, groups, data=batches, normalize="none")

    want = scores([(x, y) for x, _, y in data])
    forms = {
        "list pair": [[x, y] for x, _, y in data],
        "grouped": [((x,), y) for x, _, y in data],
        "dict": [({"x": x}, y) for x, _, y in data],
        "numpy": [(x.numpy(), y.numpy()) for x, _, y in data],
        "int32 labels": [(x, y.int()) for x, _, y in data],
    }
    for name, batches in forms.items():
        got = scores(batches)
        for group in groups:
            np.testing.assert_allclose(got[group.index], want[group.index], rtol=1e-12,
                                       err_msg=name)
    # inputs alone, or two inputs: no targets to take a loss of
    # inputs alone: no targets, so the loss is taken against the dense model's own outputs
    # (tests/test_criteria.py checks those scores against hand computations)
    label_free = scores([x for x, _, _ in data])
    for group in groups:
        assert np.isfinite(label_free[group.index]).all() and label_free[group.index].any()


def _per_unit(analysis, group, name: str, dim: int, values: torch.Tensor) -> np.ndarray:
    """``values`` (one a slot of member (name, dim)) summed into the group's units."""
    where = {int(c): i for i, c in enumerate(group.units)}
    total = np.zeros(group.size)
    for slot, component in enumerate(analysis.component[analysis.slots[(name, dim)]]):
        if int(component) in where:
            total[where[int(component)]] += float(values[slot])
    return total


def test_gradient_criteria_on_two_inputs_grouped_or_by_name():
    model = _model(Gained)
    data = _data()
    analysis = analyse(capture(model, (data[0][0], data[0][1])))
    group = next(gr for gr in analysis.groups if ("conv.weight", 0) in gr.members)
    assert (~group.blocked).all()
    grouped = score(analysis, "taylor", [group], normalize="none",
                    data=[((x, g), y) for x, g, y in data])[group.index]
    named = score(analysis, "taylor", [group], normalize="none",
                  data=[({"gain": g, "x": x}, y) for x, g, y in data])[group.index]
    # reference: |sum of W * dL/dW| over the group's parameter slices, L the cross-entropy
    # summed over the batches, differentiated by autograd
    params = dict(model.named_parameters())
    loss = sum(F.cross_entropy(model(x, g), y) for x, g, y in data)
    grads = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    want = np.zeros(group.size)
    for name, dim in group.members:
        if name in params:
            products = (params[name] * grads[name]).detach().movedim(dim, 0)
            want += _per_unit(analysis, group, name, dim, products.reshape(len(products), -1)
                              .sum(1))
    np.testing.assert_allclose(grouped, np.abs(want), rtol=1e-8)
    np.testing.assert_array_equal(named, grouped)


def test_activation_takes_inputs_alone_in_every_form():
    model = _model(Gained)
    data = _data()
    analysis = analyse(capture(model, (data[0][0], data[0][1])))
    groups = [group for group in analysis.groups if (~group.blocked).any()]
    # reference: the mean |input| of fc (the pooled conv channels), by a hook
    seen = []
    hook = model.fc.register_forward_pre_hook(lambda m, args: seen.append(args[0].abs()))
    with torch.no_grad():
        for x, g, _ in data:
            model(x, g)
    hook.remove()
    group = next(gr for gr in groups if ("fc.weight", 1) in gr.members)
    want = torch.cat(seen).mean(0).numpy()
    forms = {
        "two inputs": [(x, g) for x, g, _ in data],
        "dict": [{"x": x, "gain": g} for x, g, _ in data],
        "dict in another order": [{"gain": g, "x": x} for x, g, _ in data],
        "grouped, no targets": [((x, g), None) for x, g, _ in data],
        "grouped with targets": [((x, g), y) for x, g, y in data],
    }
    for name, batches in forms.items():
        got = score(analysis, "activation", [group], data=batches, normalize="none")
        np.testing.assert_allclose(got[group.index], want, rtol=1e-10, err_msg=name)
    with pytest.raises(PlanError, match="the batch's keyword inputs do not fit"):
        score(analysis, "activation", [group], data=[{"x": data[0][0], "scale": data[0][1]}])


# ------------------------------------------------------------------------------- recovery


@pytest.fixture(scope="module")
def pruned_gained():
    dense = _model(Gained)
    data = _data(4, size=8)
    result = sp.prune(dense, (data[0][0], data[0][1]), 0.5)
    return dense, result, data


@pytest.mark.parametrize("method", ["bn", ["bias", "bn"], "lsq"])
def test_recovery_gives_the_same_model_from_every_form(pruned_gained, method):
    dense, result, data = pruned_gained

    def recovered(batches):
        pruned = copy.deepcopy(result.model)
        report = recover(pruned, dense, result.plan, result.analysis, batches, method,
                         memory_budget="1G")  # the default depends on the memory free now
        return pruned.state_dict(), report

    want, want_report = recovered([(x, g) for x, g, _ in data])
    assert want_report["layers"]
    forms = {
        "list": [[x, g] for x, g, _ in data],
        "dict": [{"x": x, "gain": g} for x, g, _ in data],
        "grouped with targets": [((x, g), y) for x, g, y in data],
        "grouped, no targets": [((x, g), None) for x, g, _ in data],
        "numpy": [(x.numpy(), g.numpy()) for x, g, _ in data],
    }
    for name, batches in forms.items():
        got, report = recovered(batches)
        assert report == want_report, name
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=0, atol=0, msg=name)


def test_recovery_of_a_one_input_model_from_a_bare_tensor_and_a_pair():
    dense = _model(Single)
    data = _data(4, size=8)
    result = sp.prune(dense, (data[0][0],), 0.5)
    got = {}
    for name, batches in (("tensor", [x for x, _, _ in data]),
                          ("pair", [(x, y) for x, _, y in data]),
                          ("dict", [{"x": x} for x, _, _ in data])):
        pruned = copy.deepcopy(result.model)
        report = recover(pruned, dense, result.plan, result.analysis, batches, "bn")
        got[name] = pruned.bn.running_var.clone()
        # the data's statistics take the outputs away from the dense model's (whose
        # statistics are random) on the check batch: recovery undoes the step (issue 24)
        assert "undone" in report["steps"][0]
        assert torch.equal(got[name], result.model.bn.running_var)
    assert torch.equal(got["tensor"], got["pair"]) and torch.equal(got["tensor"], got["dict"])
    assert output_mse(result.model, dense, [x for x, _, _ in data]) == \
        output_mse(result.model, dense, [({"x": x}, None) for x, _, _ in data])


# ---------------------------------------------------------------------- training, evaluation


def _trained(batches, seed: int = 0) -> dict[str, torch.Tensor]:
    model = _model(Single, seed=3)
    fit(model, batches, 2, lr=0.05, seed=seed, progress=False)
    return model.state_dict()


def test_training_gives_the_same_weights_from_every_form():
    data = _data(3)
    want = _trained([(x, y) for x, _, y in data])
    forms = {
        "list pair": [[x, y] for x, _, y in data],
        "grouped": [((x,), y) for x, _, y in data],
        "dict": [({"x": x}, y) for x, _, y in data],
        "numpy": [(x.numpy(), y.numpy()) for x, _, y in data],
        # soft labels that are one-hot: the same cross-entropy, the same steps
        "one-hot soft labels": [((x,), F.one_hot(y, 4).double()) for x, _, y in data],
    }
    for name, batches in forms.items():
        got = _trained(batches)
        for key, value in want.items():
            torch.testing.assert_close(got[key], value, rtol=1e-10, atol=1e-12, msg=name)
    for unlabelled in ([x for x, _, _ in data], [(x, g) for x, g, _ in data]):
        with pytest.raises(StructPruneError,
                           match="^training without a teacher to distil from needs targets"):
            _trained(unlabelled)


def test_distillation_takes_every_form_too():
    data = _data(2)
    teacher = _model(Single, seed=5)

    def distilled(batches):
        model = _model(Single, seed=3)
        fit(model, batches, 1, lr=0.05, teacher=teacher, progress=False)
        return model.fc.weight.detach().clone()

    torch.testing.assert_close(distilled([({"x": x}, y) for x, _, y in data]),
                               distilled([(x, y) for x, _, y in data]), rtol=1e-10, atol=1e-12)


def test_evaluation_predicts_the_same_from_every_form():
    model = _model(Gained)
    data = _data(3)
    with torch.no_grad():
        want = torch.cat([model(x, g).argmax(1) for x, g, _ in data]).tolist()
    forms = {
        "grouped": [((x, g), y) for x, g, y in data],
        "dict": [({"x": x, "gain": g}, y) for x, g, y in data],
        "numpy": [((x.numpy(), g.numpy()), y.numpy()) for x, g, y in data],
    }
    for name, batches in forms.items():
        y_true, y_pred = predict(model, batches, num_classes=4)
        assert y_pred.tolist() == want, name
        assert y_true.tolist() == torch.cat([y for _, _, y in data]).tolist(), name
    with pytest.raises(StructPruneError) as error:
        predict(model, [(x, g) for x, g, _ in data])
    assert _one_line(error).startswith("evaluation needs targets, but a batch has none")


# ------------------------------------------------------------------------------------- data


FACTORY = '''
import torch

x = torch.zeros(4, 3, 4, 4)


def named():
    batches = [({"x": x}, torch.tensor([0, 1, 2, 1]))]
    return batches, batches


def unlabelled():
    return [x], [x]
'''


def test_a_factory_of_dict_batches_counts_its_classes(tmp_path):
    path = tmp_path / "forms.py"
    path.write_text(FACTORY)
    assert from_factory(f"{path}:named").num_classes == 3
    # batches of inputs only are data without labels (issue 24), not an error
    unlabelled = from_factory(f"{path}:unlabelled")
    assert not unlabelled.labelled and unlabelled.num_classes is None
