"""Model specs on the command line: ``torchvision:NAME``, ``timm:NAME``,
``ultralytics:yolov8n.yaml`` (or a ``.pt`` checkpoint), ``onnx:model.onnx`` (or a bare
``model.onnx``; :mod:`structprune.front.onnx_in`), ``file.py:FACTORY`` and
``structprune:NAME`` for the small models defined here (:data:`OWN_MODELS`)."""

from __future__ import annotations

import importlib.util
import inspect
import logging
import os
import sys
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from structprune.config import OnnxSignature
from structprune.errors import StructPruneError
from structprune.front import onnx_in
from structprune.tree import random_inputs


def build_model(spec: str, seed: int = 0,
                input_shapes: list[tuple[int, ...]] | None = None) -> nn.Module:
    """Build the model a spec names, with random weights (seeded) for zoo models. An ONNX
    file's model is converted and checked on inputs of ``input_shapes`` (default: its
    graph's own, :func:`default_input_shapes`)."""
    if onnx_in.is_onnx_spec(spec):
        shapes = input_shapes or onnx_in.input_shapes(spec)
        return onnx_in.load_onnx(spec, random_inputs(shapes, seed=seed))
    kind, sep, name = spec.partition(":")
    if not sep or not name:
        raise StructPruneError(f"model spec {spec!r} must look like torchvision:resnet18, "
                               "timm:resnet18, model.onnx or path/to/file.py:factory")
    if kind == "torchvision":
        return _torchvision(name, seed)
    if kind == "timm":
        return _timm(name, seed)
    if kind == "structprune":
        return _own(name, seed)
    if kind == "ultralytics":
        return _ultralytics(name, seed)
    if spec.rsplit(":", 1)[0].endswith(".py"):
        path, factory = spec.rsplit(":", 1)
        torch.manual_seed(seed)  # factories that initialise randomly are reproducible too
        return _factory(Path(path), factory)
    raise StructPruneError(f"unknown model source {kind!r} in {spec!r}: use torchvision:, timm:, "
                           f"ultralytics:, onnx:, structprune: ({', '.join(OWN_MODELS)}) or a "
                           "path to a .py or .onnx file")


def default_input_shapes(spec: str) -> list[tuple[int, ...]]:
    """The shapes of a spec's model's inputs when none are given: an ONNX graph's own (its
    batch axis 1 where dynamic), else the one :func:`default_input_shape`."""
    return onnx_in.input_shapes(spec) if onnx_in.is_onnx_spec(spec) \
        else [default_input_shape(spec)]


def export_signature(spec: str) -> OnnxSignature | None:
    """The input and output names, opset and dynamic axes the ONNX files of a spec's model
    carry: an ONNX file's own; None (structprune's defaults) for every other source."""
    return onnx_in.signature(spec) if onnx_in.is_onnx_spec(spec) else None


def default_input_shape(spec: str) -> tuple[int, ...]:
    """The input shape a spec's model takes when none is given."""
    if onnx_in.is_onnx_spec(spec):
        return onnx_in.input_shapes(spec)[0]
    if spec == "structprune:digits_cnn":
        return (1, 1, 32, 32)
    if spec.startswith("ultralytics:") and "-cls" not in spec:
        return (1, 3, 640, 640)  # ultralytics' own default image size
    return (1, 3, 224, 224)


def digits_cnn(in_channels: int = 1, num_classes: int = 10) -> nn.Module:
    """A small VGG-style CNN for 32x32 inputs (scikit-learn's digits upsampled, see data.py).

    Six 3x3 convolutions (64-64-128-128-256-256, padding 1), each followed by BatchNorm2d and
    ReLU, a 2x2 max-pool after each pair (32 -> 16 -> 8 -> 4), then flatten ->
    Linear(256*4*4, 256) -> ReLU -> Dropout(0.5) -> Linear(256, num_classes). The modules are
    ``features.*`` and ``classifier.*``; the final layer is ``classifier.4``.
    """
    layers: list[nn.Module] = []
    channels = in_channels
    for width in (64, 128, 256):
        for _ in range(2):
            layers += [nn.Conv2d(channels, width, 3, padding=1), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True)]
            channels = width
        layers.append(nn.MaxPool2d(2))
    classifier = nn.Sequential(
        nn.Flatten(),
        nn.Linear(256 * 4 * 4, 256),
        nn.ReLU(inplace=True),
        nn.Dropout(0.5),
        nn.Linear(256, num_classes),
    )
    return nn.Sequential(OrderedDict(features=nn.Sequential(*layers), classifier=classifier))


# ``structprune:NAME`` specs: name -> builder (called with no arguments)
OWN_MODELS = {"digits_cnn": digits_cnn}


def _own(name: str, seed: int) -> nn.Module:
    if name not in OWN_MODELS:
        raise StructPruneError(f"structprune has no model {name!r}; use one of "
                               f"{', '.join(OWN_MODELS)}")
    torch.manual_seed(seed)
    return OWN_MODELS[name]()


def _torchvision(name: str, seed: int) -> nn.Module:
    import torchvision

    names = torchvision.models.list_models()
    if name not in names:
        close = [n for n in names if name.lower() in n][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise StructPruneError(f"torchvision has no model {name!r}{hint}; "
                               "see torchvision.models.list_models()")
    builder = torchvision.models.get_model_builder(name)
    kwargs = {"weights": None}
    if "weights_backbone" in inspect.signature(builder).parameters:
        kwargs["weights_backbone"] = None  # nothing may be downloaded
    torch.manual_seed(seed)
    return builder(**kwargs)


def _timm(name: str, seed: int) -> nn.Module:
    try:
        import timm
    except ImportError as exc:
        raise StructPruneError("timm is not installed: pip install 'structprune[timm]'") from exc
    if name not in timm.list_models():
        raise StructPruneError(f"timm has no model {name!r}; see timm.list_models()")
    torch.manual_seed(seed)
    return timm.create_model(name, pretrained=False)


def _ultralytics(name: str, seed: int) -> nn.Module:
    """An ultralytics YOLO model from its yaml (random weights) or from a checkpoint file,
    with its head in the form ultralytics' own ONNX exporter gives it (raw box, class, mask
    and keypoint tensors; no post-processing)."""
    import_ultralytics()
    from ultralytics import YOLO
    from ultralytics.nn.tasks import guess_model_task, load_checkpoint, yaml_model_load

    torch.manual_seed(seed)
    if name.endswith(".pt"):
        if not Path(name).is_file():  # ultralytics would download a missing file by name
            raise StructPruneError(f"checkpoint {name} does not exist (nothing is downloaded: "
                                   "build from a yaml, e.g. ultralytics:yolov8n.yaml)")
        model, _ = load_checkpoint(name, device="cpu")  # a pickle, as ultralytics reads it
    else:
        try:
            yaml_model_load(name)
        except Exception as exc:  # noqa: BLE001 - a wrong name: one line
            raise StructPruneError(f"ultralytics has no model config {name!r} (e.g. "
                                   "yolov8n.yaml, yolo11s-seg.yaml, yolov8n-pose.yaml, "
                                   "yolo11n-cls.yaml)") from exc
        logger = logging.getLogger("ultralytics")
        level = logger.level
        logger.setLevel(logging.ERROR)  # it prints a layer table for every model it builds
        try:
            model = YOLO(name, task=guess_model_task(name), verbose=False).model
        finally:
            logger.setLevel(level)
    model = model.float().eval()
    export_form(model)
    return model


# read by ultralytics when it is first imported: no connectivity probe, usage analytics,
# pip update check or automatic pip install (each is skipped as when the machine is offline)
ULTRALYTICS_ENV = {"YOLO_OFFLINE": "1"}


def import_ultralytics() -> Any:
    """Import ultralytics as structprune uses it: offline (:data:`ULTRALYTICS_ENV`, unless the
    environment sets those variables already; they must be set before ultralytics' first
    import to count). Raises a one-line error when it is not installed."""
    for name, value in ULTRALYTICS_ENV.items():
        os.environ.setdefault(name, value)
    try:
        import ultralytics
    except ImportError as exc:
        raise StructPruneError("ultralytics is not installed: "
                               "pip install 'structprune[ultralytics]'") from exc
    return ultralytics


def export_form(model: nn.Module) -> None:
    """Set ultralytics heads as its ONNX exporter sets them: raw outputs, static shapes."""
    for module in model.modules():
        if type(module).__module__.startswith("ultralytics") and \
                isinstance(getattr(module, "export", None), bool):
            module.export = True
            if hasattr(module, "format"):
                module.format = "onnx"
            if hasattr(module, "dynamic"):
                module.dynamic = False
            if hasattr(module, "shape"):
                module.shape = None


# the head attributes export_form sets; ultralytics' head classes define their defaults
EXPORT_ATTRIBUTES = ("export", "format", "dynamic", "shape")


def native_form(model: nn.Module) -> nn.Module:
    """Undo :func:`export_form` (in place, and return ``model``): every ultralytics head back
    to its class defaults, so that it returns ``(decoded, raw)`` in eval mode and its raw
    dict in training, as ultralytics' own predictor, validator, trainer and exporter expect."""
    for module in model.modules():
        if type(module).__module__.startswith("ultralytics") and \
                isinstance(getattr(module, "export", None), bool):
            for name in EXPORT_ATTRIBUTES:
                if name in vars(module) and hasattr(type(module), name):
                    delattr(module, name)  # the class default shows through again
    return model


def _factory(path: Path, factory: str) -> nn.Module:
    if not path.is_file():
        raise StructPruneError(f"model file {path} does not exist")
    module_name = f"_structprune_user_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - the user's file; report in one line
        raise StructPruneError(f"importing {path} failed: {type(exc).__name__}: {exc}") from exc
    fn = getattr(module, factory, None)
    if not callable(fn):
        raise StructPruneError(f"{path} has no function {factory!r}")
    try:
        model = fn()
    except Exception as exc:  # noqa: BLE001
        raise StructPruneError(f"{path}:{factory}() raised {type(exc).__name__}: {exc}") from exc
    if not isinstance(model, nn.Module):
        raise StructPruneError(f"{path}:{factory}() returned {type(model).__name__}, "
                               "not an nn.Module")
    return model


def load_weights(model: nn.Module, path: str) -> None:
    """Load a state dict from safetensors or torch.save (without unpickling objects), or,
    into an ultralytics model, the weights of an ultralytics ``.pt`` checkpoint."""
    try:
        if type(model).__module__.startswith("ultralytics") and str(path).endswith(".pt") \
                and Path(path).is_file():
            state = _ultralytics(str(path), 0).state_dict()
        elif str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as exc:
        raise StructPruneError(f"weights file {path} does not exist") from exc
    except Exception as exc:  # noqa: BLE001 - corrupt or unsafe file
        raise StructPruneError(f"cannot read weights {path}: {str(exc).splitlines()[0]} "
                               "(expected a state_dict in safetensors or saved with torch.save)"
                               ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise StructPruneError(f"weights file {path} holds no state_dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise StructPruneError(f"weights {path} do not fit the model: "
                               f"{str(exc).splitlines()[0]}") from exc


def parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(p) for p in text.replace("x", ",").split(","))
    except ValueError as exc:
        raise StructPruneError(f"input shape {text!r} must be comma-separated integers, "
                               "e.g. 1,3,224,224") from exc
    if not shape or any(s < 1 for s in shape):
        raise StructPruneError(f"input shape {text!r} must have positive sizes")
    return shape
