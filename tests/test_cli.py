"""The command line: the files it writes, and one clear line (exit 2) for every user error."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import onnxruntime as ort
import pytest
import torch

import structprune as sp
from structprune.front.cli import main

from .fixtures import DATA, TINY


def run(*args):
    return main([str(a) for a in args])


def test_prune_writes_plan_weights_and_onnx(tmp_path, capsys):
    out = tmp_path / "out"
    assert run("prune", TINY, "--ratio", "0.5", "--out", out, "--input-shape", "1,3,16,16",
               "--exporter", "torchscript") == 0
    printed = capsys.readouterr().out
    assert "MACs" in printed and "verification: OK" in printed
    assert {p.name for p in out.iterdir()} == {"plan.json", "pruned.safetensors", "dense.onnx",
                                               "pruned.onnx", "report.json", "widths.png"}
    plan = sp.Plan.load(out / "plan.json")
    model = sp.load(out, TINY)
    assert model[0].out_channels == 8
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    session = ort.InferenceSession(str(out / "pruned.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        want = model.eval()(torch.from_numpy(x)).numpy()
    assert got.shape == (5, 5) and np.allclose(got, want, rtol=1e-4, atol=1e-5)
    report = json.loads((out / "report.json").read_text())
    assert report["macs_pruned"] < 0.5 * report["macs_dense"]
    assert plan.params


def test_two_inputs_and_analyze(tmp_path, capsys):
    spec = f"{DATA}:two_inputs"
    assert run("prune", spec, "--ratio", "0.5", "--out", tmp_path / "o", "--no-onnx",
               "--input-shape", "1,3,8,8", "--input-shape", "1,1,8,8") == 0
    capsys.readouterr()
    assert run("analyze", spec, "--input-shape", "1,3,8,8", "--input-shape", "1,1,8,8") == 0
    lines = capsys.readouterr().out.splitlines()
    # a + b share their 8 output channels (exact); a's 3 input channels come from a model
    # input and out's 2 channels are a model output, so both are blocked
    assert lines[:2] == [f"structprune: {spec} (captured with fx)",
                         "3 groups: 1 exact, 0 approximate, 2 blocked"]
    groups = [re.match(r"  \[ *(\d+)\] (\S+) +(\d+) units  ", line).groups()
              for line in lines if line.startswith("  [")]
    assert groups == [("0", "exact", "8"), ("1", "blocked", "3"), ("2", "blocked", "2")]


def _bad_weights(tmp_path):
    path = tmp_path / "w.pt"
    path.write_bytes(b"\x80\x04garbage")
    return path


def _plan_dir_for_other_model(tmp_path):
    return tmp_path


CASES = {
    "unknown spec": (["prune", "torchvision:resnet9000", "--ratio", "0.5"], "no model"),
    "bad source": (["prune", "hub:thing", "--ratio", "0.5"], "unknown model source"),
    "missing file": (["prune", "nope.py:f", "--ratio", "0.5"], "does not exist"),
    "missing factory": (["prune", f"{DATA}:nothing", "--ratio", "0.5"], "no function"),
    "factory raises": (["prune", f"{DATA}:raises", "--ratio", "0.5"], "factory exploded"),
    "not a module": (["prune", f"{DATA}:not_a_module", "--ratio", "0.5"], "not an nn.Module"),
    "ratio 1": (["prune", TINY, "--ratio", "1"], "outside [0, 1)"),
    "ratio negative": (["prune", TINY, "--ratio", "-0.2"], "outside [0, 1)"),
    "round-to 0": (["prune", TINY, "--ratio", "0.5", "--round-to", "0"], "--round-to"),
    "ignore nothing": (["prune", TINY, "--ratio", "0.5", "--ignore", "zzz"], "matches no module"),
    "shape not numeric": (["prune", TINY, "--ratio", "0.5", "--input-shape", "1,a,3"],
                          "comma-separated"),
    "shape wrong rank": (["prune", TINY, "--ratio", "0.5", "--input-shape", "3,16,16,1,1"],
                         "fails on the example inputs"),
    "shape wrong count": (["prune", TINY, "--ratio", "0.5", "--input-shape", "1,3,16,16",
                           "--input-shape", "1,3,16,16"], "example inputs were given"),
    "untraceable": (["prune", f"{DATA}:untraceable", "--ratio", "0.5", "--input-shape",
                     "1,3,8,8"], "cannot capture"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_errors_exit_2_with_one_line_and_no_output(case, tmp_path, capsys):
    args, message = CASES[case]
    out = tmp_path / "out"
    code = run(*args, "--out", out) if args[0] == "prune" else run(*args)
    err = capsys.readouterr().err
    assert code == 2
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".structprune")]


def test_bad_weights_file(tmp_path, capsys):
    code = run("prune", TINY, "--ratio", "0.5", "--out", tmp_path / "o", "--weights",
               _bad_weights(tmp_path), "--input-shape", "1,3,16,16")
    assert code == 2 and "cannot read weights" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_out(tmp_path, capsys):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    assert run("prune", TINY, "--ratio", "0.5", "--out", locked / "o") == 2


def test_unwritable_out_as_file(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert run("prune", TINY, "--ratio", "0.5", "--out", target) == 2
    assert "not a directory" in capsys.readouterr().err


def test_console_script_entry_point(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "structprune", "prune", "torchvision:nope",
                           "--ratio", "0.5", "--out", str(tmp_path / "o")],
                          capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.startswith("structprune: error:")


def test_same_command_gives_a_byte_identical_plan(tmp_path):
    for out in ("a", "b"):
        assert run("prune", TINY, "--ratio", "0.4", "--out", tmp_path / out, "--no-onnx",
                   "--input-shape", "1,3,16,16") == 0
    assert (tmp_path / "a" / "plan.json").read_bytes() == (tmp_path / "b" / "plan.json").read_bytes()


def test_analyze_reports_capture_path_groups_and_reasons(capsys):
    assert run("analyze", f"{DATA}:hard_coded_view", "--input-shape", "1,3,4,4") == 0
    out = capsys.readouterr().out
    assert "captured with fx" in out
    assert re.search(r"\] blocked +\d+ units", out) and "hard-coded" in out and "reaches a model output" in out
    assert run("analyze", f"{DATA}:shape_branch", "--input-shape", "1,3,8,8") == 0
    assert "captured with export" in capsys.readouterr().out
    assert run("analyze", f"{DATA}:shape_branch", "--input-shape", "1,3,8,8", "--json") == 0
    data = json.loads(capsys.readouterr().out)
    assert data["summary"]["capture"] == "export" and data["groups"]


def test_reapplying_a_plan_and_refusing_bad_ones(tmp_path, capsys):
    first = tmp_path / "first"
    assert run("prune", TINY, "--ratio", "0.5", "--out", first, "--no-onnx",
               "--input-shape", "1,3,16,16") == 0
    again = tmp_path / "again"
    assert run("prune", TINY, "--plan", first / "plan.json", "--out", again, "--input-shape",
               "1,3,16,16", "--simplify", "--exporter", "torchscript") == 0
    assert (again / "plan.json").read_bytes() == (first / "plan.json").read_bytes()
    capsys.readouterr()

    other = tmp_path / "other.json"
    other.write_text((first / "plan.json").read_text().replace('"0.weight"', '"9.weight"'))
    truncated = tmp_path / "truncated.json"
    truncated.write_text((first / "plan.json").read_text()[:300])
    data = json.loads((first / "plan.json").read_text())
    bad_settings = tmp_path / "bad_settings.json"
    bad_settings.write_text(json.dumps({**data, "settings": [1]}))
    partial = tmp_path / "partial.json"
    bias = next(i for i, p in enumerate(data["params"]) if p["name"].endswith(".bias"))
    partial.write_text(json.dumps({**data, "params": data["params"][:bias] +
                                   data["params"][bias + 1:]}))
    for plan, message in ((other, "different model"), (truncated, "not valid JSON"),
                          (tmp_path / "missing.json", "does not exist"),
                          (bad_settings, '"settings" must be an object'),
                          (partial, "does not slice every coupled tensor")):
        out = tmp_path / f"out_{plan.stem}"
        assert run("prune", TINY, "--plan", plan, "--out", out, "--input-shape", "1,3,16,16") == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and not out.exists()
    assert run("prune", TINY, "--out", tmp_path / "x") == 2
    assert "--ratio" in capsys.readouterr().err
