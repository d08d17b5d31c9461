"""Iterative pruning composes into one plan in dense indices: applied to a fresh dense model
it gives the model the steps give in turn."""

import json

import pytest
import torch
import torchvision

import structprune as sp
from structprune.core.plan import compose
from structprune.front.cli import main

from .oracles import digits_factory, outputs, randomize


@pytest.mark.parametrize("settings", [{}, {"global_ranking": True, "round_to": 4}])
def test_a_composed_plan_gives_the_model_the_steps_give_in_turn(settings):
    def make():
        torch.manual_seed(0)
        return randomize(torchvision.models.resnet18(num_classes=10).eval())

    dense = make()
    x = (torch.randn(1, 3, 32, 32),)
    first = sp.prune(dense, x, 0.3, **settings)
    second = sp.prune(first.model, x, 0.3, **settings)
    third = sp.prune(second.model, x, 0.2, **settings)
    plan = compose(compose(first.plan, second.plan), third.plan)
    once = sp.apply_plan(make(), plan)
    # same tensors, bit for bit, as the three steps in turn
    in_turn = third.model.state_dict()
    assert once.state_dict().keys() == in_turn.keys()
    for name, tensor in once.state_dict().items():
        assert torch.equal(tensor, in_turn[name]), name
    assert len(plan.settings["steps"]) == 3
    # and the composed plan verifies against the masked dense model
    result = sp.prune(dense, x, plan=sp.Plan.from_json(json.loads(plan.dumps())))
    assert result.verification.ok
    assert torch.equal(outputs(result.model, x), outputs(third.model, x))


def test_compose_refuses_a_second_plan_made_for_another_model():
    dense = torchvision.models.resnet18(num_classes=10).eval()
    x = (torch.randn(1, 3, 32, 32),)
    a = sp.prune(dense, x, 0.3, check=False).plan
    b = sp.prune(dense, x, 0.5, check=False).plan  # on the dense model, not a's result
    with pytest.raises(sp.PlanError, match="another model"):
        compose(a, b)


def test_iterative_prune_with_fine_tuning_writes_one_plan_the_weights_load_onto(tmp_path):
    data = digits_factory(tmp_path, 3, 2)
    out = tmp_path / "out"
    assert main(["prune", "structprune:digits_cnn", "--data", data, "--ratio", "0.5",
                 "--steps", "2", "--finetune-epochs", "1", "--distill", "--out", str(out),
                 "--no-onnx"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"]["steps"] == 2 and len(report["steps"]["history"]) == 2
    # each step recovered (bn, the default with data) before its fine-tuning, none after
    recoveries = report["steps"]["recovery"]
    assert [r["method"] for r in recoveries] == [["bn"], ["bn"]]
    assert report["recovery"] is None
    plan = sp.Plan.load(out / "plan.json")
    assert len(plan.settings["steps"]) == 2
    loaded = sp.load(out, "structprune:digits_cnn")  # fresh dense + composed plan + weights
    per_step = 1 - 0.5 ** 0.5  # each step removes the same share of what is left
    after_one = 64 - int(64 * per_step)
    assert loaded.features[0].out_channels == after_one - int(after_one * per_step)
    assert report["macs_ratio"] < 0.3
