"""Data: calibration, training and validation batches.

Three sources give the same thing, a :class:`DataSplits` with a training and a validation
loader of batches:

- ``"digits"``: scikit-learn's 8x8 handwritten digits (shipped inside scikit-learn, nothing is
  downloaded), upsampled to the model's input size; small enough to train on a CPU in seconds.
- a directory of images, either with ``train/`` and ``val/`` sub-folders or split here. In
  torchvision's ``ImageFolder`` layout (every image in a class sub-folder, one level down) the
  sub-folders are the class labels and the split is stratified by class; any other layout (a
  flat folder, any nesting) gives the images without labels.
- ``"file.py:FACTORY"``: a function of the user's that returns ``(train_loader, val_loader)``,
  of batches in any form of :mod:`structprune.batches`, with targets or inputs only.

Data without labels has ``num_classes`` None: its batches are inputs only, good for
everything that compares a model with the dense one (calibration, recovery, distillation,
fidelity) but not for accuracy. The loaders made here are plain
``torch.utils.data.DataLoader``s with ``num_workers=0``, of ``(inputs, targets)`` batches or
of input tensors; the rest of structprune accepts any iterable of batches in the forms
:mod:`structprune.batches` lists (:func:`~structprune.batches.take` takes the first few as
calibration batches).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import itertools
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, transforms
from torchvision.datasets.folder import IMG_EXTENSIONS

from structprune.batches import Batch, labelled, split
from structprune.errors import StructPruneError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# numbers the modules imported from factory files, so two files never share a module name
_factory_modules = itertools.count()

# "path/to/file.py:make_loaders" (the file may be on Windows, "C:\\x\\f.py:make")
_FACTORY_SPEC = re.compile(r"^(?P<file>.+\.py):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")


@dataclass
class DataSplits:
    """Training and validation batches of one data source.

    ``train`` and ``val`` are ``DataLoader``s for the built-in sources and whatever iterables a
    factory returned for ``file.py:FACTORY``. ``classes[i]`` names class index ``i``.
    ``dataset_yaml`` names the ultralytics dataset yaml the images were read from, if any.
    ``num_classes`` is None for data without labels (``classes`` is then empty): its batches
    are inputs only, which :func:`structprune.batches.split` returns as ``(inputs, None)``.
    """

    train: DataLoader | Iterable[Batch]
    val: DataLoader | Iterable[Batch]
    num_classes: int | None
    classes: list[str]
    source: str
    # a detection dataset's yaml (ultralytics' format) the images came from: its own
    # validator then measures mAP
    dataset_yaml: str | None = None

    @property
    def labelled(self) -> bool:
        """Whether the batches carry class labels (else they are inputs only)."""
        return self.num_classes is not None

    def summary(self) -> str:
        """One line for a report: the source, its class count (or "unlabeled") and the split
        sizes if known."""
        sizes = [_dataset_size(loader) for loader in (self.train, self.val)]
        counts = "" if None in sizes else f", {sizes[0]} train / {sizes[1]} val samples"
        kind = f"{self.num_classes} classes" if self.labelled else "unlabeled"
        return f"{self.source}: {kind}{counts}"

    def without_labels(self, why: str) -> DataSplits:
        """The same samples as inputs only (their targets left out), for a model the labels
        do not fit; ``why`` goes into the source's name, so the report says it."""
        return dataclasses.replace(self, train=_InputsOnly(self.train),
                                   val=_InputsOnly(self.val), num_classes=None, classes=[],
                                   source=f"{self.source} ({why})")


class _InputsOnly:
    """The batches of ``loader`` with their targets left out (inputs only)."""

    def __init__(self, loader: Iterable[Batch]):
        self.loader = loader

    @property
    def dataset(self) -> Any:  # the sample count of DataSplits.summary
        return self.loader.dataset

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            _, targets = split(batch)
            yield batch if targets is None else batch[0]


def _dataset_size(loader: Any) -> int | None:
    """Number of samples behind a loader, or None when it has no sized dataset."""
    try:
        return len(loader.dataset)
    except (AttributeError, TypeError):
        return None


def _one_line(text: object) -> str:
    """An exception message folded onto one line (messages must stay one line for the CLI)."""
    return " ".join(str(text).split())


def _channels_and_size(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """(channels, height, width) from an N,C,H,W input shape."""
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise StructPruneError(
            f"input shape {list(shape)} is not N,C,H,W of positive sizes: pass e.g. 1,3,224,224"
        )
    return shape[1], shape[2], shape[3]


def _check_batch_size(batch_size: int) -> int:
    if int(batch_size) < 1:
        raise StructPruneError(f"batch size {batch_size} must be 1 or more")
    return int(batch_size)


def _loaders(train_set, val_set, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    """Plain loaders: the training one shuffles with its own seeded generator (so the global
    torch RNG neither decides nor is consumed by the order), the validation one keeps order."""
    generator = torch.Generator().manual_seed(int(seed))
    train = DataLoader(train_set, batch_size=batch_size, shuffle=True, generator=generator)
    val = DataLoader(val_set, batch_size=batch_size, shuffle=False)
    return train, val


# ---------------------------------------------------------------------------------- digits


def digits(
    input_shape: Sequence[int] = (1, 1, 32, 32), seed: int = 0, batch_size: int = 64
) -> DataSplits:
    """scikit-learn's handwritten digits (1797 8x8 images, 10 classes), shaped for a model.

    Pixels (0..16) are scaled to [0, 1], normalised with the mean and standard deviation of the
    training split, upsampled bilinearly to input_shape's H, W and repeated over its channels.
    The split is stratified 70/30 with ``random_state=seed``.
    """
    channels, height, width = _channels_and_size(input_shape)
    batch_size = _check_batch_size(batch_size)
    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # (N, 8, 8); raw pixels count 0..16
    labels = bunch.target.astype(np.int64)
    x_train, x_val, y_train, y_val = train_test_split(
        images, labels, test_size=0.3, stratify=labels, random_state=seed
    )
    # statistics of the training split only, so nothing of the validation split leaks in
    mean, std = float(x_train.mean()), float(x_train.std())

    def to_tensor(x: np.ndarray) -> torch.Tensor:
        t = (torch.from_numpy(x).unsqueeze(1) - mean) / std
        if (height, width) != (8, 8):
            t = F.interpolate(t, size=(height, width), mode="bilinear", align_corners=False)
        return t.repeat(1, channels, 1, 1).contiguous()

    train_set = TensorDataset(to_tensor(x_train), torch.from_numpy(y_train))
    val_set = TensorDataset(to_tensor(x_val), torch.from_numpy(y_val))
    train, val = _loaders(train_set, val_set, batch_size, seed)
    return DataSplits(train, val, 10, [str(d) for d in range(10)], "digits")


# ---------------------------------------------------------------------------- image folder


class _ImageLoader:
    """Opens one image in a fixed PIL mode; an unreadable file becomes a StructPruneError
    that names it (a picklable class rather than a closure, so worker processes can use it)."""

    def __init__(self, mode: str):
        self.mode = mode

    def __call__(self, path: str) -> Image.Image:
        try:
            with open(path, "rb") as handle:
                return Image.open(handle).convert(self.mode)
        # ImportError: a library that wraps Image.open (ultralytics) looks for a plugin
        except (OSError, ValueError, UnidentifiedImageError, ImportError) as error:
            raise StructPruneError(
                f"cannot read image {path} ({_one_line(error)}): replace or remove it"
            ) from error


def _image_transform(channels: int, height: int, width: int,
                     normalize: bool = True) -> transforms.Compose:
    """Resize, to [0, 1], then (``normalize``) standardise as torchvision's models expect;
    detectors such as ultralytics' take the [0, 1] pixels as they are."""
    steps = [transforms.Resize((height, width)), transforms.ToTensor()]
    if normalize:
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if channels == 3 else ((0.5,), (0.5,))
        steps.append(transforms.Normalize(mean, std))
    return transforms.Compose(steps)


def _image_files(folder: Path) -> list[Path]:
    """Every image file under ``folder``, at any depth (ImageFolder's extensions, any case;
    symbolic links followed as ImageFolder does), sorted by path."""
    found = []
    for parent, _, names in os.walk(folder, followlinks=True):
        found += [Path(parent) / n for n in names if n.lower().endswith(IMG_EXTENSIONS)]
    return sorted(found)


def _class_layout(folder: Path, files: list[Path]) -> bool:
    """Whether ``files`` are in ImageFolder's layout: each in a class sub-folder of ``folder``,
    one level down (the sub-folders are then the labels)."""
    return bool(files) and all(len(f.relative_to(folder).parts) == 2 for f in files)


def _no_images(folder: Path) -> StructPruneError:
    return StructPruneError(f"no images in {folder}: put images (.png, .jpg, ...) in it, "
                            "in any sub-folders")


class _UnlabeledImages(Dataset):
    """Image files without labels: item ``i`` is file ``i``, read and transformed (a tensor,
    no target)."""

    def __init__(self, files: list[Path], transform: Any, loader: _ImageLoader):
        self.files, self.transform, self.loader = files, transform, loader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(self.loader(str(self.files[index])))


def _image_dataset(folder: Path, channels: int, height: int, width: int,
                   files: list[Path] | None = None, normalize: bool = True) -> Dataset:
    """The images of ``folder``: an ImageFolder (its scan errors turned into one-line
    StructPruneErrors) when ``files`` is None, else those files without labels."""
    transform = _image_transform(channels, height, width, normalize)
    loader = _ImageLoader("L" if channels == 1 else "RGB")
    if files is not None:
        return _UnlabeledImages(files, transform, loader)
    try:
        return datasets.ImageFolder(str(folder), transform=transform, loader=loader)
    except FileNotFoundError as error:
        # torchvision: "Found no valid file for the classes ..." (an empty class folder)
        raise StructPruneError(
            f"a class folder of {folder} holds no image ({_one_line(error)}): put each class's "
            "images (.png, .jpg, ...) in a sub-folder named after the class"
        ) from error


def _check_stratified_split(
    root: Path, classes: list[str], targets: np.ndarray, val_fraction: float
) -> None:
    """Say, before scikit-learn does at length, when a split by class is impossible: every
    class needs an image on each side, so at least two, and each side as many images as
    there are classes."""
    counts = np.bincount(targets, minlength=len(classes))
    if counts.min() < 2:
        name = classes[int(counts.argmin())]
        raise StructPruneError(
            f"class {name!r} in {root} has {counts.min()} image(s), too few to split by class: "
            "add images (2 or more per class) or give train/ and val/ sub-folders"
        )
    n_val = int(np.ceil(val_fraction * len(targets)))  # how scikit-learn rounds test_size
    if min(n_val, len(targets) - n_val) < len(classes):
        raise StructPruneError(
            f"{len(targets)} images in {root} with val_fraction {val_fraction} leave fewer "
            f"than one image per class ({len(classes)}) on one side: add images or give "
            "train/ and val/ sub-folders"
        )


def _split_by_class(root: Path, full: datasets.ImageFolder, val_fraction: float,
                    seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices of a labelled folder, stratified by class."""
    targets = np.asarray(full.targets)
    _check_stratified_split(root, list(full.classes), targets, val_fraction)
    try:
        return train_test_split(np.arange(len(targets)), test_size=val_fraction,
                                stratify=targets, random_state=seed)
    except ValueError as error:  # a case _check_stratified_split did not foresee
        raise StructPruneError(
            f"cannot split {root} into train and val by class ({_one_line(error)[:120]}): "
            "give train/ and val/ sub-folders"
        ) from error


def _split_unlabeled(root: Path, count: int, val_fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Training and validation indices of ``count`` images without labels (not stratified)."""
    n_val = int(np.ceil(val_fraction * count))  # how scikit-learn rounds test_size
    if min(n_val, count - n_val) < 1:
        raise StructPruneError(
            f"{count} image(s) in {root} with val_fraction {val_fraction} leave none on one "
            "side of the train/val split: add images or give train/ and val/ sub-folders"
        )
    return train_test_split(np.arange(count), test_size=val_fraction, random_state=seed)


def image_folder(
    path: str | Path,
    input_shape: Sequence[int],
    seed: int = 0,
    batch_size: int = 32,
    val_fraction: float = 0.3,
    normalize: bool = True,
) -> DataSplits:
    """The images under ``path``, labelled by class sub-folder when they are in torchvision's
    ImageFolder layout (``path/<class>/<image>``, every image one level down), else without
    labels (a flat folder, any nesting: every image found, at any depth).

    If ``path/train`` and ``path/val`` both exist they are the two splits (labelled when both
    are in the class layout, and then with the same classes); otherwise the images of
    ``path`` are split here, ``val_fraction`` of them in validation (``random_state=seed``),
    stratified by class when labelled. Images are resized to input_shape's H, W, converted
    to grey (1 channel) or RGB (3 channels) and normalised: with the ImageNet statistics for
    RGB, mean 0.5 and std 0.5 for grey (``normalize=False``: left in [0, 1], as detectors
    such as ultralytics' take them). Batches are ``(images, labels)`` when labelled, else
    image tensors. Images are read when a batch is drawn, so an unreadable file is reported
    then, by name.
    """
    channels, height, width = _channels_and_size(input_shape)
    batch_size = _check_batch_size(batch_size)
    if channels not in (1, 3):
        raise StructPruneError(
            f"image folders give 1 (grey) or 3 (RGB) channels, the input shape asks for "
            f"{channels}: use --input-shape N,1,H,W or N,3,H,W"
        )
    root = Path(path).expanduser()
    if not root.is_dir():
        raise StructPruneError(f"data folder {root} does not exist: pass a folder of images")

    train_dir, val_dir = root / "train", root / "val"
    if train_dir.is_dir() and val_dir.is_dir():
        return image_splits(train_dir, val_dir, input_shape, seed, batch_size, normalize,
                            source=str(root))
    if not 0.0 < val_fraction < 1.0:
        raise StructPruneError(f"val_fraction {val_fraction} must lie strictly between 0 and 1")
    files = _image_files(root)
    if not files:
        raise _no_images(root)
    if _class_layout(root, files):
        full = _image_dataset(root, channels, height, width, normalize=normalize)
        classes = list(full.classes)
        train_idx, val_idx = _split_by_class(root, full, val_fraction, seed)
    else:
        full = _image_dataset(root, channels, height, width, files, normalize)
        classes = None
        train_idx, val_idx = _split_unlabeled(root, len(files), val_fraction, seed)
    train_set = Subset(full, sorted(train_idx.tolist()))
    val_set = Subset(full, sorted(val_idx.tolist()))
    return _splits(train_set, val_set, classes, batch_size, seed, str(root))


def image_splits(train_dir: str | Path, val_dir: str | Path, input_shape: Sequence[int],
                 seed: int = 0, batch_size: int = 32, normalize: bool = True, *,
                 source: str | None = None) -> DataSplits:
    """Two folders of images as the training and the validation split: labelled when both
    are in the class layout (with the same classes), else without labels; images prepared
    as :func:`image_folder` prepares them."""
    channels, height, width = _channels_and_size(input_shape)
    batch_size = _check_batch_size(batch_size)
    train_dir, val_dir = Path(train_dir), Path(val_dir)
    for folder in (train_dir, val_dir):
        if not folder.is_dir():
            raise StructPruneError(f"data folder {folder} does not exist: pass a folder of "
                                   "images")
    files = {folder: _image_files(folder) for folder in (train_dir, val_dir)}
    for folder, found in files.items():
        if not found:
            raise _no_images(folder)
    if all(_class_layout(folder, found) for folder, found in files.items()):
        train_set = _image_dataset(train_dir, channels, height, width, normalize=normalize)
        val_set = _image_dataset(val_dir, channels, height, width, normalize=normalize)
        if train_set.classes != val_set.classes:
            only_train = sorted(set(train_set.classes) - set(val_set.classes))
            only_val = sorted(set(val_set.classes) - set(train_set.classes))
            raise StructPruneError(
                f"{train_dir} and {val_dir} hold different classes (only in train: "
                f"{only_train}, only in val: {only_val}): give both the same class "
                "sub-folders"
            )
        classes = list(train_set.classes)
    else:
        train_set, val_set = (_image_dataset(folder, channels, height, width, found,
                                             normalize)
                              for folder, found in files.items())
        classes = None
    return _splits(train_set, val_set, classes, batch_size, seed,
                   source or f"{train_dir} + {val_dir}")


def _splits(train_set: Dataset, val_set: Dataset, classes: list[str] | None, batch_size: int,
            seed: int, source: str) -> DataSplits:
    train, val = _loaders(train_set, val_set, batch_size, seed)
    if classes is None:
        return DataSplits(train, val, None, [], source)
    return DataSplits(train, val, len(classes), classes, source)


# --------------------------------------------------------------------------------- factory


def _import_file(file: Path):
    """Import a Python file as a fresh module (its own directory importable while it loads)."""
    module_name = f"_structprune_data_factory_{next(_factory_modules)}"
    spec = importlib.util.spec_from_file_location(module_name, file)
    if spec is None or spec.loader is None:
        raise StructPruneError(f"cannot import {file}: pass a Python file, file.py:FACTORY")
    module = importlib.util.module_from_spec(spec)
    # registered because dataclasses and pickling look their module up in sys.modules
    sys.modules[module_name] = module
    # the factory may import helpers that sit next to it
    folder = str(file.resolve().parent)
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(module_name, None)
        raise
    finally:
        sys.path.remove(folder)
    return module


def _is_iterable(thing: object) -> bool:
    return not isinstance(thing, (str, bytes)) and hasattr(thing, "__iter__")


def _class_count_from_batches(batches: Iterable, where: str) -> int:
    """1 + the largest integer target in ``batches``."""
    largest = -1
    for batch in batches:
        _, targets = labelled(batch, f"counting the classes of {where}")
        if targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool:
            raise StructPruneError(
                f"{where} gave targets of dtype {targets.dtype}: targets must be integer class "
                "indices"
            )
        if targets.numel():
            largest = max(largest, int(targets.max()))
    if largest < 0:
        raise StructPruneError(f"{where} gave no targets: the validation data must not be empty")
    return largest + 1


def from_factory(spec: str) -> DataSplits:
    """The ``(train_loader, val_loader)`` returned by ``FACTORY()`` in ``file.py:FACTORY``.

    The loaders may be any iterables of batches (:mod:`structprune.batches`); they are kept as
    they are, except that a one-shot iterator (a generator) is read into a list so it can be
    iterated more than once. When the first validation batch is inputs only, the data has no
    labels (``num_classes`` None). Otherwise the class count is the ``num_classes`` attribute
    of a loader's dataset (validation first, then training) if there is one; else it is one
    more than the largest target in the *validation* batches, so a class that never occurs
    there and has a larger index than all that do is not counted. Class names come from the
    dataset's ``classes`` attribute when it has one of that length, else they are "0", "1", ...
    """
    match = _FACTORY_SPEC.match(spec.strip())
    if match is None:
        raise StructPruneError(f"data factory {spec!r} is not file.py:FACTORY: e.g. data.py:make")
    file, name = Path(match["file"]).expanduser(), match["name"]
    if not file.is_file():
        raise StructPruneError(f"data factory file {file} does not exist: check the path")
    module = _import_file(file)
    factory = getattr(module, name, None)
    if not callable(factory):
        raise StructPruneError(
            f"{file} has no function {name}: define {name}() returning (train_loader, val_loader)"
        )
    result = factory()
    if not isinstance(result, (tuple, list)) or len(result) != 2 or not all(
        _is_iterable(part) for part in result
    ):
        got = type(result).__name__
        if isinstance(result, (tuple, list)):
            got += f" of {len(result)}"
        raise StructPruneError(
            f"{spec} returned a {got}, not two iterables: return (train_loader, val_loader)"
        )
    # a generator would be used up by the first pass over it
    train, val = (list(part) if iter(part) is part else part for part in result)

    first = next(iter(val), None)
    if first is None:
        raise StructPruneError(f"{spec} gave no validation batches: the validation data must "
                               "not be empty")
    if split(first)[1] is None:  # inputs only
        return DataSplits(train, val, None, [], spec.strip())
    num_classes = None
    for loader in (val, train):
        count = getattr(getattr(loader, "dataset", None), "num_classes", None)
        if isinstance(count, (int, np.integer)) and count > 0:
            num_classes = int(count)
            break
    if num_classes is None:
        num_classes = _class_count_from_batches(val, f"{spec} (validation loader)")

    classes = [str(i) for i in range(num_classes)]
    for loader in (val, train):
        names = getattr(getattr(loader, "dataset", None), "classes", None)
        if isinstance(names, (list, tuple)) and len(names) == num_classes:
            classes = [str(n) for n in names]
            break
    return DataSplits(train, val, num_classes, classes, spec.strip())


# -------------------------------------------------------------------------------- dispatch


def load_data(
    source: str,
    input_shape: Sequence[int],
    seed: int = 0,
    batch_size: int | None = None,
    normalize: bool = True,
) -> DataSplits:
    """Training and validation data from a source string.

    ``"digits"`` gives :func:`digits`, ``"file.py:FACTORY"`` gives :func:`from_factory` (which
    ignores input_shape, seed and batch_size: the factory decides those), and a directory gives
    :func:`image_folder` (``normalize``: standardised, else pixels in [0, 1]).
    ``batch_size=None`` keeps each source's default.
    """
    text = str(source).strip()
    if text == "digits":
        return digits(input_shape, seed, 64 if batch_size is None else batch_size)
    if _FACTORY_SPEC.match(text):
        return from_factory(text)
    if text.endswith(".py"):
        raise StructPruneError(f"data source {text} names no function: pass {text}:FACTORY")
    folder = Path(text).expanduser()
    if folder.is_dir():
        return image_folder(folder, input_shape, seed, 32 if batch_size is None else batch_size,
                            normalize=normalize)
    if folder.exists():
        raise StructPruneError(f"data source {text} is a file, not a folder of images: pass "
                               "'digits', a folder, or file.py:FACTORY")
    if any(sep in text for sep in ("/", "\\")) or text.startswith((".", "~")):
        raise StructPruneError(f"data folder {text} does not exist: check the path")
    raise StructPruneError(
        f"unknown data source {text!r}: pass 'digits', a folder of images, or file.py:FACTORY"
    )
