"""YOLOv8n, the model people prune most, end to end at 640x640 (issue #16's headline case).

Pruned at ratio 0.5 with exact-only groups, it must keep at most 35% of its MACs, equal an
independent masked dense model on the head's *raw* outputs (box distribution logits and class
logits) with every output channel compared on its own scale, and run in ONNX Runtime with the
same decoded outputs, again channel by channel.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from structprune.config import PruneConfig
from structprune.deploy.export import run_onnx
from structprune.front.models import build_model
from structprune.front.workflow import prune_to_dir
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
