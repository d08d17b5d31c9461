"""Fine-tuning a pruned folder: metrics before and after, distillation, a checkpoint after
every epoch that --resume continues from, and the re-exported ONNX file."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import structprune as sp
from structprune.accuracy.data import from_factory
from structprune.accuracy.evaluate import evaluate, fidelity
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



TINY = """
import torch
import torch.nn as nn


def model():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    with torch.no_grad():  # as trained: non-trivial affines, statistics of the data
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_(0.0, 0.2)
                m.momentum = None
        net.train()
        for x in data()[0]:
            net(x)
    for m in net.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1
    return net.eval()


def data():
    gen = torch.Generator().manual_seed(1)
    return ([torch.randn(8, 1, 16, 16, generator=gen) for _ in range(6)],
            [torch.randn(8, 1, 16, 16, generator=gen) for _ in range(2)])
"""


def _tiny(directory) -> tuple[str, str]:
    """A small classifier trained-like (``file.py:model``) and unlabeled inputs for it
    (``file.py:data``)."""
    path = directory / "tiny.py"
    path.write_text(TINY)
    return f"{path}:model", f"{path}:data"


def test_finetune_without_labels_distils_and_reports_fidelity(tmp_path, capsys):
    spec, data = _tiny(tmp_path)
    out = tmp_path / "out"
    assert run("prune", spec, "--input-shape", "1,1,16,16", "--ratio", "0.7", "--out", out,
               "--exporter", "torchscript") == 0
    assert run("finetune", out, "--data", data, "--epochs", "1") == 2
    assert "no labels: pass --distill" in capsys.readouterr().err

    dense, val = build_model(spec), from_factory(data).val
    before = fidelity(sp.load(out, spec), dense, val)
    assert run("finetune", out, "--data", data, "--epochs", "3", "--lr", "0.003", "--distill",
               "--feature-weight", "0.1", "--exporter", "torchscript") == 0
    record = json.loads((out / "report.json").read_text())["finetune"]
    assert not record["labelled"] and "after" not in record and record["distill"]
    tuned = sp.load(out, spec)
    after = fidelity(tuned, dense, val)
    for found, want in ((record["fidelity"]["before"], before),
                        (record["fidelity"]["after"], after)):
        assert found["rel_error"] == pytest.approx(want["rel_error"])
        assert found["top1_agreement"] == pytest.approx(want["top1_agreement"])
    assert after["rel_error"]["output0"] < 0.8 * before["rel_error"]["output0"], (before, after)
    history = record["history"]
    assert [h["epoch"] for h in history] == [1, 2, 3] and history[2]["loss"] < history[0]["loss"]
    assert history[0]["features"] == ["0", "3"] and history[0]["features_skipped"] == {}
    assert "fidelity to the dense model" in capsys.readouterr().out
    # the re-exported ONNX file computes the distilled model
    x = random_inputs([(2, 1, 16, 16)], seed=3)
    with torch.no_grad():
        want = tuned.eval()(*x)
    torch.testing.assert_close(torch.from_numpy(run_onnx(out / "pruned.onnx", x)[0]), want,
                               rtol=1e-4, atol=1e-4)
    assert run("finetune", out, "--data", data, "--epochs", "4", "--lr", "0.003", "--distill",
               "--resume", "--exporter", "torchscript") == 0
    record = json.loads((out / "report.json").read_text())["finetune"]
    assert record["resumed_from_epoch"] == 3 and [h["epoch"] for h in record["history"]] == [4]


def test_label_free_finetune_that_ends_further_from_the_dense_model_keeps_its_start(
        tmp_path, capsys):
    """A learning rate of 5 throws the weights far off: the fidelity after is worse than
    before, so the weights it started from stay, byte for byte, and the record says so."""
    spec, data = _tiny(tmp_path)
    out = tmp_path / "out"
    assert run("prune", spec, "--input-shape", "1,1,16,16", "--ratio", "0.7", "--out", out,
               "--no-onnx") == 0
    start = sp.load(out, spec).state_dict()
    assert run("finetune", out, "--data", data, "--epochs", "2", "--lr", "5", "--distill",
               "--mix", "0") == 0
    record = json.loads((out / "report.json").read_text())["finetune"]
    assert "did not improve" in record["kept"] and record["mix"] == 0
    assert record["fidelity"]["after"] == record["fidelity"]["before"]
    for name, tensor in sp.load(out, spec).state_dict().items():
        assert torch.equal(tensor, start[name]), name
    assert "kept the weights it started from" in capsys.readouterr().out


def test_iterative_prune_without_labels_distils_between_steps(tmp_path):
    spec, data = _tiny(tmp_path)
    out = tmp_path / "out"
    assert run("prune", spec, "--input-shape", "1,1,16,16", "--data", data, "--ratio", "0.5",
               "--steps", "2", "--finetune-epochs", "1", "--out", out, "--no-onnx") == 0
    report = json.loads((out / "report.json").read_text())
    assert report["steps"]["distill"] and len(report["steps"]["history"]) == 2
    assert all(np.isfinite(h["loss"]) for h in report["steps"]["history"])
    assert "fidelity" in report


@pytest.mark.zoo
def test_yolov8n_finetunes_on_a_flat_folder_of_images_by_distillation(tmp_path):
    pytest.importorskip("ultralytics")
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray((rng.random((80, 96, 3)) * 255).astype(np.uint8)).save(images / f"{i}.png")
    out = tmp_path / "out"
    assert run("prune", "ultralytics:yolov8n.yaml", "--input-shape", "1,3,64,64", "--ratio",
               "0.3", "--out", out, "--no-onnx") == 0
    assert run("finetune", out, "--data", images, "--batch-size", "4", "--epochs", "1",
               "--distill", "--feature-weight", "0.1") == 0
    record = json.loads((out / "report.json").read_text())["finetune"]
    assert not record["labelled"]
    for when in ("before", "after"):
        found = record["fidelity"][when]
        assert found["samples"] > 0 and "box_map50" in found
        assert np.isfinite(list(found["rel_error"].values())).all()
    epoch = record["history"][0]
    assert np.isfinite(epoch["loss"]) and epoch["eval_mode_layers"] == ["model.22"]
    assert epoch["features_skipped"] == {} and len(epoch["features"]) > 50  # pruned ones aligned
