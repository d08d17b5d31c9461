"""`structprune train` under torchrun: two real CPU processes (gloo), DistributedDataParallel,
a shard of the data each, metrics pooled over the ranks, one writer."""

import json
import os
import shutil
import subprocess

import pytest

from structprune.accuracy.data import from_factory
from structprune.accuracy.evaluate import evaluate
from structprune.front.models import build_model, load_weights

from .oracles import digits_factory


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_train_under_torchrun_keeps_the_ranks_in_step_and_writes_once(tmp_path):
    data = digits_factory(tmp_path, 6, 3)
    out = tmp_path / "out"
    done = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "structprune", "train",
         "structprune:digits_cnn", "--data", data, "--epochs", "1", "--sparsity",
         "group", "--out", str(out)], capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "small_digits.py"]
    assert sorted(p.name for p in out.iterdir()) == ["train.json", "weights.safetensors"]
    summary = json.loads((out / "train.json").read_text())
    assert summary["world_size"] == 2 and summary["ranks_hold_the_same_weights"]
    # the pooled metrics are those of the saved model on the whole validation split
    model = build_model("structprune:digits_cnn")
    load_weights(model, str(out / "weights.safetensors"))
    direct = evaluate(model, from_factory(data).val)
    assert summary["metrics"]["samples"] == direct.samples == 96
    assert summary["metrics"]["accuracy"] == pytest.approx(direct.accuracy)
    assert summary["metrics"]["confusion"] == direct.confusion


def finetune_on_two_ranks(out, data: str) -> dict:
    """`structprune finetune OUT --data DATA --epochs 1 --distill` under torchrun with two
    ranks; its finetune record, checked to come from both ranks with a checkpoint written."""
    done = subprocess.run(
        ["torchrun", "--standalone", "--nproc_per_node", "2", "-m", "structprune",
         "finetune", str(out), "--data", data, "--epochs", "1", "--distill"],
        capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    record = json.loads((out / "report.json").read_text())["finetune"]
    assert record["world_size"] == 2 and (out / "checkpoint.safetensors").is_file()
    return record


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_finetune_under_torchrun_reports_what_the_saved_model_scores(tmp_path):
    import structprune as sp
    from structprune.front.cli import main

    data = digits_factory(tmp_path, 4, 3)
    out = tmp_path / "out"
    assert main(["prune", "structprune:digits_cnn", "--data", data, "--ratio", "0.5",
                 "--out", str(out), "--no-onnx"]) == 0
    record = finetune_on_two_ranks(out, data)
    tuned = sp.load(out, "structprune:digits_cnn")
    direct = evaluate(tuned, from_factory(data).val)
    assert record["after"]["accuracy"] == pytest.approx(direct.accuracy)
    assert record["after"]["samples"] == 96


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun is not installed")
def test_label_free_finetune_under_torchrun_reports_the_saved_models_fidelity(tmp_path):
    import structprune as sp
    from structprune.accuracy.evaluate import fidelity
    from structprune.front.cli import main

    from .test_finetune import _tiny

    spec, data = _tiny(tmp_path)
    out = tmp_path / "out"
    assert main(["prune", spec, "--input-shape", "1,1,16,16", "--ratio", "0.5",
                 "--out", str(out), "--no-onnx"]) == 0
    record = finetune_on_two_ranks(out, data)
    # the pooled fidelity is that of the saved model on the whole validation split
    direct = fidelity(sp.load(out, spec), build_model(spec), from_factory(data).val)
    assert record["fidelity"]["after"]["samples"] == direct["samples"] == 16
    assert record["fidelity"]["after"]["rel_error"] == pytest.approx(direct["rel_error"])
