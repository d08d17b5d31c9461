"""Random CNN architectures for property-based tests, built from a list of block specs."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import strategies as st

BLOCKS = ["conv", "residual", "concat", "split", "depthwise", "grouped", "se", "shuffle",
          "pool"]


class Block(nn.Module):
    def __init__(self, kind: str, c_in: int, width: int, multiplier: int):
        super().__init__()
        self.kind = kind
        c = width
        if kind == "conv":
            self.body = nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU())
            self.c_out = c
        elif kind == "residual":
            self.body = nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                                      nn.Conv2d(c, c_in, 3, padding=1), nn.BatchNorm2d(c_in))
            self.c_out = c_in
        elif kind == "concat":
            self.a = nn.Conv2d(c_in, c, 1)
            self.b = nn.Sequential(nn.Conv2d(c_in, c + 2, 3, padding=1), nn.ReLU())
            self.c_out = c_in + 2 * c + 2
        elif kind == "split":
            self.pre = nn.Conv2d(c_in, 2 * c, 1)
            self.left = nn.Conv2d(c, c, 3, padding=1)
            self.c_out = 2 * c
        elif kind == "depthwise":
            self.pre = nn.Conv2d(c_in, c, 1)
            self.dw = nn.Conv2d(c, c * multiplier, 3, padding=1, groups=c)
            self.bn = nn.BatchNorm2d(c * multiplier)
            self.c_out = c * multiplier
        elif kind == "grouped":
            self.pre = nn.Conv2d(c_in, 4 * c, 1)
            self.g = nn.Conv2d(4 * c, 4 * c, 3, padding=1, groups=4)
            self.c_out = 4 * c
        elif kind == "se":
            self.pre = nn.Conv2d(c_in, c, 3, padding=1)
            self.fc1 = nn.Conv2d(c, max(1, c // 2), 1)
            self.fc2 = nn.Conv2d(max(1, c // 2), c, 1)
            self.c_out = c
        elif kind == "shuffle":
            self.a = nn.Conv2d(c_in, c, 1)
            self.b = nn.Conv2d(c_in, c, 1)
            self.c_out = 2 * c
        elif kind == "pool":
            self.body = nn.Sequential(nn.Conv2d(c_in, c, 3, padding=1), nn.MaxPool2d(2))
            self.c_out = c

    def forward(self, x):
        k = self.kind
        if k in ("conv", "pool"):
            return self.body(x)
        if k == "residual":
            return F.relu(x + self.body(x))
        if k == "concat":
            return torch.cat([x, self.a(x), self.b(x)], 1)
        if k == "split":
            left, right = self.pre(x).chunk(2, dim=1)
            return torch.cat([self.left(left), right * torch.sigmoid(left)], 1)
        if k == "depthwise":
            return F.relu6(self.bn(self.dw(self.pre(x))))
        if k == "grouped":
            return self.g(F.relu(self.pre(x)))
        if k == "se":
            y = self.pre(x)
            gate = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
            return y * gate
        if k == "shuffle":
            y = torch.cat([self.a(x), self.b(x)], 1)
            n, c, h, w = y.shape
            return y.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        raise AssertionError(k)


class RandomNet(nn.Module):
    def __init__(self, blocks, head: str, two_inputs: bool, two_outputs: bool, size: int):
        super().__init__()
        self.two_inputs, self.two_outputs, self.head_kind = two_inputs, two_outputs, head
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.side = nn.Conv2d(1, 8, 3, padding=1) if two_inputs else None
        c = 8
        layers = []
        for kind, width, multiplier in blocks:
            block = Block(kind, c, width, multiplier)
            layers.append(block)
            c = block.c_out
            if kind == "pool":
                size //= 2
        self.blocks = nn.Sequential(*layers)
        if head == "flatten":
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, 10), nn.ReLU(),
                                      nn.Linear(10, 3))
        else:
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 3))

    def forward(self, x, *rest):
        y = self.stem(x)
        if self.two_inputs:
            y = y + self.side(rest[0])
        y = self.blocks(y)
        out = self.head(y)
        return (out, y) if self.two_outputs else out


block_spec = st.tuples(st.sampled_from(BLOCKS), st.integers(2, 8), st.integers(1, 3))
net_spec = st.fixed_dictionaries({
    "blocks": st.lists(block_spec, min_size=1, max_size=5),
    "head": st.sampled_from(["flatten", "pool"]),
    "two_inputs": st.booleans(),
    "two_outputs": st.booleans(),
})


def build(spec: dict, size: int = 8) -> tuple[RandomNet, tuple[torch.Tensor, ...]]:
    model = RandomNet(spec["blocks"], spec["head"], spec["two_inputs"], spec["two_outputs"], size)
    inputs = (torch.randn(2, 3, size, size),)
    if spec["two_inputs"]:
        inputs += (torch.randn(2, 1, size, size),)
    return model.eval(), inputs
