"""The settings object and the front half: every bad value refused in one line where it is
declared, unknown names refused instead of dropped, the plan's settings written from the
config, settings that ``--auto`` used to drop honoured, and ``analyze`` seeing the groups
``prune`` sees (literals settled on the export path)."""

import json

import numpy as np
import pytest
import torch

import structprune as sp
from structprune.accuracy.sensitivity import auto_plan
from structprune.config import PruneConfig, RunConfig, TargetConfig
from structprune.core.analyse import analyse
from structprune.core.capture import capture
from structprune.core.prepare import prepare
from structprune.front import cli
from structprune.front.cli import arguments

from .fixtures import small_vgg
from .oracles import randomize
from .test_export_path import SizeInCode

X = (torch.randn(2, 3, 16, 16),)


@pytest.mark.parametrize("bad, says", [
    ({"ratio": 1.0}, "outside [0, 1)"),
    ({"ratio": 0.5, "threshold": 0.5}, "ratio and threshold are both set"),
    ({"ratios": {"0": 1.5}}, "outside [0, 1)"),
    ({"round_to": 0}, "round_to 0"),
    ({"round_to": "fast"}, "round_to fast"),
    ({"min_width": 0}, "min_width 0"),
    ({"max_group_ratio": 1.5}, "max_group_ratio 1.5"),
    ({"global_ranking": True, "threshold": 0.5}, "global ranking"),
    ({"calibration_batches": 0}, "calibration_batches 0"),
    ({"capture_method": "jit"}, "unknown capture method 'jit'"),
    ({"tolerance": 0}, "tolerance 0"),
    ({"criterion": 3}, "criterion 3"),
    ({"sequential": True}, "pass criterion 'obs'"),
])
def test_each_bad_value_is_refused_in_one_line(bad, says):
    with pytest.raises(sp.PlanError) as raised:
        PruneConfig(**bad)
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_an_unknown_setting_is_refused_naming_the_valid_ones():
    with pytest.raises(sp.StructPruneError, match="unknown setting 'importance'.*criterion"):
        sp.prune(small_vgg(), X, 0.5, importance="l1")
    with pytest.raises(sp.StructPruneError, match="unknown setting 'exporter'"):
        PruneConfig().replace(exporter="dynamo")


def test_replace_validates_again_and_the_plan_settings_are_the_config():
    config = PruneConfig(ratio=0.3, ignore=["10"], round_to=8.0)
    assert config.ignore == ("10",) and config.round_to == 8
    with pytest.raises(sp.PlanError, match="only one"):
        config.replace(macs_budget=0.5)
    model = randomize(small_vgg())
    result = sp.prune(model, X, config=config, criterion="l1")
    assert result.plan.settings == config.replace(criterion="l1").to_json()
    assert json.loads(result.plan.dumps())["settings"]["ignore"] == ["10"]
    # the config object and the keyword spelling give the same plan
    assert result.plan.params == sp.prune(model, X, 0.3, ignore=["10"], round_to=8,
                                          criterion="l1").plan.params


def test_a_callable_criterion_is_a_setting_and_is_named_in_the_plan():
    def reversed_l2(analysis, group):
        return -np.arange(group.size, dtype=np.float64)  # the last units matter most

    result = sp.prune(randomize(small_vgg()), X, 0.5, criterion=reversed_l2)
    assert result.plan.settings["criterion"] == "reversed_l2"
    first = next(p for p in result.plan.params if p["name"] == "0.weight" and p["dim"] == 0)
    assert first["keep"] == list(range(8))  # scores fall with the index: the first stay


@pytest.mark.parametrize("target, config, says", [
    ({"speedup": 2, "latency_ms": 5}, {}, "not both"),
    ({"speedup": 1}, {}, "must be above 1"),
    ({"latency_ms": -1}, {}, "positive number"),
    ({"if_slower": "ignore"}, {}, "unknown --if-slower"),
    ({"speedup": 2}, {"ratio": 0.3}, "not 2"),
    ({"speedup": 2}, {"macs_budget": 0.5}, "not 2"),
    ({}, {"threshold": 0.5, "round_to": "auto"}, "give --ratio"),
    ({}, {"ratio": 0.5, "criterion": "obs", "sequential": True}, "drop sequential"),
])
def test_target_rules_are_said_once(target, config, says):
    with pytest.raises(sp.PlanError, match=says):
        TargetConfig("ort-cpu", **target).check(PruneConfig(**config))


@pytest.mark.parametrize("run, config, given, says", [
    ({"steps": 0}, {}, {}, "--steps must be 1 or more"),
    ({"finetune_epochs": 2}, {"ratio": 0.5}, {"data_given": True}, "give --steps 2"),
    ({"steps": 2, "distill": True}, {"ratio": 0.5}, {"data_given": True}, "--finetune-epochs"),
    ({"steps": 2}, {"threshold": 0.5}, {}, "give --ratio"),
    ({"steps": 2}, {"ratio": 0.5, "round_to": "auto"}, {}, "does not combine with --steps"),
    ({"steps": 2}, {"ratio": 0.5}, {"plan_given": True}, "--plan is applied as it is"),
    ({}, {"ratio": 0.5, "criterion": "obs", "sequential": True}, {"plan_given": True},
     "--sequential chooses channels for a plan being made"),
    ({"auto": True}, {"macs_budget": 0.5}, {}, "--auto measures sensitivity"),
    ({"auto": True}, {"ratio": 0.5}, {"data_given": True}, "--auto measures sensitivity"),
    ({"recover": "bn"}, {"ratio": 0.5}, {}, "--recover needs calibration data"),
    ({"steps": 2, "finetune_epochs": 1}, {"ratio": 0.5}, {}, "--finetune-epochs needs --data"),
])
def test_run_rules_are_said_once(run, config, given, says):
    with pytest.raises(sp.PlanError, match=says):
        RunConfig(**run).check(PruneConfig(**config), **given)


def test_a_target_does_not_combine_with_steps():
    with pytest.raises(sp.PlanError, match="--target chooses the widths itself"):
        RunConfig(steps=2).check(PruneConfig(ratio=0.5), TargetConfig("ort-cpu"))
    assert RunConfig(recover="lsq,bn").recover == ("lsq", "bn")
    assert RunConfig(recover="none").recovery(True) == () and RunConfig().recovery(True) == ("bn",)


def _val_batches():
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 3, 16, 16, generator=gen), torch.randint(0, 10, (8,), generator=gen))
            for _ in range(2)]


def _pruned_widths(plan: sp.Plan) -> list[int]:
    return [g["kept"] * g["width"] for g in plan.groups if g["kept"] < g["units"]]


def test_auto_with_sequential_obs_keeps_the_chosen_widths_and_refines_the_channels():
    torch.manual_seed(0)
    model = randomize(small_vgg().eval())
    x = (torch.randn(1, 3, 16, 16),)
    data = [torch.randn(8, 3, 16, 16) for _ in range(2)]
    plain, plain_measured = auto_plan(model, x, _val_batches(), macs_budget=0.3,
                                      criterion="obs", data=data, progress=False)
    sequential, measured = auto_plan(model, x, _val_batches(), macs_budget=0.3,
                                     criterion="obs", data=data, sequential=True,
                                     progress=False)
    # sensitivity.json says its channels are not the plan's
    assert "channels" in measured and "channels" not in plain_measured
    assert [g["kept"] for g in sequential.groups] == [g["kept"] for g in plain.groups]
    # several groups pruned: past the first, the channels chosen on pruned inputs differ
    assert [p["keep"] for p in sequential.params] != [p["keep"] for p in plain.params]
    assert sequential.settings["auto"] and sequential.settings["sequential"]
    assert sequential.settings["group_ratios"] == plain.settings["group_ratios"]
    assert sp.prune(model, x, plan=sequential).verification.ok


def test_auto_honours_min_width_and_refuses_round_to_it_once_dropped():
    model = randomize(small_vgg().eval())
    x = (torch.randn(1, 3, 16, 16),)
    with pytest.raises(sp.PlanError, match="does not combine with --round-to 4"):
        auto_plan(model, x, _val_batches(), macs_budget=0.6, round_to=4, progress=False)
    free, _ = auto_plan(model, x, _val_batches(), macs_budget=0.6, progress=False)
    assert min(_pruned_widths(free)) < 12  # without the bound some group goes narrower
    plan, measured = auto_plan(model, x, _val_batches(), macs_budget=0.6, min_width=12,
                               progress=False)
    widths = _pruned_widths(plan)
    assert widths and min(widths) >= 12
    assert plan.settings["min_width"] == 12 and plan.settings["auto"]
    pruned = sp.prune(model, x, plan=plan)
    assert pruned.figures["macs_ratio"] <= 0.6
    assert np.isclose(pruned.figures["macs_ratio"], measured["macs_ratio_predicted"])


def test_the_front_half_settles_literals_for_every_caller(capsys, monkeypatch):
    """``prepare`` pins the view sized by ``self.c`` on the export path, as ``prune`` does;
    a bare analysis of the same capture would offer its channels, and ``analyze`` used to."""
    model = randomize(SizeInCode().eval())
    x = (torch.randn(1, 3, 8, 8),)
    bare = analyse(capture(model, x, method="export"))
    settled = prepare(model, x, PruneConfig(capture_method="export"), scored=False).analysis

    def status(analysis):
        return next(g.status for g in analysis.groups if ("conv.weight", 0) in g.members)

    assert status(bare) != "blocked" and status(settled) == "blocked"
    monkeypatch.setattr(arguments, "build_model", lambda spec, seed, shapes=None: SizeInCode())
    assert cli.main(["analyze", "any:thing", "--input-shape", "1,3,8,8", "--capture",
                     "export"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines()
                if "conv.weight:0" in line and line.startswith("  ["))
    assert line.split()[2] == "blocked"
