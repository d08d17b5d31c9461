"""Outside model zoos as people deploy them: ultralytics YOLO and RT-DETR,
segmentation-models-pytorch and torchvision's detection pieces and RAFT, built with random
weights (nothing downloaded).

Shared by ``tests/test_zoo_external.py`` and ``benchmarks/coverage_external.py``: ``CASES``
lists every model with its family and input shapes, ``build`` makes it, ``run`` prunes it
end to end (``structprune.prune``, then both ONNX files with
``structprune.deploy.export.export_pair``) and returns one row for the record.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from structprune.errors import StructPruneError

from .oracles import randomize


@dataclass(frozen=True)
class Case:
    name: str  # a structprune spec for ultralytics, otherwise a descriptive name
    family: str  # "ultralytics", "smp" or "torchvision"
    factory: Callable[[], nn.Module]
    shapes: tuple[tuple[int, ...], ...]
    needs: str | None = None  # the optional package the model comes from
    refused: str | None = None  # expected refusal: a substring of the one-line reason
    known_bug: str | None = None  # an open structprune bug this model shows (strict xfail)
    extra: dict[str, Any] = field(default_factory=dict)


def frozen_bn_stats(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial statistics for torchvision's FrozenBatchNorm2d (buffers, not parameters,
    so ``randomize`` leaves them at the identity)."""
    from torchvision.ops.misc import FrozenBatchNorm2d

    gen = torch.Generator().manual_seed(seed + 1)
    for m in model.modules():
        if isinstance(m, FrozenBatchNorm2d):
            c = m.weight.shape[0]
            m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
    return model


# ---------------------------------------------------------------- ultralytics

def _ultralytics(spec: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from structprune.front.models import build_model

        return build_model(spec)
    return make


def _yolo_cases() -> list[Case]:
    from structprune.front.models import default_input_shape

    cases = []
    for version in ("yolov8", "yolo11"):
        for size in ("n", "s"):
            for task in ("", "-seg", "-pose", "-cls"):
                spec = f"ultralytics:{version}{size}{task}.yaml"
                shape = default_input_shape(spec)
                # the headline case stays at ultralytics' 640; the others at 320 for time
                if task != "-cls" and spec != "ultralytics:yolov8n.yaml":
                    shape = (1, 3, 320, 320)
                cases.append(Case(spec, "ultralytics", _ultralytics(spec), (shape,),
                                  needs="ultralytics"))
    # the newest configs: RT-DETR's hybrid encoder and query selection, YOLO26's NMS-free
    # heads (both rank their detections with top-k) and its attention blocks; small inputs
    # for time (RT-DETR's 160 still gives 525 anchors for its 300 queries)
    for name, size in NEWEST.items():
        spec = f"ultralytics:{name}.yaml"
        cases.append(Case(spec, "ultralytics", _ultralytics(spec), ((1, 3, size, size),),
                          needs="ultralytics"))
    return cases


NEWEST = {"rtdetr-l": 160, "yolo26n": 256, "yolo26s": 256, "yolo26n-seg": 256}


# ---------------------------------------------------------- segmentation-models-pytorch

SMP = [("Unet", "resnet18"), ("Unet", "mobilenet_v2"), ("Unet", "efficientnet-b0"),
       ("UnetPlusPlus", "resnet18"), ("FPN", "resnet34"), ("FPN", "tu-mobilenetv3_large_100"),
       ("DeepLabV3Plus", "resnet18"), ("DeepLabV3Plus", "mobilenet_v2"), ("PSPNet", "resnet34"),
       ("Linknet", "resnet18"), ("MAnet", "resnet18"), ("PAN", "resnet34"),
       ("UPerNet", "resnet18"), ("Segformer", "resnet18"), ("Segformer", "mit_b0"),
       ("Unet", "tu-resnet18")]


def _smp(arch: str, encoder: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import segmentation_models_pytorch as smp

        return getattr(smp, arch)(encoder_name=encoder, encoder_weights=None, classes=3)
    return make


def _smp_cases() -> list[Case]:
    return [Case(f"smp:{arch}/{enc}", "smp", _smp(arch, enc), ((1, 3, 256, 256),), needs="smp")
            for arch, enc in SMP]


# ---------------------------------------------------------- torchvision detection, RAFT

class BackboneHead(nn.Module):
    """A detector as deployed without its transform and post-processing: the backbone's
    feature maps (a dict) go to the head as a list; the head's raw outputs come out."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.head = head

    def forward(self, x: torch.Tensor):
        return self.head(list(self.backbone(x).values()))


class MaskHead(nn.Module):
    """Mask R-CNN's mask branch on pooled RoI features: MaskRCNNHeads then the predictor."""

    def __init__(self, num_classes: int = 91):
        super().__init__()
        from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

        self.mask_head = MaskRCNNHeads(256, [256, 256, 256, 256], 1)
        self.mask_predictor = MaskRCNNPredictor(256, 256, num_classes)

    def forward(self, roi_features: torch.Tensor) -> torch.Tensor:
        return self.mask_predictor(self.mask_head(roi_features))


class Flow(nn.Module):
    """RAFT on two images with two refinement steps (the default is 12; each step is the
    same recurrent update, so two keep the recurrence and the run short)."""

    def __init__(self, raft: nn.Module, updates: int = 2):
        super().__init__()
        self.raft = raft
        self.updates = updates

    def forward(self, image1: torch.Tensor, image2: torch.Tensor) -> torch.Tensor:
        return self.raft(image1, image2, num_flow_updates=self.updates)[-1]


def _fpn_resnet18() -> nn.Module:
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    return resnet_fpn_backbone(backbone_name="resnet18", weights=None, trainable_layers=5)


def _fpn_mobilenet() -> nn.Module:
    from torchvision.models.detection.backbone_utils import mobilenet_backbone

    return mobilenet_backbone(backbone_name="mobilenet_v3_large", weights=None, fpn=True,
                              trainable_layers=6)


def _rpn() -> nn.Module:
    from torchvision.models.detection.rpn import RPNHead

    return BackboneHead(_fpn_resnet18(), RPNHead(256, 3))


def _retinanet() -> nn.Module:
    from torchvision.models.detection import retinanet_resnet50_fpn

    model = retinanet_resnet50_fpn(weights=None, weights_backbone=None)
    return BackboneHead(model.backbone, model.head)


def _fcos() -> nn.Module:
    from torchvision.models.detection import fcos_resnet50_fpn

    model = fcos_resnet50_fpn(weights=None, weights_backbone=None)
    return BackboneHead(model.backbone, model.head)


def _ssd() -> nn.Module:
    from torchvision.models.detection import ssd300_vgg16

    model = ssd300_vgg16(weights=None, weights_backbone=None)
    return BackboneHead(model.backbone, model.head)


def _ssdlite() -> nn.Module:
    from torchvision.models.detection import ssdlite320_mobilenet_v3_large

    model = ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None)
    return BackboneHead(model.backbone, model.head)


def _raft(name: str) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        from torchvision.models import optical_flow

        return Flow(getattr(optical_flow, name)(weights=None))
    return make


TORCHVISION = [
    Case("fpn_resnet18", "torchvision", _fpn_resnet18, ((1, 3, 256, 256),)),
    Case("fpn_mobilenet_v3_large", "torchvision", _fpn_mobilenet, ((1, 3, 256, 256),)),
    Case("rpn_head_resnet18_fpn", "torchvision", _rpn, ((1, 3, 256, 256),)),
    Case("retinanet_resnet50_fpn", "torchvision", _retinanet, ((1, 3, 256, 256),)),
    Case("fcos_resnet50_fpn", "torchvision", _fcos, ((1, 3, 256, 256),)),
    Case("ssd300_vgg16", "torchvision", _ssd, ((1, 3, 300, 300),)),
    Case("ssdlite320_mobilenet_v3_large", "torchvision", _ssdlite, ((1, 3, 320, 320),)),
    Case("maskrcnn_mask_head", "torchvision", MaskHead, ((4, 256, 14, 14),)),
    Case("raft_small", "torchvision", _raft("raft_small"), ((1, 3, 128, 128),) * 2),
    Case("raft_large", "torchvision", _raft("raft_large"), ((1, 3, 128, 128),) * 2),
]


def cases() -> list[Case]:
    return _yolo_cases() + _smp_cases() + TORCHVISION


CASES = cases()


def build(case: Case, seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    """The model in eval mode with realistic random weights, and seeded inputs."""
    torch.manual_seed(seed)
    model = frozen_bn_stats(randomize(case.factory().eval(), seed), seed)
    gen = torch.Generator().manual_seed(seed)
    return model, tuple(torch.randn(s, generator=gen) for s in case.shapes)


def one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def prune_case(case: Case, out: str | Path, ratio: float = 0.5, exporter: str = "auto"):
    """Build ``case`` and prune it end to end into ``out`` (exact-only; both ONNX files, the
    pruned one held to the dense one's own error in ONNX Runtime): ``(dense model, inputs,
    result, figures)``. Raises whatever structprune raises."""
    import structprune as sp
    from structprune.deploy.export import export_pair

    model, inputs = build(case)
    result = sp.prune(model, inputs, ratio, exact_only=True)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = dict(result.figures)
    figures["verification"] = result.verification.to_json()
    figures.update(export_pair(model, result.model, inputs, out / "dense.onnx",
                               out / "pruned.onnx", exporter))
    return model, inputs, result, figures


def run(case: Case, out: str | Path, ratio: float = 0.5) -> dict[str, Any]:
    """Prune ``case`` end to end into ``out``; the row for the record: pruned (with its
    figures), refused (with structprune's one-line reason) or crashed (any other exception,
    with where it was raised)."""
    start = time.perf_counter()
    row: dict[str, Any] = {"model": case.name, "family": case.family,
                           "input_shapes": [list(s) for s in case.shapes]}
    try:
        _, _, _, figures = prune_case(case, out, ratio)
    except StructPruneError as exc:
        row.update(status="refused", reason=str(exc))
    except Exception as exc:  # noqa: BLE001 - a crash is what is being recorded
        frames = traceback.extract_tb(exc.__traceback__)
        ours = [f for f in frames if "/structprune/" in f.filename] or frames
        row.update(status="crashed", reason=one_line(exc)[:500],
                   where=f"{Path(ours[-1].filename).name}:{ours[-1].lineno} {ours[-1].name}")
    else:
        verification = figures["verification"] or {}
        row.update(status="pruned", capture=figures.get("capture"),
                   macs_ratio=figures["macs_ratio"], params_ratio=figures["params_ratio"],
                   groups=figures["groups"], groups_pruned=figures["groups_pruned"],
                   blocked_groups=figures["blocked_groups"],
                   verify_rel_error=verification.get("max_rel_error"),
                   verify_float32_rel_error=verification.get("float32_rel_error"),
                   onnx_rel_error=figures.get("onnx_rel_error"),
                   onnx_dense_rel_error=figures.get("onnx_dense_rel_error"),
                   onnx_allowed_rel_error=figures.get("onnx_allowed_rel_error"),
                   exporter=figures.get("exporter_pruned"))
    if case.known_bug:
        row["known_bug"] = case.known_bug
    row["seconds"] = time.perf_counter() - start
    return row
