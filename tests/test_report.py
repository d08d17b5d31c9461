"""MAC counts come from the counters registered beside the rules; checked by hand."""

import torch
import torch.nn as nn
import torch.nn.functional as F

import structprune as sp
from structprune.core.counts import count_macs


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, groups=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.w_up = nn.Parameter(torch.randn(8, 4, 2, 2))
        self.fc = nn.Linear(4, 5)

    def forward(self, x):
        y = self.dw(self.conv(x))
        a = self.up(y)  # module form
        b = F.conv_transpose2d(y, self.w_up, stride=2)  # functional form, same shapes
        pooled = (a + b).mean((2, 3))
        return self.fc(pooled) + pooled @ torch.ones(4, 5)


def expected(n=1, s=8):
    conv = n * 8 * s * s * 3 * 9
    dw = n * 8 * s * s * 1 * 9
    up = n * 8 * s * s * 4 * 4  # every input element meets out_channels x kernel weights
    return conv + dw + 2 * up + n * 5 * 4 + n * 5 * 4


def test_macs_by_hand_on_both_capture_paths():
    model, x = Mixed().eval(), (torch.randn(1, 3, 8, 8),)
    for method in ("fx", "export"):
        assert count_macs(sp.capture(model, x, method=method)) == expected(), method


class Blur(nn.Module):
    def forward(self, x):
        return F.avg_pool2d(x, 3, 1, 1)


def test_a_registered_counter_counts_a_leaf_module():
    registry = sp.DEFAULT_REGISTRY.copy()
    registry.op(Blur, rule=lambda ctx, module, x: ctx.result(x.maps),
                macs=lambda capture, node, module: 9 * 16)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), Blur())
    cap = sp.capture(model, (torch.randn(1, 3, 2, 2),), registry=registry)
    assert count_macs(cap, registry) == 4 * 4 * 3 + 9 * 16
    assert count_macs(cap) == 4 * 4 * 3  # the default registry knows no counter for Blur
