"""Saving and loading pruned models without pickle."""

import pytest
import torch
import torchvision

import structprune as sp

from .oracles import outputs, randomize


def test_save_load_round_trip(tmp_path):
    model = randomize(torchvision.models.mobilenet_v3_small(num_classes=10))
    x = (torch.randn(2, 3, 32, 32),)
    result = sp.prune(model, x, 0.5)
    sp.save(result.model, tmp_path, result.plan)
    loaded = sp.load(tmp_path, lambda: torchvision.models.mobilenet_v3_small(num_classes=10))
    assert torch.equal(outputs(loaded, x), outputs(result.model, x))
    assert {p.name for p in tmp_path.iterdir()} == {"plan.json", "pruned.safetensors"}
    assert b"pickle" not in (tmp_path / "pruned.safetensors").read_bytes()[:200]


def test_load_from_a_spec(tmp_path):
    model = randomize(torchvision.models.resnet18())
    x = (torch.randn(1, 3, 32, 32),)
    result = sp.prune(model, x, 0.3)
    sp.save(result.model, tmp_path, result.plan)
    loaded = sp.load(tmp_path, "torchvision:resnet18")
    assert torch.equal(outputs(loaded, x), outputs(result.model, x))


def test_truncated_weights_and_wrong_model_are_refused(tmp_path):
    model = randomize(torchvision.models.resnet18())
    result = sp.prune(model, (torch.randn(1, 3, 32, 32),), 0.5)
    sp.save(result.model, tmp_path, result.plan)
    with pytest.raises(sp.PlanError, match="different model"):
        sp.load(tmp_path, "torchvision:vgg11")
    weights = tmp_path / "pruned.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(sp.PlanError, match="cannot load"):
        sp.load(tmp_path, "torchvision:resnet18")


def test_a_very_high_ratio_never_empties_a_group():
    model = randomize(torchvision.models.resnet18(num_classes=10))
    result = sp.prune(model, (torch.randn(1, 3, 32, 32),), 0.99)
    assert result.verification.ok
    for m in result.model.modules():
        if isinstance(m, torch.nn.Conv2d):
            assert m.out_channels >= 1
    assert result.model.layer1[0].conv1.out_channels == 1
