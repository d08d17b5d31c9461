"""Shared test models: the small VGG several test files prune, and the CLI's model spec.

Models loaded by a ``path/to/file.py:FACTORY`` spec live in ``tests/data/tiny_models.py``
(the CLI imports that file by its path); this module names the spec and holds the models
the tests build in Python."""

from pathlib import Path

import torch.nn as nn

DATA = Path(__file__).parent / "data" / "tiny_models.py"
TINY = f"{DATA}:tiny_vgg"  # the CLI's spec of tiny_models.tiny_vgg


def small_vgg() -> nn.Sequential:
    """Four 3x3 convolutions (16, 24, 40, 40 channels) with BN and ReLU, two max-pools, and
    two linear layers (30 hidden features, 10 classes), for 3x16x16 inputs."""
    layers, c = [], 3
    for width in (16, 24, "M", 40, 40, "M"):
        if width == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            layers += [nn.Conv2d(c, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU()]
            c = width
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(40 * 4 * 4, 30), nn.ReLU(),
                         nn.Linear(30, 10))
