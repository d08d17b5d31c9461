"""YOLO all the way round: a pruned ultralytics model back into ultralytics' own checkpoint,
trainer, validator and exporter.

- :func:`save_ultralytics_checkpoint` writes ``pruned.pt`` in the form ultralytics' trainer
  saves (a pickle, as every ultralytics checkpoint): ``YOLO("pruned.pt")`` predicts,
  validates, exports and trains with the pruned widths.
- The trainer classes ``PrunedDetectionTrainer``, ``PrunedSegmentationTrainer``,
  ``PrunedPoseTrainer`` and ``PrunedOBBTrainer`` (subclasses of ultralytics' own, made on
  first use; :func:`pruned_trainer` picks one by task) train the pruned model itself where
  ultralytics' would rebuild the dense one from its yaml:
  ``YOLO("pruned.pt").train(trainer=PrunedDetectionTrainer, data=..., epochs=...)``.
  ``PrunedDetectionTrainer.distilled_from(dense)`` adds a distillation term to ultralytics'
  loss (:class:`DistilledLoss`).
- :func:`yolo_metrics` is ultralytics' validation (mAP50, mAP50-95, precision, recall for
  boxes, masks and keypoints) of a module or a checkpoint.
- :func:`finetune_yolo` fine-tunes the pruned model of a run folder with that trainer and
  writes ``pruned.safetensors``, ``pruned.pt`` and ``pruned.onnx`` again.

Nothing is downloaded: ultralytics is imported offline (:func:`~structprune.front.models.
import_ultralytics`) and every call here passes :func:`offline_args` (no plots, whose fonts
ultralytics fetches; no AMP check, which fetches a model).
"""

from __future__ import annotations

import copy
import datetime
import functools
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from structprune.accuracy.train import relative_mse
from structprune.core.plan import Plan
from structprune.deploy.export import export_onnx, onnx_parity
from structprune.errors import StructPruneError
from structprune.files import atomic_write
from structprune.front.io import PLAN, save
from structprune.front.models import import_ultralytics, native_form
from structprune.front.runs import dense_model, pruned_model, read_report, write_report
from structprune.tree import random_inputs

CHECKPOINT = "pruned.pt"
FINETUNE_RUN = "finetune"  # ultralytics' run folder (weights/, results.csv) in a run folder
# task -> (name of the trainer class made here, ultralytics module holding the base trainer
# and validator, their class-name stem)
TASKS = {
    "detect": ("PrunedDetectionTrainer", "detect", "Detection"),
    "segment": ("PrunedSegmentationTrainer", "segment", "Segmentation"),
    "pose": ("PrunedPoseTrainer", "pose", "Pose"),
    "obb": ("PrunedOBBTrainer", "obb", "OBB"),
}
# ultralytics' metric key suffixes: boxes, masks, keypoints
METRIC_KINDS = {"B": "box", "M": "mask", "P": "pose"}
# raw head outputs that are inputs, not predictions: the neck's feature maps (pruned widths)
NOT_PREDICTIONS = ("feats",)


# checkpoints


def is_ultralytics_model(model: nn.Module) -> bool:
    """Whether ``model`` is an ultralytics model (``DetectionModel``, ``SegmentationModel``,
    ...), for which ``pruned.pt`` is written."""
    return type(model).__module__.startswith("ultralytics.") and hasattr(model, "yaml")


def yolo_source(record: dict[str, Any]) -> str | None:
    """The ultralytics checkpoint or config a run's dense model came from, as
    :func:`save_ultralytics_checkpoint` takes it: ``--weights`` when given, else the spec's
    name (``ultralytics:best.pt`` -> ``best.pt``)."""
    if record.get("weights"):
        return str(record["weights"])
    spec = str(record.get("spec") or "")
    return spec.removeprefix("ultralytics:") if spec.startswith("ultralytics:") else None


def _source_checkpoint(source: str | os.PathLike | None) -> dict[str, Any]:
    """The checkpoint dict ``source`` names when it is an ultralytics ``.pt`` file; else {}."""
    name = str(source or "").removeprefix("ultralytics:")
    if not name.endswith(".pt") or not Path(name).is_file():
        return {}
    from ultralytics.nn.tasks import torch_safe_load

    return torch_safe_load(name)[0]  # a pickle, as ultralytics itself reads it


def save_ultralytics_checkpoint(pruned: nn.Module, source: str | os.PathLike | None,
                                path: str | os.PathLike, *, imgsz: int | None = None) -> Path:
    """Write ``pruned`` (an ultralytics model structprune pruned) to ``path`` as ultralytics'
    trainer saves a finished model: a pickled dict with the model (its yaml, names, stride
    and args kept; its heads back in ultralytics' own form, see
    :func:`~structprune.front.models.native_form`), ``train_args``, ``date`` and
    ``version``. ``YOLO(path)`` and ``ultralytics.nn.tasks.load_checkpoint`` load it; its
    tensors have the pruned shapes.

    ``source`` is the dense model's checkpoint (its ``train_args`` and class names are kept)
    or config name; ``imgsz`` the image size recorded for ultralytics' defaults. Weights are
    kept in float32 (ultralytics' own saves are float16; it loads either as float32). The
    file refers to ultralytics' and torch's classes only: loading it needs no structprune.
    """
    import_ultralytics()
    from ultralytics import __version__
    from ultralytics.nn.tasks import guess_model_task
    from ultralytics.utils import DEFAULT_CFG_DICT, DEFAULT_CFG_KEYS

    if not is_ultralytics_model(pruned):
        raise StructPruneError(f"{type(pruned).__name__} is not an ultralytics model: "
                               "pruned.pt is written for models from ultralytics: specs")
    model = native_form(copy.deepcopy(pruned)).float().eval()
    model = model.to(memory_format=torch.contiguous_format)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    for name in ("criterion", "pt_path"):  # training state; where the dense model was read
        vars(model).pop(name, None)
    source_ckpt = _source_checkpoint(source)
    source_model = source_ckpt.get("ema") or source_ckpt.get("model")
    names = getattr(source_model, "names", None)
    if isinstance(names, dict) and len(names) == len(getattr(model, "names", {}) or {}):
        model.names = dict(names)  # weights given by --weights onto a yaml: the real names
    task = getattr(model, "task", None) or guess_model_task(model)
    args = {**DEFAULT_CFG_DICT, **(source_ckpt.get("train_args") or {}), "task": task}
    if imgsz is not None:
        args["imgsz"] = imgsz
    train_args = {k: v for k, v in args.items() if k in DEFAULT_CFG_KEYS}
    model.args = dict(train_args)  # as ultralytics' strip_optimizer leaves a finished model
    model.task = task
    checkpoint = {
        "date": datetime.datetime.now().astimezone().isoformat(),
        "version": __version__,
        "license": "AGPL-3.0 License (https://ultralytics.com/license)",
        "docs": "https://docs.ultralytics.com",
        "epoch": -1, "best_fitness": None, "model": model, "ema": None, "updates": None,
        "optimizer": None, "modelopt": None, "train_args": train_args,
        "pruned_by": "structprune",  # plain data: plan.json and pruned.safetensors beside it
    }
    path = Path(path)
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    return path


def _load_checkpoint(path: str | os.PathLike) -> nn.Module:
    """An ultralytics checkpoint's model, float32, in eval mode (a pickle, read as
    ultralytics reads it); a missing file is an error, never a download."""
    import_ultralytics()
    from ultralytics.nn.tasks import load_checkpoint

    if not Path(path).is_file():
        raise StructPruneError(f"checkpoint {path} does not exist")
    return load_checkpoint(str(path))[0]


# distillation


def _predictions(student: Any, teacher: Any, key: str = "") -> Iterator[tuple[Any, Any, str]]:
    """Pairs of raw prediction tensors of two heads' outputs (dicts of boxes, scores, mask
    coefficients, prototypes, keypoints, nested per branch for end-to-end heads)."""
    if isinstance(student, dict) and isinstance(teacher, dict):
        for name in sorted(set(student) | set(teacher)):
            if name not in NOT_PREDICTIONS:
                yield from _predictions(student.get(name), teacher.get(name),
                                        f"{key}.{name}" if key else name)
    elif isinstance(student, torch.Tensor) or isinstance(teacher, torch.Tensor):
        yield student, teacher, key


def _raw(output: Any) -> Any:
    """A head's raw predictions: the dict of a model in training, the second element of
    ``(decoded, raw)`` in eval mode."""
    return output[1] if isinstance(output, tuple) else output


def head_distillation(student: Any, teacher: Any) -> torch.Tensor:
    """The distillation term: the sum, over the head's raw prediction tensors, of
    :func:`~structprune.accuracy.train.relative_mse` of the student's against the teacher's
    (each channel normalised by the teacher's scale, so box distributions, class logits,
    mask coefficients and keypoints weigh alike). The neck features the head reads are left
    out: their widths are pruned."""
    terms = []
    for s, t, key in _predictions(_raw(student), _raw(teacher)):
        if not isinstance(s, torch.Tensor) or not isinstance(t, torch.Tensor) \
                or s.shape != t.shape:
            shapes = [tuple(x.shape) if isinstance(x, torch.Tensor) else None for x in (s, t)]
            raise StructPruneError(f"the head's {key!r} output is {shapes[0]} in the pruned "
                                   f"model and {shapes[1]} in the teacher: distil from the "
                                   "dense model it was pruned from")
        terms.append(relative_mse(s.float(), t.float()))
    if not terms:
        raise StructPruneError("the model's head returned no raw predictions to distil")
    return torch.stack(terms).sum()


class DistilledLoss:
    """ultralytics' own loss of the model being trained, plus ``weight`` times
    :func:`head_distillation` against ``teacher`` on the same images, scaled by the batch
    size as ultralytics scales its terms. Returned as one more loss item, ``distill_loss``."""

    def __init__(self, loss: Any, teacher: nn.Module, weight: float) -> None:
        self.loss, self.teacher, self.weight = loss, teacher, float(weight)

    def __call__(self, preds: Any, batch: dict[str, Any]) -> tuple[torch.Tensor, dict]:
        total, items = self.loss(preds, batch)
        with torch.no_grad():
            target = self.teacher(batch["img"])
        term = head_distillation(preds, target)
        scaled = term * self.weight * batch["img"].shape[0]
        return (torch.cat([total.reshape(-1), scaled.reshape(1).to(total.dtype)]),
                {**items, "distill_loss": term.detach()})

    def update(self) -> None:
        """Passed on to the wrapped loss (ultralytics' end-to-end loss decays a weight)."""
        if hasattr(self.loss, "update"):
            self.loss.update()


def _teacher(teacher: nn.Module | str | os.PathLike) -> nn.Module:
    """A frozen copy of the teacher in ultralytics' own form (a module or a checkpoint)."""
    if isinstance(teacher, nn.Module):
        model = native_form(copy.deepcopy(teacher)).float()
    else:
        model = _load_checkpoint(teacher)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


# trainers


def _fits(model: nn.Module, data: dict[str, Any], data_name: str) -> None:
    """Refuse a dataset whose classes or keypoints differ from what the pruned head predicts."""
    head = model.model[-1]
    nc = getattr(head, "nc", None)
    if nc is not None and data.get("nc") is not None and nc != data["nc"]:
        raise StructPruneError(f"the pruned model predicts {nc} classes and {data_name} has "
                               f"{data['nc']}: fine-tune on data with the dense model's "
                               "classes (pruning keeps the head's outputs)")
    kpt_shape = getattr(head, "kpt_shape", None)
    if kpt_shape is not None and data.get("kpt_shape") is not None \
            and list(kpt_shape) != list(data["kpt_shape"]):
        raise StructPruneError(f"the pruned model predicts keypoints {list(kpt_shape)} and "
                               f"{data_name} has {list(data['kpt_shape'])}")


def _reinitialise(model: nn.Module) -> None:
    """Fresh random weights in the pruned widths, as ultralytics initialises a new model."""
    from ultralytics.utils.torch_utils import initialize_weights

    for module in model.modules():
        if module is not model and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    initialize_weights(model)
    head = model.model[-1]
    if hasattr(head, "bias_init"):
        head.bias_init()


def _attach_teacher(trainer: Any) -> None:
    """ultralytics callback (``on_pretrain_routine_end``): the model's loss becomes the
    distilled one. Set after the EMA copy is taken, so the EMA's validation loss and the
    checkpoints carry no teacher."""
    from ultralytics.utils.torch_utils import unwrap_model

    student = unwrap_model(trainer.model)
    teacher = _teacher(type(trainer).teacher).to(trainer.device)
    student.criterion = DistilledLoss(student.init_criterion(), teacher,
                                      type(trainer).distill_weight)


def _make_trainer(task: str) -> type:
    name, package, stem = TASKS[task]
    import_ultralytics()
    import importlib

    base = getattr(importlib.import_module(f"ultralytics.models.yolo.{package}"),
                   f"{stem}Trainer")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        base.__init__(self, *args, **kwargs)
        if type(self).teacher is not None:
            if self.args.distill_model is not None:
                raise StructPruneError("distillation from the dense model and ultralytics' "
                                       "own distill_model= cannot be combined: use one")
            self.add_callback("on_pretrain_routine_end", _attach_teacher)

    def get_model(self, cfg: Any = None, weights: nn.Module | None = None,
                  verbose: bool = True) -> nn.Module:
        """The pruned model itself (``weights``, or the checkpoint ``model=`` names), never
        one rebuilt from ``cfg``; with ``pretrained=False``, in fresh random weights."""
        if weights is None:
            if not str(self.args.model).endswith(".pt"):
                raise StructPruneError(f"{type(self).__name__} trains a pruned checkpoint: "
                                       f"model={self.args.model} must be a .pt file")
            weights = _load_checkpoint(self.args.model)
        model = native_form(copy.deepcopy(weights)).float()
        _fits(model, self.data, str(self.args.data))
        if self.args.pretrained is False:
            _reinitialise(model)
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return model

    @classmethod
    def distilled_from(cls, teacher: nn.Module | str | os.PathLike,
                       weight: float = 1.0) -> type:
        """This trainer with :class:`DistilledLoss` from ``teacher`` (the dense model, or
        its checkpoint) at ``weight``. Single-process training: ultralytics' multi-GPU
        mode re-imports the trainer by name, which this subclass has not."""
        return type(f"Distilled{cls.__name__}", (cls,),
                    {"teacher": teacher, "distill_weight": float(weight),
                     "__module__": __name__})

    doc = (f"ultralytics' {base.__name__} on the pruned model: ``get_model`` returns the "
           "model of the checkpoint being trained as it is, where ultralytics would build "
           "the dense architecture from its yaml and load the weights that fit. Use "
           f"``YOLO('pruned.pt').train(trainer={name}, data=..., epochs=...)``.")
    return type(name, (base,), {
        "__doc__": doc, "__module__": __name__, "__init__": __init__, "get_model": get_model,
        "distilled_from": distilled_from, "teacher": None, "distill_weight": 1.0})


@functools.cache
def _trainers() -> dict[str, type]:
    return {task: _make_trainer(task) for task in TASKS}


def pruned_trainer(task: str, teacher: nn.Module | str | os.PathLike | None = None,
                   distill_weight: float = 1.0) -> type:
    """The trainer class for ``task`` (``detect``, ``segment``, ``pose``, ``obb``) that keeps
    the pruned architecture; distilled from ``teacher`` when one is given."""
    if task not in TASKS:
        raise StructPruneError(f"ultralytics task {task!r} has no pruned trainer: use one of "
                               + ", ".join(TASKS))
    trainer = _trainers()[task]
    return trainer if teacher is None else trainer.distilled_from(teacher, distill_weight)


def __getattr__(name: str) -> Any:
    """``PrunedDetectionTrainer`` and its siblings, made (importing ultralytics) on first use."""
    for task, (trainer_name, _, _) in TASKS.items():
        if name == trainer_name:
            return _trainers()[task]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def offline_args(device: str | int | None = None) -> dict[str, Any]:
    """ultralytics arguments that keep training and validation off the network: no plots
    (their fonts are fetched), and AMP without ultralytics' check, which fetches a model to
    compare against: bfloat16 on a GPU that has it, else float32."""
    on_gpu = torch.cuda.is_available() and str(device if device is not None else "0") \
        not in ("cpu", "mps")
    amp: bool | str = "bf16" if on_gpu and torch.cuda.is_bf16_supported() else False
    return {"plots": False, "amp": amp}


# metrics


def dataset(data_yaml: str | os.PathLike) -> dict[str, Any]:
    """A dataset yaml as ultralytics reads it: class names and count, keypoint shape, and
    each split's images resolved against its ``path`` (absolute). Nothing is downloaded: a
    split whose images are missing is an error."""
    import_ultralytics()
    from ultralytics.nn.autobackend import check_class_names
    from ultralytics.utils import YAML

    path = Path(data_yaml)
    if not path.is_file():
        raise StructPruneError(f"dataset yaml {path} does not exist")
    data = YAML.load(path)
    if data.get("names") is None and data.get("nc") is None:
        raise StructPruneError(f"{path} names no classes: give names: (or nc:)")
    names = data.get("names") or [f"class_{i}" for i in range(int(data["nc"]))]
    data["names"] = check_class_names(names)
    data["nc"] = len(data["names"])
    root = Path(data.get("path") or path.parent)
    root = root if root.is_absolute() else (path.parent / root)
    for split in ("train", "val", "test"):
        if isinstance(data.get(split), str):
            data[split] = (root / data[split]).resolve()
    return data


def image_folder(data_yaml: str | os.PathLike, split: str = "train") -> Path:
    """The folder of a dataset yaml's ``split`` images (for calibration: recovery and the
    data-driven criteria need the images only, not their labels)."""
    folder = dataset(data_yaml).get(split)
    if not isinstance(folder, Path) or not folder.exists():
        raise StructPruneError(f"{data_yaml} has no {split} images (looked in {folder})")
    return folder


def _task(model: nn.Module) -> str:
    from ultralytics.nn.tasks import guess_model_task

    return getattr(model, "task", None) or guess_model_task(model)


def _summary(results: dict[str, float], task: str, images: int) -> dict[str, Any]:
    summary: dict[str, Any] = {"task": task, "images": images}
    for key, value in results.items():
        found = re.fullmatch(r"metrics/(.+)\((\w)\)", key)
        if found and found.group(2) in METRIC_KINDS:
            summary.setdefault(METRIC_KINDS[found.group(2)], {})[found.group(1)] = float(value)
    if "fitness" in results:
        summary["fitness"] = float(results["fitness"])
    return summary


def yolo_metrics(model_or_pt: nn.Module | str | os.PathLike, data_yaml: str | os.PathLike,
                 imgsz: int = 640, *, batch: int = 16, device: str | int | None = None,
                 split: str = "val", workers: int = 0, **val_args: Any) -> dict[str, Any]:
    """ultralytics' validation metrics of a model (a module, in export form or not, or an
    ultralytics checkpoint) on a dataset yaml's ``split``:
    ``{"task", "images", "box": {"precision", "recall", "mAP50", "mAP50-95"}, "fitness"}``,
    with ``"mask"`` for segmentation and ``"pose"`` for pose models. ``val_args`` go to
    ultralytics' validator (e.g. ``conf``, ``iou``)."""
    import_ultralytics()
    import importlib

    if isinstance(model_or_pt, nn.Module):
        model = native_form(copy.deepcopy(model_or_pt)).float().eval()
    else:
        model = _load_checkpoint(model_or_pt)
    task = _task(model)
    if task not in TASKS:
        raise StructPruneError(f"mAP is measured for detect, segment, pose and obb models, "
                               f"not {task}")
    _, package, stem = TASKS[task]
    validator_class = getattr(importlib.import_module(f"ultralytics.models.yolo.{package}"),
                              f"{stem}Validator")
    _fits(model, dataset(data_yaml), str(data_yaml))
    with tempfile.TemporaryDirectory() as runs:  # nothing left in ultralytics' runs folder
        args = {"task": task, "mode": "val", "data": str(data_yaml), "imgsz": imgsz,
                "batch": batch, "device": device, "split": split, "workers": workers,
                "rect": True, "save_json": False, "verbose": False, "plots": False,
                "project": runs, "name": "val", "exist_ok": True, **val_args}
        validator = validator_class(args=args)
        validator(model=model)
    return _summary(validator.metrics.results_dict, task, int(getattr(validator, "seen", 0)))


# training


# ultralytics' "auto" optimizer is AdamW at about 1e-3 for schedules under 10,000
# iterations, which every fine-tuning of a pruned model is. A pruned model has to relearn:
# on the benchmark's YOLOv8n at ratio 0.5, 15 epochs reached 0.684-0.689 mAP50-95 with SGD
# at 0.01 (two seeds) against 0.643 with "auto" (runs apart from the benchmark, which then
# used SGD: benchmarks/results/yolo_cpu.json, 0.688).
FINETUNE_OPTIMIZER = {"optimizer": "SGD", "lr0": 0.01}


def train_pruned(pruned: nn.Module, data_yaml: str | os.PathLike, epochs: int, *,
                 project: str | os.PathLike, name: str = FINETUNE_RUN,
                 teacher: nn.Module | str | os.PathLike | None = None,
                 distill_weight: float = 1.0, imgsz: int = 640, batch: int = 16,
                 device: str | int | None = None, workers: int = 0, seed: int = 0,
                 resume: bool = False, source: str | os.PathLike | None = None,
                 **train_args: Any) -> dict[str, Any]:
    """Train ``pruned`` (an ultralytics model structprune pruned; in place) with ultralytics'
    own trainer, keeping its architecture: its losses, augmentation, schedule, EMA,
    validation and checkpoints (``project/name/weights/{last,best}.pt``; ``resume`` goes on
    from ``last.pt``), distilled from ``teacher`` (the dense model) when given. The best
    checkpoint's weights (the last when none was best) are loaded back into ``pruned``.
    ``train_args`` go to ultralytics (``lr0``, ``mosaic``, ``patience``, ...); unless they
    say otherwise, the optimizer is :data:`FINETUNE_OPTIMIZER`.

    Returns ``{"run": folder, "checkpoint": the .pt loaded, "epochs", "metrics": its
    validation metrics (see :func:`yolo_metrics`), "train_args": the arguments given to
    ultralytics beyond the fixed ones (None when resuming: the run's own)}``."""
    import_ultralytics()
    from ultralytics import YOLO

    run = Path(project).resolve() / name
    trainer = pruned_trainer(_task(pruned), teacher, distill_weight)
    given = None if resume else {**FINETUNE_OPTIMIZER, **train_args}  # resume: the run's own
    with tempfile.TemporaryDirectory() as tmp:
        if resume:
            start = run / "weights" / "last.pt"
            if not start.is_file():
                raise StructPruneError(f"{start} does not exist: fine-tune without --resume "
                                       "first")
            yolo, settings = YOLO(str(start)), {"resume": True}
        else:
            start = save_ultralytics_checkpoint(pruned, source, Path(tmp) / CHECKPOINT,
                                                imgsz=imgsz)
            yolo = YOLO(str(start))
            settings = {"data": str(data_yaml), "epochs": epochs, "imgsz": imgsz,
                        "batch": batch, "device": device, "workers": workers, "seed": seed,
                        "project": str(run.parent), "name": run.name, "exist_ok": True,
                        **offline_args(device), **given}
        yolo.train(trainer=trainer, **settings)
    found = yolo.trainer.best if yolo.trainer.best.exists() else yolo.trainer.last
    trained = _load_checkpoint(found)
    try:
        pruned.load_state_dict(trained.state_dict())
    except RuntimeError as exc:  # a checkpoint of another model in the run folder
        raise StructPruneError(f"{found} does not fit the pruned model: "
                               f"{str(exc).splitlines()[0]}") from exc
    validator = yolo.trainer.validator
    results = getattr(validator, "metrics", None)
    metrics = None if results is None else \
        _summary(results.results_dict, _task(pruned), int(getattr(validator, "seen", 0)))
    return {"run": str(run), "checkpoint": str(found), "epochs": epochs, "metrics": metrics,
            "train_args": given}


def image_size(report: dict[str, Any]) -> int:
    """The square image size ultralytics is given for a run: its input's larger side."""
    shape = report.get("input_shapes", [[1, 3, 640, 640]])[0]
    return int(max(shape[-2:]))


def finetune_yolo(directory: str | os.PathLike, data_yaml: str | os.PathLike, epochs: int, *,
                  distill: bool = False, distill_weight: float = 1.0, imgsz: int | None = None,
                  batch: int = 16, device: str | int | None = None, workers: int = 0,
                  resume: bool = False, exporter: str = "auto", seed: int = 0,
                  **train_args: Any) -> dict[str, Any]:
    """Fine-tune the pruned ultralytics model of a run folder (``structprune prune`` of an
    ``ultralytics:`` model) on a dataset yaml with ultralytics' own trainer
    (:func:`train_pruned`; its run in ``DIR/finetune``), distilled from the dense model with
    ``distill``; then write ``pruned.safetensors``, ``pruned.pt`` and (when the folder has
    one) ``pruned.onnx`` again, the last with its parity check, and record mAP of the dense
    model and of the pruned one before and after (:func:`yolo_metrics`) under ``finetune``
    in ``report.json``. ``imgsz`` defaults to the run's input size. Returns that record."""
    directory = Path(directory)
    report = read_report(directory)
    plan = Plan.load(directory / PLAN)
    dense = dense_model(report)
    if not is_ultralytics_model(dense):
        raise StructPruneError(f"{directory} holds no ultralytics model: fine-tune it with "
                               "class folders or a data factory")
    pruned = pruned_model(directory, dense)
    imgsz = imgsz or image_size(report)
    measure = {"imgsz": imgsz, "batch": batch, "device": device, "workers": workers}
    dense_metrics = yolo_metrics(dense, data_yaml, **measure)
    before = yolo_metrics(pruned, data_yaml, **measure)
    trained = train_pruned(pruned, data_yaml, epochs, project=directory, name=FINETUNE_RUN,
                           teacher=dense if distill else None, distill_weight=distill_weight,
                           imgsz=imgsz, batch=batch, device=device, workers=workers,
                           seed=seed, resume=resume, source=yolo_source(report), **train_args)
    pruned = pruned.cpu().eval()
    after = yolo_metrics(pruned, data_yaml, **measure)
    record: dict[str, Any] = {
        "trainer": "ultralytics", "epochs": epochs, "resumed": resume, "distill": distill,
        "distill_weight": distill_weight if distill else None, "imgsz": imgsz,
        "batch": batch, "train_args": trained["train_args"],
        "data": str(Path(data_yaml).resolve()), "run": trained["run"],
        "checkpoint": trained["checkpoint"], "dense": dense_metrics, "before": before,
        "after": after}
    save(pruned, directory, plan)
    save_ultralytics_checkpoint(pruned, yolo_source(report), directory / CHECKPOINT,
                                imgsz=imgsz)
    if (directory / "pruned.onnx").exists():
        inputs = random_inputs(report["input_shapes"])
        atomic_write(directory / "pruned.onnx",
                     lambda path: export_onnx(pruned, inputs, path, exporter,
                                              dense_error=report.get("onnx_dense_rel_error")))
        record["onnx_rel_error"] = onnx_parity(directory / "pruned.onnx", pruned, inputs,
                                               dense_error=report.get("onnx_dense_rel_error"))
    report["finetune"] = record
    write_report(directory, report)
    return record


__all__ = ["CHECKPOINT", "FINETUNE_OPTIMIZER", "FINETUNE_RUN", "DistilledLoss", "dataset", "finetune_yolo",
           "head_distillation", "image_folder", "image_size", "is_ultralytics_model", "offline_args",
           "pruned_trainer", "save_ultralytics_checkpoint", "train_pruned", "yolo_metrics",
           "yolo_source"]
