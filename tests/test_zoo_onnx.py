"""ONNX files of model zoos (issue #27), exported here with no download: torchvision and timm
classifiers and segmentation models by torch's two exporters (TorchScript at opset 17,
torch.export at its own opset), a segmentation_models_pytorch U-Net, and ultralytics'
YOLOv8n and YOLO11n by ultralytics' own exporter (no NMS). Each is converted, pruned with
exact-only groups at ratio 0.5 and written back as ``pruned.onnx`` with the file's names,
opset and axes; ONNX Runtime on it must equal the masked dense model."""

from __future__ import annotations

import contextlib
import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import onnx
import pytest
import torch

from structprune.front.models import (
    build_model,
    export_signature,
    import_ultralytics,
)

from .oracles import randomize
from .test_onnx_in import masked_error, prune_file, write_onnx

pytest.importorskip("onnx2torch")


@dataclass(frozen=True)
class Case:
    name: str
    write: Callable[[Path], str]  # folder -> the ONNX file written there

    def __str__(self) -> str:
        return self.name


def zoo(spec: str, dynamo: bool = False, size: int = 64) -> Case:
    """A structprune model spec exported by TorchScript (opset 17) or torch.export."""
    def write(folder: Path) -> str:
        return write_onnx(build_model(spec), folder / "model.onnx", dynamo=dynamo, size=size)
    return Case(f"{spec}-{'dynamo' if dynamo else 'torchscript'}", write)


def unet(folder: Path) -> str:
    import segmentation_models_pytorch as smp

    torch.manual_seed(0)
    model = smp.Unet(encoder_name="resnet18", encoder_weights=None, classes=3)
    return write_onnx(model, folder / "model.onnx", size=64)


def ultralytics(config: str, size: int = 128) -> Case:
    """``YOLO(config).export(format="onnx", nms=False)``: ultralytics' own exporter, offline,
    a static 1x3xSIZExSIZE input, BN statistics randomised first."""
    def write(folder: Path) -> str:
        import_ultralytics()
        from ultralytics import YOLO

        logging.getLogger("ultralytics").setLevel(logging.ERROR)
        torch.manual_seed(0)
        yolo = YOLO(config, verbose=False)
        randomize(yolo.model)
        with contextlib.chdir(folder), contextlib.redirect_stdout(io.StringIO()):
            return str(Path(yolo.export(format="onnx", imgsz=size, nms=False, simplify=False,
                                        dynamic=False, device="cpu", verbose=False)).resolve())
    return Case(f"ultralytics:{config}", write)


CASES = [
    zoo("torchvision:resnet18", dynamo=True),
    zoo("torchvision:resnet50"),
    zoo("torchvision:mobilenet_v2"),
    zoo("torchvision:mobilenet_v3_small", dynamo=True),
    zoo("torchvision:efficientnet_b0"),
    zoo("torchvision:regnet_y_400mf"),
    zoo("torchvision:shufflenet_v2_x1_0", dynamo=True),
    zoo("torchvision:densenet121"),
    zoo("torchvision:convnext_tiny"),
    zoo("torchvision:googlenet", dynamo=True),
    zoo("torchvision:squeezenet1_1"),
    zoo("torchvision:mnasnet0_5", dynamo=True),
    zoo("torchvision:fcn_resnet50", dynamo=True),
    zoo("torchvision:deeplabv3_mobilenet_v3_large"),
    zoo("torchvision:lraspp_mobilenet_v3_large", dynamo=True),
    Case("smp:Unet/resnet18", unet),
    zoo("timm:resnet26d"),
    zoo("timm:mobilenetv3_small_100"),
    zoo("timm:mixnet_s"),
    ultralytics("yolov8n.yaml"),
    ultralytics("yolo11n.yaml"),
]
NEEDS = {"smp:": "segmentation_models_pytorch", "timm:": "timm", "ultralytics:": "ultralytics"}


@pytest.mark.zoo
@pytest.mark.parametrize("case", CASES, ids=str)
def test_onnx_file_prunes_exactly_and_matches_in_onnx_runtime(case: Case, tmp_path):
    for prefix, package in NEEDS.items():
        if case.name.startswith(prefix):
            pytest.importorskip(package)
    path = case.write(tmp_path)
    pruned = tmp_path / "pruned.onnx"
    result = prune_file(path, pruned)
    assert result.figures["macs_ratio"] < 0.9, result.figures
    proto, original = onnx.load(str(pruned)), onnx.load(path, load_external_data=False)
    assert [i.name for i in proto.graph.input] == [i.name for i in original.graph.input]
    assert [o.name for o in proto.graph.output] == [o.name for o in original.graph.output]
    assert proto.opset_import[0].version == original.opset_import[0].version
    batch = 2 if export_signature(path).batch_dynamic() else None
    # a detector's boxes (pixels) and class scores (0..1) share its output: each channel is
    # compared on its own scale
    detector = case.name.startswith("ultralytics:")
    assert masked_error(result, pruned, batch=batch, per_channel=detector) < 1e-4
