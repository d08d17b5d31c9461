"""Fine-tuning a pruned folder: metrics before and after, distillation, a checkpoint after
every epoch that --resume continues from, and the re-exported ONNX file."""

import json

import pytest
import torch
from safetensors.torch import load_file

import structprune as sp
from structprune.accuracy.data import from_factory
from structprune.accuracy.evaluate import evaluate
from structprune.deploy.export import run_onnx
from structprune.front.cli import main
from structprune.front.models import build_model, load_weights
from structprune.tree import random_inputs

from .oracles import digits_factory


def run(*args):
    return main([str(a) for a in args])


@pytest.fixture(scope="module")
def pruned_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    data = digits_factory(root, 6, 3)
    out = root / "out"
    assert run("prune", "structprune:digits_cnn", "--data", data, "--ratio", "0.5",
               "--out", out, "--exporter", "torchscript") == 0
    return out, data


def test_finetune_records_before_and_after_and_checkpoints_every_epoch(pruned_dir):
    out, data = pruned_dir
    before = evaluate(sp.load(out, "structprune:digits_cnn"), from_factory(data).val)
    assert run("finetune", out, "--data", data, "--epochs", "1", "--distill") == 0
    record = json.loads((out / "report.json").read_text())["finetune"]
    assert record["before"]["accuracy"] == pytest.approx(before.accuracy)
    tuned = sp.load(out, "structprune:digits_cnn")
    after = evaluate(tuned, from_factory(data).val)
    assert record["after"]["accuracy"] == pytest.approx(after.accuracy)
    assert record["distill"] and [h["epoch"] for h in record["history"]] == [1]
    checkpoint = load_file(str(out / "checkpoint.safetensors"))
    for name, tensor in tuned.state_dict().items():
        assert torch.equal(checkpoint[f"model.{name}"], tensor)
    # the re-exported ONNX file computes the fine-tuned model
    x = random_inputs([(2, 1, 32, 32)], seed=3)
    with torch.no_grad():
        want = tuned.eval()(*x)
    got = torch.from_numpy(run_onnx(out / "pruned.onnx", x)[0])
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)

    steps = int(checkpoint["optimizer.0.step"])
    assert run("finetune", out, "--data", data, "--epochs", "2", "--resume") == 0
    record = json.loads((out / "report.json").read_text())["finetune"]
    assert record["resumed_from_epoch"] == 1 and [h["epoch"] for h in record["history"]] == [2]
    resumed = load_file(str(out / "checkpoint.safetensors"))
    assert int(resumed["optimizer.0.step"]) == 2 * steps  # the optimizer state carried on
    assert run("finetune", out, "--data", data, "--epochs", "2", "--resume") == 2


def test_finetune_needs_data_and_a_pruned_folder(tmp_path, capsys):
    assert run("finetune", tmp_path, "--epochs", "1") == 2
    assert run("finetune", tmp_path, "--epochs", "1", "--data", "digits") == 2
    assert "report.json" in capsys.readouterr().err


def test_train_with_group_sparsity_writes_weights_that_prune_loads(pruned_dir, tmp_path):
    _, data = pruned_dir
    out = tmp_path / "trained"
    assert run("train", "structprune:digits_cnn", "--data", data, "--epochs", "1",
               "--sparsity", "group", "--strength", "1e-3", "--out", out) == 0
    summary = json.loads((out / "train.json").read_text())
    model = build_model("structprune:digits_cnn")
    load_weights(model, str(out / "weights.safetensors"))
    direct = evaluate(model, from_factory(data).val)
    assert summary["metrics"]["accuracy"] == pytest.approx(direct.accuracy)
    assert summary["sparsity"] == "group" and len(summary["history"]) == 1
    pruned = tmp_path / "pruned"
    assert run("prune", "structprune:digits_cnn", "--weights", out / "weights.safetensors",
               "--ratio", "0.5", "--out", pruned, "--no-onnx") == 0
    assert run("train", "structprune:digits_cnn", "--data", data, "--epochs", "1",
               "--sparsity", "l0", "--out", tmp_path / "x") == 2


def test_demo_reports_every_step_and_recovery_beats_raw_pruning(tmp_path):
    from structprune.front.demo import demo

    report = demo(tmp_path / "demo", epochs=1, finetune_epochs=1, say=lambda text: None)
    dense, pruned, steps = report["dense"], report["pruned"], report["steps"]
    for key in ("accuracy", "macro_f1", "params", "macs", "ort_cpu_ms"):
        assert key in dense and key in pruned
    assert pruned["macs"] < 0.3 * dense["macs"] and pruned["params"] < 0.3 * dense["params"]
    assert pruned["accuracy_before_finetune"] == steps["after recovery"]["accuracy"]
    assert steps["after recovery"]["accuracy"] > steps["right after pruning"]["accuracy"] + 0.3
    saved = json.loads((tmp_path / "demo" / "report.json").read_text())
    assert saved["pruned"]["accuracy"] == pytest.approx(pruned["accuracy"])
    reloaded = sp.load(tmp_path / "demo", "structprune:digits_cnn")
    assert reloaded.features[0].out_channels == 32
