"""A seeded classification set harder than digits: ten shapes on textured, cluttered ground.

Each 32x32 RGB image holds one object of its class (circle, ring, square, frame, diamond,
triangle, plus, cross, horizontal bar, vertical bar) at a random position, size, colour and
slight rotation, over a background of low-frequency colour noise and stripes, with two to four
clutter strokes and blobs that belong to no class. Nothing is downloaded: the same seed gives
the same images on every machine.

    images, labels = make(4000, seed=0)   # float32 (N, 3, 32, 32) in [0, 1], int64 (N,)
"""

from __future__ import annotations

import numpy as np
import torch

CLASSES = ("circle", "ring", "square", "frame", "diamond", "triangle", "plus", "cross",
           "hbar", "vbar")


def _mask(kind: int, u: np.ndarray, v: np.ndarray, r: float) -> np.ndarray:
    """The shape of class ``kind`` on coordinates (u, v) centred on the object, radius r."""
    dist, box = np.hypot(u, v), np.maximum(np.abs(u), np.abs(v))
    thick = max(1.2, 0.3 * r)
    if kind == 0:
        return dist < r
    if kind == 1:
        return (dist < r) & (dist > r - thick)
    if kind == 2:
        return box < 0.85 * r
    if kind == 3:
        return (box < 0.85 * r) & (box > 0.85 * r - thick)
    if kind == 4:
        return np.abs(u) + np.abs(v) < r
    if kind == 5:
        return (v < 0.6 * r) & (v > -r + 2 * np.abs(u))
    if kind == 6:
        return (box < r) & ((np.abs(u) < thick / 2) | (np.abs(v) < thick / 2))
    if kind == 7:
        return (box < 0.8 * r) & ((np.abs(u - v) < thick / 1.4) | (np.abs(u + v) < thick / 1.4))
    if kind == 8:
        return (np.abs(u) < r) & (np.abs(v) < thick / 1.6)
    return (np.abs(v) < r) & (np.abs(u) < thick / 1.6)


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    coarse = rng.uniform(0.1, 0.9, (3, 4, 4))
    image = np.kron(coarse, np.ones((size // 4, size // 4)))
    y, x = np.mgrid[0:size, 0:size]
    angle, freq = rng.uniform(0, np.pi), rng.uniform(0.3, 1.2)
    stripes = 0.12 * np.sin(freq * (x * np.cos(angle) + y * np.sin(angle)))
    return image + stripes + rng.normal(0, 0.05, (3, size, size))


def _clutter(rng: np.random.Generator, image: np.ndarray, size: int) -> None:
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    for _ in range(int(rng.integers(2, 5))):
        colour = rng.uniform(0, 1, 3)[:, None]
        if rng.random() < 0.5:  # a stroke through the image
            angle, offset = rng.uniform(0, np.pi), rng.uniform(-size / 2, size / 2)
            d = (x - size / 2) * np.sin(angle) - (y - size / 2) * np.cos(angle) - offset
            where = np.abs(d) < rng.uniform(0.5, 1.0)
        else:  # a soft blob
            cx, cy, r = rng.uniform(0, size, 2).tolist() + [rng.uniform(1.5, 3.5)]
            where = np.hypot(x - cx, y - cy) < r
        image[:, where] = 0.5 * image[:, where] + 0.5 * colour


def make(n: int, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images and their labels (balanced classes, shuffled)."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(n) % len(CLASSES))
    images = np.empty((n, 3, size, size), dtype=np.float32)
    y, x = np.mgrid[0:size, 0:size].astype(np.float64)
    for i, kind in enumerate(labels):
        image = _background(rng, size)
        _clutter(rng, image, size)
        r = rng.uniform(0.18, 0.32) * size
        cx, cy = rng.uniform(r + 1, size - r - 1, 2)
        theta = rng.uniform(-0.25, 0.25)
        u = (x - cx) * np.cos(theta) + (y - cy) * np.sin(theta)
        v = -(x - cx) * np.sin(theta) + (y - cy) * np.cos(theta)
        mask = _mask(int(kind), u, v, r)
        colour = rng.uniform(0, 1, 3)
        # keep the object visible: push its colour away from the ground's mean under it
        ground = image[:, mask].mean(1) if mask.any() else np.full(3, 0.5)
        if np.abs(colour - ground).sum() < 0.6:
            colour = 1.0 - ground
        image[:, mask] = colour[:, None]
        images[i] = np.clip(image, 0, 1)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


if __name__ == "__main__":
    import sys

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    imgs, labs = make(40)
    fig, axes = plt.subplots(4, 10, figsize=(12, 5))
    for ax, img, lab in zip(axes.flat, imgs, labs, strict=True):
        ax.imshow(img.permute(1, 2, 0).numpy())
        ax.set_title(CLASSES[int(lab)], fontsize=7)
        ax.axis("off")
    fig.savefig(sys.argv[1] if len(sys.argv) > 1 else "shapes.png", dpi=80)
