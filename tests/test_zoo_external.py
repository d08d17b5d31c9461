"""Outside model zoos end to end (``tests/external_models.py``): ultralytics YOLOv8, YOLO11,
YOLO26 and RT-DETR, segmentation-models-pytorch decoders on several encoders, torchvision's
detection pieces as deployed and RAFT, each pruned exact-only at ratio 0.5 and written as ONNX
(``external_models.prune_case``).

A pruned model must equal its dense model with the removed channels masked, both by
structprune's own check and by an independent oracle built from the plan alone (the removed
input columns of every consumer zeroed), on fresh inputs; its ONNX file must match it in ONNX
Runtime on fresh inputs, within the tolerance or the bound the dense file's own error sets
(``export_pair``); and it must keep fewer MACs. Models that rank their detections (RT-DETR,
YOLO26: top-k over scores) reorder near-ties under float32 rounding, so where float32 differs
both sides are compared again in float64, as structprune's own check does. A model listed as
refused must be refused with a ``StructPruneError`` of one short line naming the module and
the reason; any other exception fails.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn as nn
from torch.utils._pytree import tree_leaves

from structprune.errors import StructPruneError

from .external_models import CASES, Case, build, prune_case
from .oracles import outputs

PACKAGES = {"ultralytics": "ultralytics", "smp": "segmentation_models_pytorch"}
TOLERANCE = 1e-4
# TorchScript exports these models in about half dynamo's time, which keeps the group within
# CI's budget; benchmarks/coverage_external.py records the default exporter (dynamo first)
EXPORTER = "torchscript"
# pyramid pooling to 1, 2, 3 and 6 bins, which TorchScript cannot export: the default exporter
DYNAMO = {"smp:PSPNet/resnet34", "smp:UPerNet/resnet18"}


def leaves(out) -> list[torch.Tensor]:
    """Output tensors in the order both ONNX exporters keep (dicts in insertion order)."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def rel_error(ref: torch.Tensor, got: torch.Tensor) -> float:
    ref, got = ref.double(), got.double()
    return float((ref - got).abs().max() / ref.abs().max().clamp_min(1e-12))


def masked_from_plan(model: nn.Module, plan) -> nn.Module:
    """Independent oracle from the plan alone, in a copy of the dense model: every removed
    channel is zeroed where it is made (the output rows of convs and linears, the entries of
    biases and norm affines) and where it is read (the input columns of ungrouped convs,
    transposed convs and linears). A channel that is only contracted away (attention's and
    MAnet's matmuls, RAFT's correlation) then adds nothing, as in the pruned model."""
    masked = copy.deepcopy(model)
    modules = dict(masked.named_modules())
    with torch.no_grad():
        for entry in plan.params:
            owner, _, attr = entry["name"].rpartition(".")
            m = modules.get(owner)
            tensor = getattr(m, attr, None)
            if not isinstance(tensor, torch.Tensor):
                continue
            drop = torch.ones(entry["size"], dtype=torch.bool)
            drop[entry["keep"]] = False
            dim = entry["dim"]
            if isinstance(m, nn.Linear | nn.modules.conv._ConvNd) and attr == "weight":
                transposed = getattr(m, "transposed", False)
                is_output = dim == (1 if transposed else 0)
                if is_output or getattr(m, "groups", 1) == 1:
                    tensor[(slice(None),) * dim + (drop,)] = 0
            elif tensor.dim() == 1 and attr in ("weight", "bias"):
                tensor[drop] = 0
    return masked


def ort_outputs(path, inputs) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: x.numpy() for n, x in zip(names, inputs, strict=True)})


@pytest.mark.zoo
@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.name, marks=[pytest.mark.xfail(strict=True, reason=c.known_bug)]
                 if c.known_bug else []) for c in CASES])
def test_external_model(case: Case, tmp_path):
    if case.needs:
        pytest.importorskip(PACKAGES[case.needs])
    out = tmp_path / "out"
    try:
        dense, inputs, result, figures = prune_case(case, out,
                                                    exporter="auto" if case.name in DYNAMO else EXPORTER)
    except StructPruneError as exc:
        message = str(exc)
        assert case.refused is not None, f"refused unexpectedly: {message}"
        assert "\n" not in message and len(message) < 300, message
        assert case.refused in message, message
        return
    assert case.refused is None, f"expected a refusal ({case.refused}), but it pruned"

    # structprune's own check, exact units only, within tolerance
    check = result.verification
    assert check.ok and check.exact_units_only, check
    assert check.max_rel_error <= TOLERANCE, check
    assert figures["macs_ratio"] < 1.0 and figures["groups_pruned"] > 0, figures

    # fresh inputs: the pruned model against the independent oracle, output by output
    gen = torch.Generator().manual_seed(1)
    fresh = tuple(torch.randn(x.shape, generator=gen) for x in inputs)
    pruned_out = leaves(outputs(result.model, fresh))
    dense_out = leaves(outputs(dense, fresh))
    oracle = masked_from_plan(dense, result.plan)
    assert [t.shape for t in pruned_out] == [t.shape for t in dense_out]
    errors = oracle_errors(oracle, result.model, fresh)
    if max(errors) > TOLERANCE:  # near-ties of a ranking reordered by float32 rounding
        errors = oracle_errors(copy.deepcopy(oracle).double(),
                               copy.deepcopy(result.model).double(),
                               tuple(x.double() for x in fresh))
    assert max(errors) <= TOLERANCE, f"pruned differs from the masked dense model: {errors}"

    # ONNX Runtime on the exported pruned model, on the fresh inputs, within the tolerance or
    # the multiple of the dense file's own error that export_pair allowed
    allowed = figures["onnx_allowed_rel_error"]
    assert allowed == max(TOLERANCE, 4 * figures["onnx_dense_rel_error"])
    assert figures["onnx_rel_error"] <= allowed
    got = ort_outputs(out / "pruned.onnx", fresh)
    assert len(got) == len(pruned_out)
    errors = [rel_error(p, torch.from_numpy(g)) for p, g in zip(pruned_out, got, strict=True)]
    assert max(errors) <= allowed, f"ONNX Runtime differs from torch: {errors} > {allowed}"


def oracle_errors(oracle: nn.Module, pruned: nn.Module, inputs) -> list[float]:
    """Per output: the pruned model's relative error against the oracle."""
    return [rel_error(o, p) for o, p in zip(leaves(outputs(oracle, inputs)),
                                            leaves(outputs(pruned, inputs)), strict=True)]


@pytest.mark.zoo
def test_rtdetr_prunes_its_approximate_groups_in_default_mode():
    """RT-DETR's query selection ranks anchors by their best class logit (a max over the
    encoder's class channels): that group is approximate, pruned in default mode, and the
    plan says which; the exact part of the plan is still checked against the masked model."""
    pytest.importorskip("ultralytics")
    import structprune as sp

    case = next(c for c in CASES if c.name == "ultralytics:rtdetr-l.yaml")
    dense, inputs = build(case)
    result = sp.prune(dense, inputs, 0.5)
    approximate = [g for g in result.plan.groups
                   if g["status"] == "approximate" and g["kept"] < g["units"]]
    assert result.figures["approximate_groups_pruned"] == len(approximate) >= 1
    assert any("enc_score_head" in member for g in approximate for member in g["members"])
    check = result.verification
    assert check.ok and not check.exact_units_only and check.approximate_rel_error is not None
