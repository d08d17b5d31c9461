"""A synthetic object-detection dataset in YOLO format, generated from a seed (nothing
downloaded): shapes of six classes (filled circle, filled square, filled triangle, cross,
ring, frame), in many colours, sizes (6% to 45% of the image side) and rotations, on
textured, cluttered backgrounds (smooth colour fields, stripes, noise, and distractor lines,
arcs and dots that belong to no class).

Writes ``OUT/images/{train,val}/*.jpg``, ``OUT/labels/{train,val}/*.txt`` and
``OUT/data.yaml``, ready for ``YOLO(...).train(data=OUT/data.yaml)``. ``--task segment``
writes each object's outline polygon instead of its box, ``--task pose`` its box with two
keypoints (the centre and the topmost point; ``kpt_shape: [2, 3]``). The same seed gives
the same files. About 2 ms an image at 192 px.

    python benchmarks/synthetic_detection.py data/shapes --train 400 --val 100 --size 192
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

CLASSES = ("circle", "square", "triangle", "cross", "ring", "frame")
TASKS = ("detect", "segment", "pose")
PALETTE = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (170, 110, 40), (255, 250, 200), (128, 0, 0), (0, 0, 128), (20, 20, 20),
    (245, 245, 245),
])
RING_POINTS = 32  # vertices of a circle's outline polygon


def _background(rng: np.random.Generator, size: int) -> Image.Image:
    """A smooth random colour field, sometimes striped, with pixel noise."""
    cells = int(rng.integers(2, 7))
    field = rng.uniform(0, 255, (cells, cells, 3)).astype(np.uint8)
    image = Image.fromarray(field).resize((size, size), Image.BILINEAR)
    pixels = np.asarray(image, dtype=np.float32)
    if rng.random() < 0.5:  # stripes at a random angle and period
        angle, period = rng.uniform(0, math.pi), rng.uniform(4, size / 4)
        yy, xx = np.mgrid[0:size, 0:size]
        phase = (xx * math.cos(angle) + yy * math.sin(angle)) * 2 * math.pi / period
        pixels += rng.uniform(10, 40) * np.sin(phase)[..., None]
    pixels += rng.normal(0, rng.uniform(3, 15), pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _colour(rng: np.random.Generator) -> tuple[int, int, int]:
    base = PALETTE[rng.integers(len(PALETTE))].astype(np.float32)
    return tuple(int(c) for c in np.clip(base + rng.normal(0, 12, 3), 0, 255))


def _clutter(draw: ImageDraw.ImageDraw, rng: np.random.Generator, size: int, count: int) -> None:
    """Distractors of no class: lines, arcs and dots."""
    for _ in range(count):
        kind = rng.integers(3)
        x0, y0 = rng.uniform(0, size, 2)
        if kind == 0:
            x1, y1 = x0 + rng.normal(0, size / 3), y0 + rng.normal(0, size / 3)
            draw.line([(x0, y0), (x1, y1)], fill=_colour(rng), width=int(rng.integers(1, 3)))
        elif kind == 1:
            r = rng.uniform(size * 0.05, size * 0.3)
            start = rng.uniform(0, 360)
            draw.arc([x0 - r, y0 - r, x0 + r, y0 + r], start, start + rng.uniform(30, 150),
                     fill=_colour(rng), width=int(rng.integers(1, 3)))
        else:
            r = rng.uniform(1, size * 0.02)
            draw.ellipse([x0 - r, y0 - r, x0 + r, y0 + r], fill=_colour(rng))


def _outline(kind: str, cx: float, cy: float, r: float, angle: float) -> np.ndarray:
    """The shape's outline polygon (vertices, (n, 2) pixels); ``r`` is its circumradius."""
    if kind in ("circle", "ring"):
        t = np.linspace(0, 2 * np.pi, RING_POINTS, endpoint=False)
        return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)
    if kind in ("square", "frame"):
        t = angle + np.pi / 4 + np.arange(4) * np.pi / 2
    elif kind == "triangle":
        t = angle - np.pi / 2 + np.arange(3) * 2 * np.pi / 3
    else:  # cross: twelve vertices, arms a third of the span wide
        a = r / math.sqrt(10)  # half the arm width; the arm tips' corners lie on the circle
        corners = np.array([(a, 3 * a), (a, a), (3 * a, a), (3 * a, -a), (a, -a), (a, -3 * a),
                            (-a, -3 * a), (-a, -a), (-3 * a, -a), (-3 * a, a), (-a, a),
                            (-a, 3 * a)])
        c, s = math.cos(angle), math.sin(angle)
        return corners @ np.array([[c, s], [-s, c]]) + (cx, cy)
    return np.stack([cx + r * np.cos(t), cy + r * np.sin(t)], 1)


def _draw(draw: ImageDraw.ImageDraw, kind: str, polygon: np.ndarray, cx: float, cy: float,
          r: float, colour: tuple[int, int, int], width: int) -> None:
    points = [tuple(p) for p in polygon]
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=colour, width=width)
    elif kind == "frame":
        draw.polygon(points, outline=colour, width=width)
    else:
        draw.polygon(points, fill=colour)


def _overlap(box: np.ndarray, boxes: list[np.ndarray]) -> float:
    """The largest share of ``box``'s area covered by any of ``boxes``, or of theirs by it."""
    worst = 0.0
    area = (box[2] - box[0]) * (box[3] - box[1])
    for other in boxes:
        w = min(box[2], other[2]) - max(box[0], other[0])
        h = min(box[3], other[3]) - max(box[1], other[1])
        if w > 0 and h > 0:
            smaller = min(area, (other[2] - other[0]) * (other[3] - other[1]))
            worst = max(worst, w * h / smaller)
    return worst


def make_image(rng: np.random.Generator, size: int, max_objects: int = 6,
               ) -> tuple[Image.Image, list[tuple[int, np.ndarray, np.ndarray]]]:
    """One image and its objects: ``(class, box xyxy in pixels, outline polygon)`` each."""
    image = _background(rng, size)
    draw = ImageDraw.Draw(image)
    _clutter(draw, rng, size, int(rng.integers(3, 12)))
    objects: list[tuple[int, np.ndarray, np.ndarray]] = []
    boxes: list[np.ndarray] = []
    for _ in range(int(rng.integers(1, max_objects + 1))):
        for _attempt in range(20):  # place it where it hides at most a third of another
            cls = int(rng.integers(len(CLASSES)))
            r = rng.uniform(0.03, 0.225) * size
            cx, cy = rng.uniform(r * 0.8, size - r * 0.8, 2)
            polygon = _outline(CLASSES[cls], cx, cy, r, rng.uniform(0, 2 * np.pi))
            polygon = np.clip(polygon, 0, size - 1)
            box = np.concatenate([polygon.min(0), polygon.max(0)])
            if min(box[2] - box[0], box[3] - box[1]) >= 4 and _overlap(box, boxes) < 0.33:
                break
        else:
            continue
        width = max(2, int(r * rng.uniform(0.12, 0.3)))
        _draw(draw, CLASSES[cls], polygon, cx, cy, r, _colour(rng), width)
        objects.append((cls, box, polygon))
        boxes.append(box)
    _clutter(draw, rng, size, int(rng.integers(0, 3)))  # a few in front of the objects
    if rng.random() < 0.3:
        image = image.filter(ImageFilter.GaussianBlur(rng.uniform(0.3, 1.0)))
    return image, objects


def label_line(cls: int, box: np.ndarray, polygon: np.ndarray, size: int, task: str) -> str:
    """One object's line in a YOLO label file, coordinates normalised to [0, 1]."""
    if task == "segment":
        return " ".join([str(cls), *(f"{v / size:.5f}" for v in polygon.reshape(-1))])
    cx, cy = (box[0] + box[2]) / 2, (box[1] + box[3]) / 2
    values = [cx, cy, box[2] - box[0], box[3] - box[1]]
    line = " ".join([str(cls), *(f"{v / size:.5f}" for v in values)])
    if task == "pose":  # keypoints: the centre and the topmost vertex, both visible
        top = polygon[np.argmin(polygon[:, 1])]
        line += f" {cx / size:.5f} {cy / size:.5f} 2 {top[0] / size:.5f} {top[1] / size:.5f} 2"
    return line


def generate(out: str | Path, train: int = 400, val: int = 100, size: int = 192, seed: int = 0,
             task: str = "detect", max_objects: int = 6) -> Path:
    """Write the dataset into ``out`` (replacing what an earlier run wrote there) and return
    the path of its ``data.yaml``."""
    if task not in TASKS:
        raise ValueError(f"task {task!r}: use one of {', '.join(TASKS)}")
    out = Path(out).resolve()
    for split, count in (("train", train), ("val", val)):
        images, labels = out / "images" / split, out / "labels" / split
        for folder in (images, labels):
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir(parents=True)
        # one stream per split: the validation images do not change with the training count
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        for index in range(count):
            image, objects = make_image(rng, size, max_objects)
            image.save(images / f"{index:05d}.jpg", quality=92)
            (labels / f"{index:05d}.txt").write_text(
                "".join(label_line(c, b, p, size, task) + "\n" for c, b, p in objects))
    for cache in out.glob("labels/*.cache"):  # ultralytics' label cache of an earlier run
        cache.unlink()
    lines = [f"path: {out}", "train: images/train", "val: images/val", "names:"]
    lines += [f"  {i}: {name}" for i, name in enumerate(CLASSES)]
    if task == "pose":
        lines += ["kpt_shape: [2, 3]", "flip_idx: [0, 1]"]
    data = out / "data.yaml"
    data.write_text("\n".join(lines) + "\n")
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", help="folder to write the dataset into")
    parser.add_argument("--train", type=int, default=400, help="training images")
    parser.add_argument("--val", type=int, default=100, help="validation images")
    parser.add_argument("--size", type=int, default=192, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--task", choices=TASKS, default="detect")
    parser.add_argument("--max-objects", type=int, default=6, help="most objects an image holds")
    args = parser.parse_args()
    data = generate(args.out, args.train, args.val, args.size, args.seed, args.task,
                    args.max_objects)
    print(f"wrote {args.train} + {args.val} images of {args.size}px; data: {data}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
