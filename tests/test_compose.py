"""Iterative pruning composes into one plan in dense indices: applied to a fresh dense model
it gives the model the steps give in turn."""

import json

import pytest
import torch
import torchvision

import structprune as sp
from structprune.core.plan import compose
from structprune.core.prepare import prepare
from structprune.core.selection import plan_toward
from structprune.front.cli import main
from structprune.front.models import digits_cnn

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
    # the steps end on the widths one step gives (64 -> 45 -> 32 channels first)
    one_step = sp.prune(digits_cnn(), (torch.zeros(1, 1, 32, 32),), 0.5)
    assert loaded.features[0].out_channels == 32
    assert {k: v.shape for k, v in loaded.state_dict().items()} == \
        {k: v.shape for k, v in one_step.model.state_dict().items()}
    assert report["macs_ratio"] == pytest.approx(one_step.figures["macs_ratio"])


@pytest.mark.parametrize("round_to", [1, 4])
def test_steps_toward_a_plan_narrow_geometrically_and_land_on_its_widths(round_to):
    torch.manual_seed(0)
    dense = randomize(torchvision.models.resnet18(num_classes=10).eval())
    x = (torch.randn(1, 3, 32, 32),)
    config = sp.PruneConfig(ratio=0.6, round_to=round_to)
    target = sp.prune(dense, x, config=config).plan
    current, widths = dense, []
    for step in (1, 2, 3):
        prepared = prepare(current, x, config)
        plan = plan_toward(prepared.analysis, prepared.scores, config, target, step / 3)
        current = sp.prune(current, x, plan=plan).model
        widths.append(current.layer1[0].conv1.out_channels)
    # 64 dense channels toward the one-step plan's 26 (64 - int(64 * 0.6); 28 rounded to 4):
    # 64 * (final / 64) ** (k / 3), rounded up to the multiple
    final = 28 if round_to == 4 else 26
    expected = [-(-round(64 * (final / 64) ** (k / 3)) // round_to) * round_to for k in (1, 2)]
    assert widths == [*expected, final]
    assert expected == ([52, 40] if round_to == 4 else [47, 35])
    # every tensor has the one-step plan's shape
    one_step = sp.apply_plan(dense, target).state_dict()
    assert {k: v.shape for k, v in current.state_dict().items()} == \
        {k: v.shape for k, v in one_step.items()}
    # a step behind where the model already is removes nothing
    prepared = prepare(current, x, config)
    again = plan_toward(prepared.analysis, prepared.scores, config, target, 1 / 3)
    assert all(g["kept"] == g["units"] for g in again.groups)
    with pytest.raises(sp.PlanError, match="fraction"):
        plan_toward(prepared.analysis, prepared.scores, config, target, 0)


def test_the_last_step_toward_a_plan_refuses_a_model_whose_groups_it_cannot_reach():
    torch.manual_seed(0)
    x = (torch.randn(1, 3, 32, 32),)
    target = sp.prune(randomize(torchvision.models.resnet18(num_classes=10).eval()), x, 0.5).plan
    other = randomize(torchvision.models.mobilenet_v3_small(num_classes=10).eval())
    prepared = prepare(other, x, sp.PruneConfig(ratio=0.5))
    with pytest.raises(sp.PlanError, match="cannot be narrowed on this model"):
        plan_toward(prepared.analysis, prepared.scores, sp.PruneConfig(ratio=0.5), target, 1)
