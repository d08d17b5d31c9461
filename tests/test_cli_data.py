"""The command line with data, end to end on the digits CNN: criteria, --threshold, --auto,
`eval`, and one line (exit 2) for each data or settings error."""

import json

import numpy as np
import pytest
import torch

import structprune as sp
from structprune.accuracy.data import from_factory
from structprune.accuracy.evaluate import evaluate
from structprune.accuracy.recover import recover
from structprune.core.plan import sized_attributes, sliced_params
from structprune.core.score import calibration
from structprune.front.cli import main
from structprune.front.models import build_model

from .oracles import digits_factory


def run(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    """A data factory: 240 training and 120 validation digits (a small, fast --data)."""
    return digits_factory(tmp_path_factory.mktemp("data"), 4, 3, batch_size=40)


def test_a_data_criterion_with_a_threshold_reports_what_the_pruned_model_scores(
        factory, tmp_path, capsys):
    out = tmp_path / "out"
    assert run("prune", "structprune:digits_cnn", "--criterion", "activation", "--data", factory,
               "--threshold", "0.9", "--out", out, "--no-onnx") == 0
    printed = capsys.readouterr().out
    assert "top-1 accuracy" in printed and "macro F1" in printed
    report = json.loads((out / "report.json").read_text())
    assert report["macs_ratio"] < 1.0
    assert {"confusion.png", "widths.png"} <= {p.name for p in out.iterdir()}
    # the reported figures are those of the saved model, evaluated independently
    pruned = sp.load(out, "structprune:digits_cnn")
    val = from_factory(factory).val
    direct = evaluate(pruned, val)
    assert report["metrics"]["pruned"]["accuracy"] == pytest.approx(direct.accuracy)
    assert report["metrics"]["pruned"]["macro_f1"] == pytest.approx(direct.macro_f1)
    plan = sp.Plan.load(out / "plan.json")
    assert plan.settings["threshold"] == 0.9

    assert run("eval", out, "--data", factory) == 0
    evaluated = json.loads((out / "eval.json").read_text())
    assert evaluated["pruned"]["accuracy"] == pytest.approx(direct.accuracy)
    dense = evaluate(build_model("structprune:digits_cnn"), val)
    assert evaluated["dense"]["recall"] == pytest.approx(dense.recall)


def test_sequential_obs_keeps_the_widths_of_obs_and_records_the_setting(factory, tmp_path):
    plain, sequential = tmp_path / "plain", tmp_path / "sequential"
    common = ("prune", "structprune:digits_cnn", "--criterion", "obs", "--data", factory,
              "--ratio", "0.6", "--no-onnx")
    assert run(*common, "--out", plain) == 0
    assert run(*common, "--sequential", "--out", sequential) == 0
    plans = [sp.Plan.load(out / "plan.json") for out in (plain, sequential)]
    assert plans[1].settings["sequential"] and not plans[0].settings["sequential"]
    assert [g["kept"] for g in plans[0].groups] == [g["kept"] for g in plans[1].groups]
    report = json.loads((sequential / "report.json").read_text())
    assert report["criterion"]["name"] == "obs"
    assert sp.load(sequential, "structprune:digits_cnn") is not None

    stepped = tmp_path / "stepped"  # in two steps, ending on the same widths
    assert run(*common, "--sequential", "--steps", "2", "--recover", "lsq", "--out",
               stepped) == 0
    plan = sp.Plan.load(stepped / "plan.json")
    assert [g["kept"] * g["width"] for g in plan.groups] == \
        [g["kept"] * g["width"] for g in plans[0].groups]
    assert json.loads((stepped / "report.json").read_text())["steps"]["steps"] == 2


def test_auto_meets_the_budget_from_measured_sensitivity(factory, tmp_path):
    out = tmp_path / "auto"
    assert run("prune", "structprune:digits_cnn", "--data", factory, "--macs-budget", "0.5",
               "--auto", "--out", out, "--no-onnx") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["macs_ratio"] <= 0.5
    sensitivity = json.loads((out / "sensitivity.json").read_text())
    assert sensitivity["groups"] and all(len(g["accuracy"]) == len(sensitivity["ratios"])
                                         for g in sensitivity["groups"])
    # one measured point, recomputed: that group alone pruned at that ratio, evaluated
    model = build_model("structprune:digits_cnn")
    x = torch.randn(1, 1, 32, 32)
    analysis = sp.analyse(sp.capture(model, (x,)))
    scores = sp.score(analysis, "l2", [g for g in analysis.groups if (~g.blocked).any()])
    row = sensitivity["groups"][1]
    at = sensitivity["ratios"].index(0.5)
    group = next(g for g in analysis.groups if g.index == row["group"])
    units = np.flatnonzero(~group.blocked)  # half of them, least important first
    gone = units[np.argsort(scores[group.index][units], kind="stable")][:len(units) // 2]
    removed = np.zeros(analysis.n_components, bool)
    removed[group.units[gone]] = True
    plan = sp.Plan(sliced_params(analysis, removed),
                   attributes=sized_attributes(analysis, removed))
    alone = sp.apply_plan(model, plan)
    # measured after BatchNorm recalibration on the calibration batches, as the default
    # recovery (bn) that follows
    assert "recalibrated" in sensitivity
    recover(alone, model, plan, analysis, calibration(from_factory(factory).train), "bn")
    assert evaluate(alone, from_factory(factory).val).accuracy == \
        pytest.approx(row["accuracy"][at])
    assert np.isclose(report["macs_ratio"], sensitivity["macs_ratio_predicted"])


def test_auto_without_labels_measures_sensitivity_as_agreement_with_the_dense_model(
        tmp_path):
    images = digits_factory(tmp_path, 4, 3, batch_size=40, labels=False)
    out = tmp_path / "auto"
    assert run("prune", "structprune:digits_cnn", "--data", images, "--macs-budget", "0.5",
               "--auto", "--out", out, "--no-onnx") == 0
    report = json.loads((out / "report.json").read_text())
    sensitivity = json.loads((out / "sensitivity.json").read_text())
    assert report["macs_ratio"] <= 0.5 and "fidelity" in report
    assert sensitivity["measured"] == "top-1 agreement with the dense model"
    assert "recalibrated" in sensitivity  # bn recovery follows by default
    assert sensitivity["dense_accuracy"] == 1.0
    # one measured point, recomputed: that group alone pruned at that ratio, its BatchNorm
    # statistics re-estimated, its argmax compared with the dense model's on the validation
    # images
    model = build_model("structprune:digits_cnn")
    analysis = sp.analyse(sp.capture(model, (torch.randn(1, 1, 32, 32),)))
    scores = sp.score(analysis, "l2", [g for g in analysis.groups if (~g.blocked).any()])
    row, at = sensitivity["groups"][0], sensitivity["ratios"].index(0.5)
    group = next(g for g in analysis.groups if g.index == row["group"])
    units = np.flatnonzero(~group.blocked)
    gone = units[np.argsort(scores[group.index][units], kind="stable")][:len(units) // 2]
    removed = np.zeros(analysis.n_components, bool)
    removed[group.units[gone]] = True
    plan = sp.Plan(sliced_params(analysis, removed),
                   attributes=sized_attributes(analysis, removed))
    alone = sp.apply_plan(model, plan)
    recover(alone, model, plan, analysis, calibration(from_factory(images).train), "bn")
    val = torch.cat(list(from_factory(images).val))
    with torch.no_grad():
        same = (alone.eval()(val).argmax(1) == model.eval()(val).argmax(1)).double().mean()
    assert row["accuracy"][at] == pytest.approx(float(same))


@pytest.mark.parametrize("case", [
    (["--criterion", "magic", "--ratio", "0.5"], "unknown criterion 'magic'"),
    (["--criterion", "taylor", "--ratio", "0.5"], "needs calibration data"),
    (["--macs-budget", "1.5"], "macs_budget"),
    (["--macs-budget", "0"], "macs_budget"),
    (["--ratio", "0.5", "--data", "EMPTY"], "EMPTY"),
    (["--ratio", "0.5", "--data", "digits", "--input-shape", "1,3,32,32", "--auto"],
     "--auto"),
    (["--ratio", "0.5", "--sequential"], "pass criterion 'obs'"),
])
def test_data_and_settings_errors_exit_2_with_one_line(case, tmp_path, capsys):
    flags, expected = case
    empty = tmp_path / "empty"
    empty.mkdir()
    flags = [str(empty) if f == "EMPTY" else f for f in flags]
    expected = str(empty) if expected == "EMPTY" else expected
    out = tmp_path / "out"
    assert run("prune", "structprune:digits_cnn", *flags, "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("structprune: error:") and "\n" not in err and expected in err
    assert not out.exists()


def test_a_class_count_that_does_not_match_the_model_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("prune", "torchvision:resnet18", "--data", "digits", "--input-shape",
               "1,3,32,32", "--ratio", "0.5", "--out", out) == 2
    err = capsys.readouterr().err.strip()
    assert "classes" in err and "\n" not in err and not out.exists()
