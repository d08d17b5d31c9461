"""Cross-checks against Torch-Pruning on models where both tools are right.

1. Group structure: the layers Torch-Pruning couples with each conv's output channels are
   the layers structprune puts in that conv's group.
2. Surgery: removing *structprune's* chosen channels through Torch-Pruning's own surgery
   gives a model equal to structprune's pruned model. Torch-Pruning prunes group by group,
   and each group's indices are positions in tensors already pruned by earlier groups, so
   dense indices are mapped through the still-alive ones first.
"""

import pytest
import torch
import torch.nn as nn
import torchvision

import structprune as sp
from structprune.core.capture import capture

from .oracles import outputs, randomize

tp = pytest.importorskip("torch_pruning")

MODELS = ["resnet18", "vgg11_bn", "mobilenet_v2", "densenet121"]
LAYERS = (nn.Conv2d, nn.Linear)


def _build(name):
    torch.manual_seed(0)
    return randomize(torchvision.models.get_model(name, num_classes=10).eval())


def _out_handler(module):
    return tp.prune_conv_out_channels if isinstance(module, nn.Conv2d) else \
        tp.prune_linear_out_channels


@pytest.mark.parametrize("name", MODELS)
def test_group_structure_matches(name):
    model = _build(name)
    x = torch.randn(1, 3, 32, 32)
    names = {m: n for n, m in model.named_modules()}
    analysis = sp.analyse(capture(model, (x,)))
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    checked = 0
    for group in analysis.groups:
        if group.blocked.any():
            continue
        ours = {(p.rsplit(".", 1)[0], "out" if d == 0 else "in") for p, d in group.members
                if p.endswith(".weight")}
        ours = {(m, io) for m, io in ours
                if isinstance(model.get_submodule(m), LAYERS)
                and not (io == "out" and getattr(model.get_submodule(m), "groups", 1) > 1)}
        root = next(m for m, io in sorted(ours) if io == "out")
        module = model.get_submodule(root)
        theirs = set()
        for dep, _ in dg.get_pruning_group(module, _out_handler(module), idxs=[0]):
            target = dep.target.module
            if isinstance(target, LAYERS) and target in names:
                io = "out" if dep.handler.__name__ == "prune_out_channels" else "in"
                if isinstance(target, nn.Conv2d) and target.groups > 1 and io == "out":
                    continue  # depthwise: Torch-Pruning lists both sides, we list the input
                theirs.add((names[target], io))
        assert ours == theirs, f"group of {root}"
        checked += 1
    assert checked >= 5


def _tp_apply(model, x, plan):
    """Remove plan's dense output indices of every conv/linear through Torch-Pruning."""
    names = {m: n for n, m in model.named_modules()}
    removed = {}
    for entry in plan.params:
        owner, _, attr = entry["name"].rpartition(".")
        module = model.get_submodule(owner)
        if attr == "weight" and entry["dim"] == 0 and isinstance(module, LAYERS):
            removed[owner] = sorted(set(range(entry["size"])) - set(entry["keep"]))
    alive = {n: list(range(m.weight.shape[0])) for n, m in model.named_modules()
             if isinstance(m, LAYERS)}
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x)
    for owner, dense in removed.items():
        module = model.get_submodule(owner)
        still = set(alive[owner])
        positions = [alive[owner].index(i) for i in dense if i in still]
        if not positions:
            continue  # already removed through a coupled layer
        group = dg.get_pruning_group(module, _out_handler(module), idxs=positions)
        for dep, idxs in group:
            target = dep.target.module
            if target in names and names[target] in alive and \
                    dep.handler.__name__ == "prune_out_channels":
                gone = {int(i) for i in idxs}
                alive[names[target]] = [a for k, a in enumerate(alive[names[target]])
                                        if k not in gone]
        group.prune()
    return model


@pytest.mark.parametrize("name", MODELS)
def test_torch_pruning_surgery_with_our_channels_gives_our_model(name):
    model = _build(name)
    x = torch.randn(1, 3, 32, 32)
    result = sp.prune(model, (x,), 0.5)
    theirs = _tp_apply(_build(name), x, result.plan)
    assert {k: v.shape for k, v in theirs.state_dict().items()
            if "num_batches" not in k} == \
        {k: v.shape for k, v in result.model.state_dict().items() if "num_batches" not in k}
    fresh = (torch.randn(2, 3, 32, 32),)
    a, b = outputs(theirs, fresh), outputs(result.model, fresh)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()))
