"""Data: digits against scikit-learn's own split, image folders made of tiny PNGs, factories
and every user error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

from structprune.accuracy.data import (
    DataSplits,
    digits,
    from_factory,
    image_folder,
    load_data,
)
from structprune.batches import take
from structprune.errors import StructPruneError

# ---------------------------------------------------------------------------------- helpers


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    """Every input and target of a loader, concatenated in the order it gives them."""
    inputs, targets = zip(*loader, strict=True)
    return torch.cat(inputs), torch.cat(targets)


def _one_line_error(call, *args, **kwargs) -> str:
    """The message of the StructPruneError ``call`` raises, checked to be one short line."""
    with pytest.raises(StructPruneError) as caught:
        call(*args, **kwargs)
    message = str(caught.value)
    assert message and "\n" not in message and len(message) < 300, message
    return message


def _bilinear_reference(images: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres (PyTorch's align_corners=False), written as two
    passes of 1-D linear interpolation: output pixel i samples source (i + 0.5) * in / out - 0.5,
    clamped to the edges, which is what np.interp does past the ends."""

    def resize_axis(values: np.ndarray, size: int, axis: int) -> np.ndarray:
        n = values.shape[axis]
        positions = (np.arange(size) + 0.5) * n / size - 0.5
        return np.apply_along_axis(lambda v: np.interp(positions, np.arange(n), v), axis, values)

    return resize_axis(resize_axis(images, height, 1), width, 2)


# ----------------------------------------------------------------------------------- digits


def test_digits_split_matches_sklearn_stratified_split():
    labels = load_digits().target
    _, y_val_ref = train_test_split(labels, test_size=0.3, stratify=labels, random_state=0)
    data = digits(seed=0)
    _, y_train = _all(data.train)
    _, y_val = _all(data.val)
    assert isinstance(data, DataSplits)
    assert len(y_train) + len(y_val) == 1797
    assert len(y_val) == 540  # ceil(0.3 * 1797)
    assert np.bincount(y_val.numpy(), minlength=10).tolist() == \
        np.bincount(y_val_ref, minlength=10).tolist()
    # the validation loader keeps sklearn's order; training + validation is the whole set
    assert y_val.tolist() == y_val_ref.tolist()
    assert (np.bincount(y_train.numpy()) + np.bincount(y_val.numpy())).tolist() == \
        np.bincount(labels).tolist()
    assert data.num_classes == 10 and data.classes == [str(d) for d in range(10)]


def test_digits_pixels_are_scaled_and_normalised_with_training_statistics():
    bunch = load_digits()
    x_train, x_val, _, _ = train_test_split(
        bunch.images / 16.0, bunch.target, test_size=0.3, stratify=bunch.target, random_state=3
    )
    mean, std = x_train.mean(), x_train.std()
    data = digits(input_shape=(1, 1, 8, 8), seed=3)
    val_inputs, _ = _all(data.val)
    assert val_inputs.shape == (540, 1, 8, 8)
    np.testing.assert_allclose(val_inputs[:, 0].numpy(), (x_val - mean) / std, atol=1e-5)
    train_inputs, _ = _all(data.train)
    assert abs(float(train_inputs.mean())) < 1e-5
    assert abs(float(train_inputs.std(unbiased=False)) - 1) < 1e-5


def test_digits_upsampling_shape_channels_and_values():
    bunch = load_digits()
    x_train, x_val, _, _ = train_test_split(
        bunch.images / 16.0, bunch.target, test_size=0.3, stratify=bunch.target, random_state=0
    )
    normalised = (x_val - x_train.mean()) / x_train.std()
    data = digits(input_shape=(2, 3, 20, 28), seed=0, batch_size=50)
    inputs, targets = next(iter(data.val))
    assert inputs.shape == (50, 3, 20, 28) and inputs.dtype == torch.float32
    assert targets.shape == (50,) and targets.dtype == torch.int64
    # the three channels are copies of one grey image
    assert torch.equal(inputs[:, 0], inputs[:, 1]) and torch.equal(inputs[:, 0], inputs[:, 2])
    np.testing.assert_allclose(
        inputs[:, 0].numpy(), _bilinear_reference(normalised[:50], 20, 28), atol=1e-5
    )


def test_digits_same_seed_same_batches_other_seed_differs():
    first = [b for _, b in zip(range(3), digits(seed=5).train, strict=False)]
    again = [b for _, b in zip(range(3), digits(seed=5).train, strict=False)]
    other = [b for _, b in zip(range(3), digits(seed=6).train, strict=False)]
    for (x1, y1), (x2, y2) in zip(first, again, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not all(torch.equal(y1, y3) for (_, y1), (_, y3) in zip(first, other, strict=True))
    # the split itself depends on the seed too
    assert not torch.equal(_all(digits(seed=5).val)[1], _all(digits(seed=6).val)[1])


def test_digits_training_order_leaves_the_global_rng_alone():
    data = digits(seed=0)
    torch.manual_seed(123)
    expected = torch.rand(4)
    torch.manual_seed(123)
    order = _all(data.train)[1]
    assert torch.equal(torch.rand(4), expected)
    # reshuffled every epoch, from the loader's own generator
    assert not torch.equal(order, _all(data.train)[1])


# ----------------------------------------------------------------------------- image folder

GREYS = {"ant": 30, "bee": 140, "cat": 250}  # one solid grey level per class


def _write_class_images(root, per_class: dict[str, int], start: int = 0) -> None:
    """``per_class[name]`` solid-grey 7x5 PNGs in ``root/name`` (RGB, so both modes apply)."""
    for name, count in per_class.items():
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        level = GREYS[name]
        for i in range(start, start + count):
            Image.new("RGB", (7, 5), (level, level, level)).save(folder / f"{name}{i}.png")


def test_image_folder_split_here_is_stratified_and_seeded(tmp_path):
    _write_class_images(tmp_path, {"ant": 5, "bee": 5, "cat": 5})
    data = image_folder(tmp_path, (1, 3, 6, 4), seed=0, batch_size=4, val_fraction=0.4)
    assert data.classes == ["ant", "bee", "cat"] and data.num_classes == 3
    assert data.source == str(tmp_path)
    x_train, y_train = _all(data.train)
    x_val, y_val = _all(data.val)
    assert x_train.shape == (9, 3, 6, 4) and x_val.shape == (6, 3, 6, 4)
    assert np.bincount(y_val.numpy()).tolist() == [2, 2, 2]
    assert np.bincount(y_train.numpy()).tolist() == [3, 3, 3]
    # train and val share no file and together hold every file
    train_files = {data.train.dataset.dataset.samples[i][0] for i in data.train.dataset.indices}
    val_files = {data.val.dataset.dataset.samples[i][0] for i in data.val.dataset.indices}
    assert not train_files & val_files and len(train_files | val_files) == 15
    # RGB images normalised with the ImageNet statistics, per channel
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    for label, name in enumerate(data.classes):
        expected = (GREYS[name] / 255 - mean) / std
        got = x_val[y_val == label]
        torch.testing.assert_close(got, expected.view(1, 3, 1, 1).expand_as(got))

    again = image_folder(tmp_path, (1, 3, 6, 4), seed=0, batch_size=4, val_fraction=0.4)
    assert again.val.dataset.indices == data.val.dataset.indices
    others = [image_folder(tmp_path, (1, 3, 6, 4), seed=s, val_fraction=0.4) for s in (1, 2)]
    assert any(o.val.dataset.indices != data.val.dataset.indices for o in others)


def test_image_folder_with_train_and_val_subfolders_in_grey(tmp_path):
    _write_class_images(tmp_path / "train", {"ant": 3, "bee": 2})
    _write_class_images(tmp_path / "val", {"ant": 1, "bee": 2}, start=10)
    data = load_data(str(tmp_path), (1, 1, 9, 9), batch_size=2)
    assert data.classes == ["ant", "bee"]
    x_train, y_train = _all(data.train)
    x_val, y_val = _all(data.val)
    assert x_train.shape == (5, 1, 9, 9) and sorted(y_train.tolist()) == [0, 0, 0, 1, 1]
    assert x_val.shape == (3, 1, 9, 9) and y_val.tolist() == [0, 1, 1]
    # grey: mean 0.5, std 0.5
    for label, name in enumerate(data.classes):
        expected = torch.full_like(x_val[y_val == label], (GREYS[name] / 255 - 0.5) / 0.5)
        torch.testing.assert_close(x_val[y_val == label], expected)


def test_image_folder_errors(tmp_path):
    assert "does not exist" in _one_line_error(image_folder, tmp_path / "nope", (1, 3, 8, 8))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "no images" in _one_line_error(image_folder, empty, (1, 3, 8, 8))
    text_only = tmp_path / "text_only"
    (text_only / "ant").mkdir(parents=True)
    (text_only / "ant" / "notes.txt").write_text("not an image")
    assert "no images" in _one_line_error(image_folder, text_only, (1, 3, 8, 8))

    mismatch = tmp_path / "mismatch"
    _write_class_images(mismatch / "train", {"ant": 2, "bee": 2})
    _write_class_images(mismatch / "val", {"ant": 2, "cat": 2})
    message = _one_line_error(image_folder, mismatch, (1, 3, 8, 8))
    assert "different classes" in message and "bee" in message and "cat" in message

    too_few = tmp_path / "too_few"
    _write_class_images(too_few, {"ant": 1, "bee": 3})
    assert "has 1 image" in _one_line_error(image_folder, too_few, (1, 3, 8, 8))
    small_val = tmp_path / "small_val"
    _write_class_images(small_val, {"ant": 2, "bee": 2, "cat": 2})
    message = _one_line_error(image_folder, small_val, (1, 3, 8, 8), val_fraction=0.3)
    assert "fewer than one image per class" in message
    assert "channels" in _one_line_error(image_folder, mismatch, (1, 2, 8, 8))
    assert "N,C,H,W" in _one_line_error(image_folder, mismatch, (3, 8, 8))

    broken = tmp_path / "broken"
    _write_class_images(broken, {"ant": 2, "bee": 2})
    (broken / "bee" / "bad.png").write_bytes(b"these bytes are no PNG")
    data = image_folder(broken, (1, 3, 8, 8), batch_size=8, val_fraction=0.5)
    assert "bad.png" in _one_line_error(lambda: [_all(data.train), _all(data.val)])


# --------------------------------------------------------------------- folders without labels


def _write_random_images(paths) -> None:
    """A random RGB PNG (or JPEG, by suffix) at each path, folders made as needed."""
    rng = np.random.default_rng(0)
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).save(path)


def test_a_flat_folder_loads_unlabeled_split_and_seeded(tmp_path):
    files = [tmp_path / f"img{i}.png" for i in range(10)]
    _write_random_images(files)
    (tmp_path / "notes.txt").write_text("not an image")
    data = load_data(str(tmp_path), (1, 3, 6, 4), seed=0, batch_size=3)
    assert not data.labelled and data.num_classes is None and data.classes == []
    assert data.summary() == f"{tmp_path}: unlabeled, 7 train / 3 val samples"
    batches = list(data.val)
    # inputs only: image tensors, each the file read, resized and normalised
    assert all(isinstance(b, torch.Tensor) for b in batches)
    x_val = torch.cat(batches)
    assert x_val.shape == (3, 3, 6, 4)
    val_files = [data.val.dataset.dataset.files[i] for i in data.val.dataset.indices]
    train_files = [data.train.dataset.dataset.files[i] for i in data.train.dataset.indices]
    assert sorted(val_files + train_files) == sorted(files)
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    with Image.open(val_files[0]) as image:
        pixels = np.asarray(image.resize((4, 6), Image.BILINEAR), dtype=np.float64) / 255
    torch.testing.assert_close(x_val[0], torch.from_numpy(((pixels - mean) / std)
                                                          .transpose(2, 0, 1)).float())
    # the split is scikit-learn's (not stratified), with random_state=seed
    _, expected_val = train_test_split(np.arange(10), test_size=0.3, random_state=0)
    assert data.val.dataset.indices == sorted(expected_val.tolist())
    assert load_data(str(tmp_path), (1, 3, 6, 4), seed=0).val.dataset.indices == \
        data.val.dataset.indices
    others = [load_data(str(tmp_path), (1, 3, 6, 4), seed=s).val.dataset.indices for s in (1, 2)]
    assert any(o != data.val.dataset.indices for o in others)


def test_images_at_any_depth_or_beside_class_folders_are_unlabeled(tmp_path):
    nested = [tmp_path / "nested" / "a" / "b" / "x.png", tmp_path / "nested" / "a" / "y.jpg",
              tmp_path / "nested" / "c" / "d" / "e" / "z.PNG"]
    _write_random_images(nested)
    data = image_folder(tmp_path / "nested", (1, 1, 4, 4), val_fraction=0.4)
    assert not data.labelled and sorted(data.train.dataset.dataset.files) == sorted(nested)
    assert torch.cat(list(data.val)).shape == (2, 1, 4, 4)  # grey: one channel

    # a class folder, but also an image at the top: not ImageFolder's layout
    mixed = tmp_path / "mixed"
    _write_class_images(mixed, {"ant": 2, "bee": 2})
    _write_random_images([mixed / "loose.png"])
    assert image_folder(mixed, (1, 3, 4, 4)).num_classes is None

    # flat train/ and val/ folders are the two splits, unlabeled
    split_dirs = tmp_path / "splits"
    _write_random_images([split_dirs / "train" / f"{i}.png" for i in range(3)]
                         + [split_dirs / "val" / "sub" / "v.png"])
    data = image_folder(split_dirs, (1, 3, 4, 4), batch_size=2)
    assert not data.labelled and [len(b) for b in data.train] == [2, 1]
    assert [len(b) for b in data.val] == [1]

    one = tmp_path / "one"
    _write_random_images([one / "only.png"])
    assert "leave none" in _one_line_error(image_folder, one, (1, 3, 4, 4))
    empty_val = tmp_path / "empty_val"
    _write_random_images([empty_val / "train" / "t.png"])
    (empty_val / "val").mkdir()
    assert f"no images in {empty_val / 'val'}" in _one_line_error(image_folder, empty_val,
                                                                   (1, 3, 4, 4))


def test_without_labels_gives_the_inputs_of_the_same_batches():
    data = digits(input_shape=(1, 1, 8, 8), batch_size=100)
    bare = data.without_labels("labels unused")
    assert not bare.labelled and bare.classes == []
    assert bare.summary() == "digits (labels unused): unlabeled, 1257 train / 540 val samples"
    for inputs, (x, _) in zip(bare.val, data.val, strict=True):
        assert torch.equal(inputs, x)


# ---------------------------------------------------------------------------------- factory

FACTORY = '''
import torch
from torch.utils.data import DataLoader, TensorDataset


class Labelled(TensorDataset):
    num_classes = 7
    classes = ["a", "b", "c", "d", "e", "f", "g"]


def make():
    x = torch.arange(24.0).view(12, 2)
    y = torch.tensor([0, 1, 2, 3] * 3)
    dataset = TensorDataset(x, y)
    return DataLoader(dataset, batch_size=5), DataLoader(dataset, batch_size=4)


def with_attribute():
    dataset = Labelled(torch.zeros(4, 2), torch.tensor([0, 1, 1, 0]))
    return DataLoader(dataset, batch_size=2), DataLoader(dataset, batch_size=2)


def generators():
    batches = [(torch.zeros(2, 2), torch.tensor([0, 5]))]
    return iter(batches), (b for b in batches)


def one_thing():
    return DataLoader(TensorDataset(torch.zeros(2, 2), torch.zeros(2)))


def not_iterables():
    return 1, 2


def inputs_only():
    x = torch.arange(24.0).view(6, 4)
    return [x[:3], x[3:]], [{"a": x[:3], "b": x[3:]}]


def two_inputs():  # two float tensors: two positional inputs, no targets
    x = torch.arange(24.0).view(6, 4)
    return [(x[:3], x[3:])], [(x[:3], x[3:])]


def float_targets():  # ((inputs,), targets): a pair even with float targets
    return [], [((torch.zeros(2, 2),), torch.tensor([0.5, 1.0]))]


def empty_val():
    return [], []


not_callable = 3
'''


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "my_data.py"
    path.write_text(FACTORY)
    return path


def test_factory_infers_classes_from_validation_targets(factory_file):
    data = load_data(f"{factory_file}:make", (1, 2, 1, 1))
    assert data.num_classes == 4 and data.classes == ["0", "1", "2", "3"]
    assert data.source == f"{factory_file}:make"
    assert [len(y) for _, y in data.train] == [5, 5, 2]
    assert _all(data.val)[1].tolist() == [0, 1, 2, 3] * 3


def test_factory_dataset_attribute_wins_and_generators_are_kept(factory_file):
    data = from_factory(f"{factory_file}:with_attribute")
    assert data.num_classes == 7 and data.classes == list("abcdefg")
    data = from_factory(f"{factory_file}:generators")
    assert data.num_classes == 6
    # one-shot iterators were read into lists: two passes give the same batches
    assert len(list(data.val)) == len(list(data.val)) == 1
    assert len(list(data.train)) == 1


def test_a_factory_of_inputs_only_is_unlabeled(factory_file):
    data = from_factory(f"{factory_file}:inputs_only")
    assert not data.labelled and data.num_classes is None and data.classes == []
    assert data.summary() == f"{factory_file}:inputs_only: unlabeled"
    assert [list(b.shape) for b in data.train] == [[3, 4], [3, 4]]
    assert list(next(iter(data.val))) == ["a", "b"]
    assert from_factory(f"{factory_file}:two_inputs").num_classes is None


def test_factory_errors(factory_file, tmp_path):
    missing = tmp_path / "absent.py"
    assert "does not exist" in _one_line_error(load_data, f"{missing}:make", (1, 2, 1, 1))
    for name in ("nothing_here", "not_callable"):
        assert f"no function {name}" in _one_line_error(from_factory, f"{factory_file}:{name}")
    for name in ("one_thing", "not_iterables"):
        assert "two iterables" in _one_line_error(from_factory, f"{factory_file}:{name}")
    assert "integer class" in _one_line_error(from_factory, f"{factory_file}:float_targets")
    assert "empty" in _one_line_error(from_factory, f"{factory_file}:empty_val")
    assert ":FACTORY" in _one_line_error(load_data, str(factory_file), (1, 2, 1, 1))


# ------------------------------------------------------------------------ dispatch and rest


def test_load_data_dispatch_and_source_errors(tmp_path):
    data = load_data("digits", (1, 1, 8, 8), seed=0, batch_size=100)
    assert data.source == "digits" and len(next(iter(data.val))[0]) == 100
    assert "unknown data source" in _one_line_error(load_data, "cifar10", (1, 3, 32, 32))
    assert "does not exist" in _one_line_error(load_data, str(tmp_path / "a" / "b"), (1, 3, 8, 8))
    a_file = tmp_path / "x.png"
    a_file.write_bytes(b"")
    assert "not a folder" in _one_line_error(load_data, str(a_file), (1, 3, 8, 8))
    assert "batch size" in _one_line_error(load_data, "digits", (1, 1, 8, 8), batch_size=0)


def test_calibration_batches_are_the_first_batches():
    data = digits(input_shape=(1, 1, 8, 8), batch_size=100)
    batches = take(data.val, 2)
    expected = list(data.val)[:2]
    assert len(batches) == 2
    for (x, y), (x_ref, y_ref) in zip(batches, expected, strict=True):
        assert torch.equal(x, x_ref) and torch.equal(y, y_ref)
    assert len(take(data.val, 1000)) == 6  # 540 samples in batches of 100
    assert len(take(data.val)) == 6  # a loader: 8 batches at most by default
    assert "1 or more" in _one_line_error(take, data.val, 0)
    assert "no batches" in _one_line_error(take, [], 3)
    # inputs alone are a batch now (structprune.batches); what is none is refused in one line
    bare = torch.zeros(2)
    assert len(take([bare], 1)) == 1 and take([bare], 1)[0] is bare
    assert "(inputs, targets)" in _one_line_error(take, ["images"], 1)
    assert "not batches" in _one_line_error(take, torch.zeros(2, 3), 1)
