"""YOLO end to end.

YOLOv8n, the model people prune most, at 640x640 (issue #16's headline case): pruned at ratio
0.5 with exact-only groups, it must keep at most 35% of its MACs, equal an independent masked
dense model on the head's *raw* outputs (box distribution logits and class logits) with every
output channel compared on its own scale, and run in ONNX Runtime with the same decoded
outputs, again channel by channel.

Back into ultralytics (issue #25): a pruned model saved as an ultralytics checkpoint
predicts, validates and exports in ultralytics with the pruned widths (the exported file's
MACs counted from its own shapes equal structprune's count), trains with ultralytics' trainer
on the pruned architecture, distilled or not, for each task, and is fine-tuned in a run
folder whose files reload with ``structprune.load`` and ``YOLO``; all with the network
unreachable.
"""

from __future__ import annotations

import copy
import importlib.util
import pickletools
import socket
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import shape_inference

import structprune as sp
from structprune.accuracy.train import CHANNEL_SCALE_FLOOR
from structprune.config import PruneConfig, RunConfig
from structprune.core.counts import count_macs
from structprune.deploy.export import run_onnx
from structprune.errors import StructPruneError
from structprune.front.io import load
from structprune.front.models import build_model, export_form, native_form
from structprune.front.runs import model_record, read_report
from structprune.front.workflow import prune_to_dir
from structprune.front.yolo import (
    CHECKPOINT,
    DistilledLoss,
    finetune_yolo,
    head_distillation,
    pruned_trainer,
    save_ultralytics_checkpoint,
    yolo_metrics,
)
from structprune.tree import random_inputs

from .oracles import randomize, weight_masked

pytest.importorskip("ultralytics")


def per_channel_error(reference: torch.Tensor, got: torch.Tensor) -> float:
    """Largest error of any channel (axis 1), relative to that channel's own largest value."""
    ref, got = reference.double().transpose(0, 1).flatten(1), got.double().transpose(0, 1).flatten(1)
    scale = ref.abs().amax(1).clamp_min(1e-6)
    return float(((ref - got).abs().amax(1) / scale).max())


def raw_outputs(model: torch.nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The Detect head's raw predictions: outside export form, eval returns (decoded, raw)."""
    model = copy.deepcopy(model)
    model.model[-1].export = False
    with torch.no_grad():
        _, raw = model(x)
    return raw


@pytest.fixture(scope="module")
def yolov8n(tmp_path_factory):
    model = randomize(build_model("ultralytics:yolov8n.yaml"))  # non-trivial BN statistics
    inputs = random_inputs([(1, 3, 640, 640)])
    out = tmp_path_factory.mktemp("yolov8n")
    result, figures = prune_to_dir(model, inputs, out, PruneConfig(ratio=0.5, exact_only=True))
    return model, result, figures, out


def test_yolov8n_at_half_keeps_at_most_35_percent_of_its_macs(yolov8n):
    model, result, figures, _ = yolov8n
    assert figures["macs_ratio"] <= 0.35
    assert figures["verification"]["max_rel_error"] < 1e-4
    head = result.model.model[-1]
    for level in range(head.nl):  # box and class outputs stay whole; DFL is a constant
        assert head.cv2[level][2].out_channels == 4 * head.reg_max
        assert head.cv3[level][2].out_channels == head.nc
    torch.testing.assert_close(head.dfl.conv.weight, model.model[-1].dfl.conv.weight)


def test_yolov8n_raw_head_outputs_equal_the_masked_dense_model_channel_by_channel(yolov8n):
    model, result, _, _ = yolov8n
    x = torch.randn(2, 3, 640, 640, generator=torch.Generator().manual_seed(5))
    want = raw_outputs(weight_masked(model, result.plan), x)
    got = raw_outputs(result.model, x)
    for key in ("boxes", "scores"):
        assert got[key].shape == want[key].shape
        assert per_channel_error(want[key], got[key]) < 1e-4, key


def test_yolov8n_onnx_file_matches_torch_channel_by_channel(yolov8n):
    _, result, _, out = yolov8n
    x = torch.randn(2, 3, 640, 640, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        want = result.model(x)
    got = torch.from_numpy(np.asarray(run_onnx(out / "pruned.onnx", (x,))[0]))
    assert got.shape == want.shape == (2, 84, 8400)
    assert per_channel_error(want, got) < 1e-4


# ------------------------------------------------------------------ back into ultralytics
# A small YOLO (C2f, SPPF, Concat and a two-level head, ultralytics' own modules; its
# exporter runs C2f through ``forward_split``, which reads the pruned width from ``c``),
# pruned and taken round ultralytics' checkpoint, predictor, validator, exporter and
# trainer with the network unreachable. The real YOLOv8n and YOLO11n-seg go the same way in
# the zoo group.

ROOT = Path(__file__).resolve().parents[1]
SIZE = 64  # the tiny dataset's images and the models' input
# task -> (model class, head, head arguments): six classes; 16 mask prototypes of 32
# channels; two keypoints of (x, y, visibility)
HEADS = {"detect": ("DetectionModel", "Detect", [6]),
         "segment": ("SegmentationModel", "Segment", [6, 16, 32]),
         "pose": ("PoseModel", "Pose", [6, [2, 3]])}


def generator():
    """benchmarks/synthetic_detection.py, the seeded dataset generator."""
    spec = importlib.util.spec_from_file_location(
        "synthetic_detection", ROOT / "benchmarks" / "synthetic_detection.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mini_yolo(task: str, seed: int = 0) -> torch.nn.Module:
    """A small ultralytics model of six classes, BN statistics randomised, in export form."""
    from ultralytics.nn import tasks

    model_class, head, head_args = HEADS[task]
    cfg = {"nc": 6, "backbone": [
        [-1, 1, "Conv", [16, 3, 2]], [-1, 1, "Conv", [32, 3, 2]], [-1, 1, "C2f", [32, True]],
        [-1, 1, "Conv", [64, 3, 2]], [-1, 1, "C2f", [64, True]], [-1, 1, "Conv", [64, 3, 2]],
        [-1, 1, "SPPF", [64, 5]]],
        "head": [[-1, 1, "nn.Upsample", [None, 2, "nearest"]], [[-1, 4], 1, "Concat", [1]],
                 [-1, 1, "C2f", [48]], [[9, 6], 1, head, head_args]]}
    if task == "pose":
        cfg["kpt_shape"] = head_args[1]
    torch.manual_seed(seed)
    model = getattr(tasks, model_class)(cfg, ch=3, nc=6, verbose=False).eval()
    randomize(model, seed)
    export_form(model)
    return model


@pytest.fixture(scope="module")
def network_attempts():
    """The network unreachable for the whole module: every connection and name lookup fails
    (and is recorded), as on a machine with no network."""
    attempts: list[str] = []

    def refuse(what: object) -> None:
        attempts.append(str(what))
        raise OSError(f"network blocked by the test ({what})")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "connect", lambda self, address: refuse(address))
        patch.setattr(socket.socket, "connect_ex", lambda self, address: refuse(address))
        patch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(address))
        patch.setattr(socket, "getaddrinfo", lambda host, *a, **k: refuse(host))
        yield attempts


@pytest.fixture(scope="module")
def shapes(tmp_path_factory, network_attempts):
    """The tiny datasets (8 training and 4 validation images of 64 px) of each task."""
    make = generator()
    root = tmp_path_factory.mktemp("shapes")
    return {task: make.generate(root / task, train=8, val=4, size=SIZE, seed=3, task=task)
            for task in HEADS}


@pytest.fixture(scope="module")
def mini_run(tmp_path_factory, network_attempts):
    """The small detector saved as an ultralytics checkpoint (the dense model), pruned at
    half into a run folder by ``prune_to_dir``, with ``pruned.pt`` beside."""
    tmp = tmp_path_factory.mktemp("mini")
    dense_pt = save_ultralytics_checkpoint(mini_yolo("detect"), None, tmp / "dense.pt",
                                           imgsz=SIZE)
    spec = f"ultralytics:{dense_pt}"
    dense = build_model(spec)
    out = tmp / "run"
    result, _ = prune_to_dir(dense, random_inputs([(1, 3, SIZE, SIZE)]), out,
                             PruneConfig(ratio=0.5), run=RunConfig(exporter="torchscript"),
                             record=model_record(spec))
    save_ultralytics_checkpoint(result.model, dense_pt, out / "pruned.pt", imgsz=SIZE)
    return dense, result, out


def pickled_classes(path: Path) -> set[str]:
    """The modules of every class a torch.save file's pickle refers to."""
    with zipfile.ZipFile(path) as archive:
        data = archive.read(next(n for n in archive.namelist() if n.endswith("data.pkl")))
    found, strings = set(), []
    for opcode, arg, _ in pickletools.genops(data):
        if opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE"):
            strings.append(arg)
        elif opcode.name == "STACK_GLOBAL":
            found.add(strings[-2])
        elif opcode.name == "GLOBAL":
            found.add(arg.split(" ")[0])
    return found


def onnx_macs(path: Path) -> int:
    """Multiply-accumulates of an ONNX file's Conv, ConvTranspose, MatMul and Gemm nodes,
    from its own shapes (shape inference), independently of structprune."""
    model = shape_inference.infer_shapes(onnx.load(str(path)))
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.value_info, *model.graph.input, *model.graph.output]}
    shapes.update({t.name: list(t.dims) for t in model.graph.initializer})
    total = 0
    for node in model.graph.node:
        if node.op_type == "Conv":  # output elements x (input channels per group x taps)
            weight = shapes[node.input[1]]
            total += int(np.prod(shapes[node.output[0]])) * int(np.prod(weight[1:]))
        elif node.op_type == "ConvTranspose":  # input elements x (outputs each feeds)
            weight = shapes[node.input[1]]
            total += int(np.prod(shapes[node.input[0]])) * int(np.prod(weight[1:]))
        elif node.op_type in ("MatMul", "Gemm"):
            a = shapes[node.input[0]]
            total += int(np.prod(shapes[node.output[0]])) * a[-1]
    return total


def round_trip(pruned: torch.nn.Module, checkpoint: Path, data: Path, size: int) -> None:
    """``YOLO(checkpoint)`` predicts, validates and exports with the pruned widths: every
    tensor has the pruned shape and value, the exported file's MACs are structprune's count
    and its outputs the pruned model's."""
    from ultralytics import YOLO

    assert not any(m.startswith("structprune") for m in pickled_classes(checkpoint))
    yolo = YOLO(str(checkpoint))
    want = pruned.state_dict()
    got = yolo.model.state_dict()
    assert list(got) == list(want)
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape, name
        torch.testing.assert_close(got[name].float(), tensor.float(), rtol=0, atol=0)
    image = np.random.default_rng(0).integers(0, 255, (size, size + 16, 3), dtype=np.uint8)
    assert len(yolo.predict(image, imgsz=size, verbose=False)) == 1
    assert yolo.val(data=str(data), imgsz=size, batch=4, workers=0, plots=False,
                    verbose=False, project=str(checkpoint.parent / "runs")).results_dict
    exported = Path(yolo.export(format="onnx", imgsz=size, simplify=False))
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1))
    assert onnx_macs(exported) == count_macs(sp.capture(pruned, (x,))) > 0
    outputs = run_onnx(exported, (x,))
    with torch.no_grad():
        expected = pruned(x)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    for want_out, got_out in zip(expected, outputs, strict=True):
        assert per_channel_error(want_out, torch.from_numpy(np.asarray(got_out))) < 1e-4


def test_pruned_checkpoint_predicts_validates_and_exports_in_ultralytics(mini_run, shapes):
    _, result, out = mini_run
    c2f = result.model.model[2]
    assert c2f.cv1.conv.out_channels < 2 * 16 and c2f.c == c2f.cv1.conv.out_channels // 2
    round_trip(result.model, out / "pruned.pt", shapes["detect"], SIZE)


def test_yolo_metrics_of_the_module_and_of_its_checkpoint_agree(mini_run, shapes):
    _, result, out = mini_run
    from_module = yolo_metrics(result.model, shapes["detect"], SIZE, batch=4)
    from_file = yolo_metrics(out / "pruned.pt", shapes["detect"], SIZE, batch=4)
    assert from_module == from_file
    assert from_module["task"] == "detect" and from_module["images"] == 4
    assert set(from_module["box"]) == {"precision", "recall", "mAP50", "mAP50-95"}


def test_a_dataset_of_other_classes_is_refused_in_one_line(mini_run, tmp_path):
    _, result, _ = mini_run
    data = generator().generate(tmp_path / "d", train=1, val=1, size=SIZE)
    data.write_text(data.read_text() + "  6: extra\n")
    with pytest.raises(StructPruneError, match="predicts 6 classes .* has 7"):
        yolo_metrics(result.model, data, SIZE)


def relative_mse_reference(s: torch.Tensor, t: torch.Tensor) -> float:
    """mean((s - t)^2) / mean(t^2) per channel (axis 1), the scale floored at a share of the
    mean over channels, averaged over channels (numpy, float64)."""
    s, t = s.double().numpy(), t.double().numpy()
    axes = tuple(i for i in range(t.ndim) if i != 1)
    scale = (t ** 2).mean(axes)
    scale = np.maximum(scale, scale.mean() * CHANNEL_SCALE_FLOOR + 1e-12)
    return float((((s - t) ** 2).mean(axes) / scale).mean())


def test_the_distillation_term_is_the_per_channel_relative_error_of_each_raw_output(mini_run):
    dense, result, _ = mini_run
    student, teacher = native_form(copy.deepcopy(result.model)), native_form(copy.deepcopy(dense))
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        s_raw = student.train()(x)  # the training dict, as the loss sees it
        t_out = teacher.eval()(x)  # (decoded, raw) in eval mode
    t_raw = t_out[1]
    assert set(s_raw) == {"boxes", "scores", "feats"}
    want = sum(relative_mse_reference(s_raw[k], t_raw[k]) for k in ("boxes", "scores"))
    assert float(head_distillation(s_raw, t_out)) == pytest.approx(want, rel=1e-5)
    assert float(head_distillation(t_raw, t_out)) == 0.0

    class Plain:  # a stand-in for ultralytics' loss: three terms, scaled by the batch
        def __call__(self, preds, batch):
            terms = torch.tensor([1.0, 2.0, 3.0])
            return terms * batch["img"].shape[0], {"box_loss": terms[0]}

    total, items = DistilledLoss(Plain(), teacher.eval(), 0.5)(s_raw, {"img": x})
    torch.testing.assert_close(total, torch.tensor([2.0, 4.0, 6.0, 0.5 * 2 * want]),
                               rtol=1e-5, atol=0)
    assert set(items) == {"box_loss", "distill_loss"}


def test_ultralytics_trains_the_pruned_architecture_with_the_pruned_trainer(mini_run, shapes,
                                                                            tmp_path):
    from ultralytics import YOLO
    from ultralytics.models.yolo.detect import DetectionTrainer

    from structprune.front.yolo import PrunedDetectionTrainer  # made on first use

    assert pruned_trainer("detect") is PrunedDetectionTrainer
    assert issubclass(PrunedDetectionTrainer, DetectionTrainer)
    _, result, out = mini_run
    yolo = YOLO(str(out / "pruned.pt"))
    yolo.train(trainer=PrunedDetectionTrainer, data=str(shapes["detect"]), epochs=1,
               imgsz=SIZE, batch=4, workers=0, device="cpu", amp=False, plots=False,
               project=str(tmp_path), name="train", exist_ok=True, verbose=False)
    trained = YOLO(str(tmp_path / "train" / "weights" / "last.pt")).model.state_dict()
    want = result.model.state_dict()
    assert {k: v.shape for k, v in trained.items()} == {k: v.shape for k, v in want.items()}
    moved = [k for k, v in want.items() if v.is_floating_point()
             and not torch.equal(trained[k].float(), v.half().float())]
    assert moved  # it trained


def test_pretrained_false_reinitialises_the_pruned_architecture(mini_run):
    from structprune.front.yolo import _reinitialise

    _, result, _ = mini_run
    model = copy.deepcopy(result.model)
    _reinitialise(model)
    before, after = result.model.state_dict(), model.state_dict()
    assert {k: v.shape for k, v in after.items()} == {k: v.shape for k, v in before.items()}
    weights = [k for k in before if k.endswith("conv.weight")]
    assert weights and not any(torch.equal(before[k], after[k]) for k in weights)


def test_finetune_yolo_distils_keeps_the_plan_and_writes_every_file_again(mini_run, shapes):
    dense, result, out = mini_run
    before = {name: (out / name).read_bytes() for name in ("pruned.safetensors", "pruned.pt",
                                                           "pruned.onnx")}
    record = finetune_yolo(out, shapes["detect"], 1, distill=True, batch=4, device="cpu",
                           exporter="torchscript")
    assert record["imgsz"] == SIZE and record["distill"]
    for key in ("dense", "before", "after"):
        assert set(record[key]["box"]) == {"precision", "recall", "mAP50", "mAP50-95"}
    assert read_report(out)["finetune"]["after"] == record["after"]
    for name, data in before.items():
        assert (out / name).read_bytes() != data, name
    plan = sp.Plan.load(out / "plan.json")
    reloaded = sp.load(out, copy.deepcopy(dense))
    state = reloaded.state_dict()
    for entry in plan.params:  # every sliced tensor has the plan's kept size on its axis
        assert state[entry["name"]].shape[entry["dim"]] == len(entry["keep"])
    assert {k: v.shape for k, v in state.items()} == \
        {k: v.shape for k, v in result.model.state_dict().items()}
    from ultralytics import YOLO

    checkpoint = YOLO(str(out / "pruned.pt")).model.state_dict()
    for name, tensor in state.items():
        torch.testing.assert_close(checkpoint[name], tensor, rtol=0, atol=0)
    assert record["onnx_rel_error"] < 1e-3
    distill_log = (Path(record["run"]) / "results.csv").read_text().splitlines()[0]
    assert "distill_loss" in distill_log
    # ultralytics ran the fine-tuning with SGD at 0.01 (FINETUNE_OPTIMIZER), not "auto"
    import yaml

    args = yaml.safe_load((Path(record["run"]) / "args.yaml").read_text())
    assert (args["optimizer"], args["lr0"]) == ("SGD", 0.01)


@pytest.mark.zoo  # some 20 s each on a loaded 2-core machine
@pytest.mark.parametrize("task", ["segment", "pose"])
def test_segment_and_pose_train_on_the_pruned_architecture(task, shapes, tmp_path):
    from ultralytics import YOLO

    dense = mini_yolo(task)
    result = sp.prune(dense, random_inputs([(1, 3, SIZE, SIZE)]), 0.5)
    checkpoint = save_ultralytics_checkpoint(result.model, None, tmp_path / "pruned.pt",
                                             imgsz=SIZE)
    trainer = pruned_trainer(task, teacher=dense)
    YOLO(str(checkpoint)).train(trainer=trainer, data=str(shapes[task]), epochs=1, imgsz=SIZE,
                                batch=4, workers=0, device="cpu", amp=False, plots=False,
                                project=str(tmp_path), name="t", exist_ok=True, verbose=False)
    trained = YOLO(str(tmp_path / "t" / "weights" / "last.pt")).model.state_dict()
    assert {k: v.shape for k, v in trained.items()} == \
        {k: v.shape for k, v in result.model.state_dict().items()}


def test_the_cli_round_trip_prune_eval_finetune_on_a_dataset_yaml(shapes, tmp_path, capsys):
    """`structprune prune --data data.yaml` on an ultralytics checkpoint writes pruned.pt and
    ultralytics' mAP of the dense, pruned and recovered model; `eval` prints mAP of both;
    `finetune` trains with ultralytics' trainer and keeps every pruned shape."""
    from structprune.front.cli import main

    dense_pt = save_ultralytics_checkpoint(mini_yolo("detect"), None, tmp_path / "dense.pt",
                                           imgsz=SIZE)
    yaml, out = str(shapes["detect"]), tmp_path / "run"
    assert main(["prune", f"ultralytics:{dense_pt}", "--input-shape", f"1,3,{SIZE},{SIZE}",
                 "--ratio", "0.5", "--data", yaml, "--recover", "bn", "--out", str(out),
                 "--exporter", "torchscript"]) == 0
    report = read_report(out)
    assert set(report["map"]) == {"dense", "pruned", "recovered"}
    for figures in report["map"].values():
        assert 0.0 <= figures["box"]["mAP50-95"] <= figures["box"]["mAP50"] <= 1.0
    assert report["map"]["dense"]["images"] == 4
    assert (out / CHECKPOINT).is_file()
    pruned = load(out, f"ultralytics:{dense_pt}")  # structprune's own files
    from ultralytics import YOLO

    reloaded = YOLO(str(out / CHECKPOINT)).model
    assert {k: v.shape for k, v in reloaded.state_dict().items()} == \
        {k: v.shape for k, v in pruned.state_dict().items()}

    capsys.readouterr()
    assert main(["eval", str(out), "--data", yaml]) == 0
    printed = capsys.readouterr().out
    assert "box mAP50-95" in printed and "ultralytics' validator" in printed

    assert main(["finetune", str(out), "--data", yaml, "--epochs", "1", "--distill"]) == 0
    after = read_report(out)["finetune"]
    assert after["trainer"] == "ultralytics" and after["distill"]
    tuned = load(out, f"ultralytics:{dense_pt}")
    assert {k: v.shape for k, v in tuned.state_dict().items()} == \
        {k: v.shape for k, v in pruned.state_dict().items()}
    assert not all(torch.equal(tuned.state_dict()[k], v)
                   for k, v in pruned.state_dict().items() if v.is_floating_point())


def test_nothing_was_downloaded(network_attempts):
    """Runs after the tests above, which passed with the network unreachable. All that
    ultralytics reached for was github.com: its dataset check asks whether the Arial font is
    there to download (a HEAD request; it carries on without it). No connectivity probe, pip
    check, analytics, weights or assets."""
    assert set(network_attempts) <= {"github.com"}, network_attempts


@pytest.mark.zoo
@pytest.mark.parametrize("name", ["yolov8n", "yolo11n-seg"])
def test_real_yolo_checkpoint_round_trip_keeps_the_macs(name, shapes, tmp_path,
                                                        network_attempts):
    size = 128
    dense = randomize(build_model(f"ultralytics:{name}.yaml"))
    result = sp.prune(dense, random_inputs([(1, 3, size, size)]), 0.5)
    checkpoint = save_ultralytics_checkpoint(result.model, f"{name}.yaml",
                                             tmp_path / "pruned.pt", imgsz=size)
    data = generator().generate(tmp_path / "coco", train=1, val=2, size=size,
                                task="segment" if "seg" in name else "detect")
    lines = data.read_text().splitlines()
    names = [f"  {i}: c{i}" for i in range(80)]
    data.write_text("\n".join(lines[:lines.index("names:") + 1] + names) + "\n")
    round_trip(result.model, checkpoint, data, size)
