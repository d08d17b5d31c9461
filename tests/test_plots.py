import torch
import torchvision

import structprune as sp
from structprune.front.plots import layer_widths, plot_widths


def test_layer_widths_are_the_pruned_models_own_widths(tmp_path):
    model = torchvision.models.resnet18(num_classes=10).eval()
    result = sp.prune(model, torch.randn(1, 3, 32, 32), 0.5)
    rows = layer_widths(result.plan, result.analysis.sizes)
    pruned = dict(result.model.named_parameters())
    dense = dict(model.named_parameters())
    assert len(rows) == 21  # 20 convs and the classifier
    for layer, dense_width, kept in rows:
        assert dense_width == dense[f"{layer}.weight"].shape[0]
        assert kept == pruned[f"{layer}.weight"].shape[0]
    assert sum(k for _, _, k in rows) < sum(d for _, d, _ in rows)
    plot_widths(result.plan, result.analysis.sizes, tmp_path / "widths.png", "resnet18")
    assert (tmp_path / "widths.png").read_bytes()[:4] == b"\x89PNG"
