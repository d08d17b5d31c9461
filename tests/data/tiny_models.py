"""Factories for CLI tests (``path/to/file.py:FACTORY`` specs)."""

import torch
import torch.nn as nn


def tiny_vgg():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(128, 24), nn.ReLU(), nn.Linear(24, 5))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x, y):
        return self.out(self.a(x) + self.b(y))


def two_inputs():
    return TwoInputs()


def raises():
    raise ValueError("factory exploded")


def not_a_module():
    return 42


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)

    def forward(self, x):
        if x.mean() > 0:
            return self.conv(x)
        return self.conv(-x)


def untraceable():
    return Untraceable()


class HardCodedView(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        x = self.b(torch.relu(self.a(x)))
        return self.fc(x.view(-1, 128))


def hard_coded_view():
    return HardCodedView()


class ShapeBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 2, 1)

    def forward(self, x):
        if x.shape[-1] > 4:  # fx cannot trace this; torch.export can
            x = torch.relu(x)
        return self.b(self.a(x))


def shape_branch():
    return ShapeBranch()


class LongError(nn.Module):
    """Fails in forward with a message of thousands of characters (a symbolic shape)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        raise RuntimeError("cannot guard on " + " + ".join(f"s{i}*s{i + 1}" for i in range(900)))


def long_error():
    return LongError()
