"""timm models (several need the torch.export fallback) and torchvision's segmentation
models prune at ratio 0.5: shapes unchanged, MACs reduced, equal to the masked dense model
under exact_only, and ONNX Runtime matching torch."""

import pytest
import torch

import structprune as sp
from structprune.core.verify import flatten_outputs
from structprune.front.models import build_model

from .oracles import check_pruned, export_and_check, outputs, randomize

TIMM = ["resnet18", "resnet26d", "efficientnet_b0", "efficientnet_lite0", "mobilenetv2_100",
        "mobilenetv3_large_100", "regnetx_002", "densenet121", "convnext_atto", "inception_v3",
        "mixnet_m", "tf_efficientnet_b0", "vgg13_bn", "tf_mixnet_m", "cspresnext50", "dla46_c",
        "hrnet_w18_small_v2", "res2next50", "seresnet33ts", "repghostnet_050"]
NEEDS_EXPORT = {"tf_efficientnet_b0", "vgg13_bn", "tf_mixnet_m"}
SEGMENTATION = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]


def _check(spec: str, size: int, tmp_path, max_macs: float = 0.95):
    model = randomize(build_model(spec).eval())
    x = (torch.randn(1, 3, size, size),)
    default = sp.prune(model, x, 0.5)
    assert default.verification.ok and default.figures["macs_ratio"] < max_macs
    dense_out, pruned_out = outputs(model, x), outputs(default.model, x)
    assert [t.shape for t in flatten_outputs(dense_out)] == \
        [t.shape for t in flatten_outputs(pruned_out)]
    exact = check_pruned(model, x, 0.5, exact_only=True)
    assert exact.verification.exact_units_only and exact.figures["macs_ratio"] < 1.0
    assert export_and_check(default.model, x, tmp_path / "pruned.onnx") < 1e-4
    return default


@pytest.mark.zoo
@pytest.mark.parametrize("name", TIMM)
def test_timm_model(name, tmp_path):
    pytest.importorskip("timm")
    # mixnet's mixed convs split by sizes their resizer maintains: pruned part by part
    max_macs = 0.6 if "mixnet" in name else 0.95
    result = _check(f"timm:{name}", 96 if name == "inception_v3" else 64, tmp_path, max_macs)
    assert result.figures["capture"] == ("export" if name in NEEDS_EXPORT else "fx")


@pytest.mark.zoo
@pytest.mark.parametrize("name", SEGMENTATION)
def test_segmentation_model(name, tmp_path):
    result = _check(f"torchvision:{name}", 64, tmp_path, max_macs=0.6)
    classes = [p for p in result.plan.params if p["name"].startswith("classifier.4.")
               or p["name"].startswith("classifier.high_classifier.")
               or p["name"].startswith("classifier.low_classifier.")]
    assert not [p for p in classes if p["dim"] == 0]  # per-pixel class channels untouched
