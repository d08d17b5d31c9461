"""Every torchvision CNN prunes at ratio 0.5: shapes unchanged, MACs cut by 40% or more,
equal to the masked dense model under exact_only, and its ONNX export matches torch."""

import pytest
import torch
import torchvision

import structprune as sp
from structprune.core.verify import flatten_outputs
from structprune.front.models import build_model

from .oracles import check_pruned, export_and_check, outputs, randomize

NOT_CNN = ("vit_", "swin_", "maxvit")
MODELS = sorted(n for n in torchvision.models.list_models(module=torchvision.models)
                if not n.startswith(NOT_CNN))
INPUT = {"inception_v3": 299}  # its training-only aux head needs the full size; 64 elsewhere


@pytest.mark.zoo
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_cnn(name, tmp_path):
    model = randomize(build_model(f"torchvision:{name}").eval())
    size = INPUT.get(name, 64)
    x = (torch.randn(1, 3, size, size),)
    default = sp.prune(model, x, 0.5)
    assert default.verification.ok
    assert default.figures["macs_ratio"] <= 0.6, default.figures
    dense_out = outputs(model, x)
    pruned_out = outputs(default.model, x)
    assert [t.shape for t in flatten_outputs(dense_out)] == \
        [t.shape for t in flatten_outputs(pruned_out)]

    exact = check_pruned(model, x, 0.5, exact_only=True)
    assert exact.verification.exact_units_only
    assert exact.figures["macs_ratio"] < 1.0

    assert export_and_check(default.model, x, tmp_path / "pruned.onnx") < 1e-4

    sp.save(default.model, tmp_path / "saved", default.plan)  # round trip without pickle
    loaded = sp.load(tmp_path / "saved", f"torchvision:{name}")
    for a, b in zip(flatten_outputs(outputs(loaded, x)), flatten_outputs(pruned_out),
                    strict=True):
        assert torch.equal(a, b)
