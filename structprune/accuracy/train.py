"""Train: fit a model on batches, for sparsity training, fine-tuning and distillation.

:func:`fit` minimises cross-entropy with Adam (decoupled weight decay, AdamW) under a cosine
learning-rate schedule over the epochs. Optional terms make it serve the pruning workflow:

- ``regularizer(model) -> tensor`` is added to the loss of every batch (sparsity training,
  e.g. an L1 or group-lasso term that drives whole channels toward zero before pruning);
- ``teacher``: knowledge distillation from a teacher, typically the dense model, into the
  pruned one. On batches with targets (Hinton et al. 2015):
  ``(1 - w) * CE + w * T^2 * KL(p_teacher || p_student)`` with both distributions softened by
  the temperature ``T`` (:func:`distillation_loss`). On batches of inputs only, label-free:
  the student matches the teacher on every output tensor, each term normalised by its own
  scale (:func:`output_loss`), so a detector, a segmenter or an audio model distils as a
  classifier does;
- ``feature_weight``: the student also matches the teacher's intermediate feature maps, layer
  by layer of the same name, on the channels the pruning plan kept (:func:`relative_mse`);
- ``mix``: label-free batches are blended sample with sample (:func:`mixed`) before both
  models see them, so a few hundred calibration samples teach more than their own points.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from structprune.accuracy import distributed
from structprune.batches import (
    Inputs,
    first_tensor,
    flatten_outputs,
    labelled,
    map_tensors,
    split,
    to_device,
)
from structprune.core.plan import Plan
from structprune.errors import StructPruneError

Regularizer = Callable[[nn.Module], torch.Tensor]

# a channel whose teacher mean square is below this share of its tensor's is scaled as if at
# it: a near-silent channel cannot outweigh the rest of the tensor without bound
CHANNEL_SCALE_FLOOR = 0.01
TINY = 1e-12  # an all-zero teacher tensor is scaled by this instead of dividing by zero


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                      temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, averaged over the batch.

    The ``T^2`` keeps the soft term's gradients on the scale of the hard (cross-entropy) term
    as ``T`` changes (Hinton et al. 2015, section 2).
    """
    t = float(temperature)
    log_student = F.log_softmax(student_logits / t, dim=1)
    log_teacher = F.log_softmax(teacher_logits / t, dim=1)
    kl = F.kl_div(log_student, log_teacher, reduction="batchmean", log_target=True)
    return kl * t * t


def is_logits(output: torch.Tensor) -> bool:
    """Whether an output tensor is classifier-shaped: float ``(batch, classes)``, 2+ classes."""
    return output.is_floating_point() and output.dim() == 2 and output.shape[1] >= 2


def relative_mse(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """The mean squared error of ``student`` against ``teacher`` relative to the teacher's
    mean square on the batch: ``mean((s - t)^2) / mean(t^2)``, so 1.0 is the error of a
    student that outputs zeros, whatever the tensor's units.

    A tensor of 3 or more dimensions is scaled per channel (axis 1) and the ratios averaged
    over the channels, so a tensor that concatenates quantities of different units (a YOLO
    head's boxes in pixels beside its class probabilities) weighs each alike; a channel's
    scale is at least ``CHANNEL_SCALE_FLOOR`` times the whole tensor's mean square.
    """
    teacher = teacher.detach()
    error, square = (student - teacher).pow(2), teacher.pow(2)
    if teacher.dim() < 3:
        return error.mean() / square.mean().clamp_min(TINY)
    axes = [0, *range(2, teacher.dim())]
    per_channel = square.mean(axes)
    scale = torch.clamp(per_channel, min=float(per_channel.mean()) * CHANNEL_SCALE_FLOOR + TINY)
    return (error.mean(axes) / scale).mean()


def _shapes(tensors: Sequence[torch.Tensor]) -> str:
    return ", ".join(str(tuple(t.shape)) for t in tensors) or "none"


def output_loss(student_output: Any, teacher_output: Any, temperature: float) -> torch.Tensor:
    """Label-free distillation: the sum, over the output tensors of both models (in
    :func:`structprune.batches.flatten_outputs` order), of :func:`distillation_loss` at
    ``temperature`` for classifier-shaped logits (:func:`is_logits`) and :func:`relative_mse`
    for every other float tensor (boxes, masks, feature maps); integer and boolean outputs
    are left out."""
    students, teachers = flatten_outputs(student_output), flatten_outputs(teacher_output)
    if [t.shape for t in students] != [t.shape for t in teachers]:
        raise StructPruneError(f"the model's outputs ({_shapes(students)}) do not match the "
                               f"teacher's ({_shapes(teachers)}): distil a pruned model from "
                               "the dense model it was pruned from")
    terms = [distillation_loss(s, t, temperature) if is_logits(t) else relative_mse(s, t)
             for s, t in zip(students, teachers, strict=True) if t.is_floating_point()]
    if not terms:
        raise StructPruneError("the model has no float output tensor to distil: return the "
                               "scores or maps as float tensors")
    return torch.stack(terms).sum()


def mixed(inputs: Inputs, alpha: float) -> Inputs:
    """Mixup of a batch of inputs (Zhang et al. 2018), for label-free distillation: each sample
    blended with another of the batch, ``lam * x + (1 - lam) * x[perm]`` with ``lam ~
    Beta(alpha, alpha)`` drawn per sample from the global generator, the same blend for every
    floating-point input tensor whose first axis is the batch (integer inputs, such as token
    ids, stay as they are). Teacher and student see the same blend, so the outputs of any
    model (classifier, detector, segmenter) stay comparable without labels."""
    tensors = [t for t in flatten_outputs((inputs.args, inputs.kwargs)) if t.dim()]
    if alpha <= 0 or not tensors or tensors[0].shape[0] < 2:
        return inputs
    count = tensors[0].shape[0]
    order = torch.randperm(count)
    share = torch.distributions.Beta(alpha, alpha).sample((count,))

    def blend(tensor: torch.Tensor) -> torch.Tensor:
        if not tensor.is_floating_point() or not tensor.dim() or tensor.shape[0] != count:
            return tensor
        lam = share.to(tensor.device, tensor.dtype).view(-1, *[1] * (tensor.dim() - 1))
        return lam * tensor + (1 - lam) * tensor[order.to(tensor.device)]

    return Inputs(map_tensors(inputs.args, blend), map_tensors(inputs.kwargs, blend))


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (0-based): ``lr`` at the first, falling along half a
    cosine toward 0 over ``epochs``."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


def _check(epochs: int, lr: float, weight_decay: float, temperature: float,
           distill_weight: float, feature_weight: float) -> None:
    if int(epochs) != epochs or epochs < 0:
        raise StructPruneError(f"epochs {epochs} must be a whole number >= 0")
    if not lr > 0:
        raise StructPruneError(f"learning rate {lr} must be > 0")
    if not weight_decay >= 0:
        raise StructPruneError(f"weight decay {weight_decay} must be >= 0")
    if not temperature > 0:
        raise StructPruneError(f"distillation temperature {temperature} must be > 0")
    if not 0.0 <= distill_weight <= 1.0:
        raise StructPruneError(f"distillation weight {distill_weight} must lie in [0, 1]")
    if not feature_weight >= 0:
        raise StructPruneError(f"feature distillation weight {feature_weight} must be >= 0")


def _signatures(model: nn.Module, inputs: Inputs) -> dict[str, list[tuple]]:
    """The shapes of every module's output tensors, per call, on ``inputs`` (no gradients)."""
    seen: dict[str, list[tuple]] = {}

    def catch(name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen.setdefault(name, []).append(tuple(tuple(t.shape)
                                                   for t in flatten_outputs(output)))
        return hook

    hooks = [m.register_forward_hook(catch(name)) for name, m in model.named_modules()]
    try:
        with torch.no_grad():
            inputs.call(model)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def eval_structure(model: nn.Module, inputs: Inputs) -> list[str]:
    """Make ``model`` (in training mode) return the output structure it returns in eval mode,
    and name the modules this took.

    Some models return other tensors when training: an ultralytics detector's head gives its
    raw maps in training mode and decoded boxes with class scores in eval mode, a GoogLeNet
    adds auxiliary logits. Each module that answers differently itself (called in both modes,
    with outputs of other shapes, while all its sub-modules answer alike) has its own
    ``training`` flag cleared, its sub-modules left training, until the whole model gives
    eval mode's shapes. Buffers (BatchNorm statistics) are restored after the probing."""
    saved = [buffer.detach().clone() for buffer in model.buffers()]
    modules = dict(model.named_modules())
    switched: list[str] = []
    try:
        model.eval()
        wanted = _signatures(model, inputs)
        model.train()
        while True:
            got = _signatures(model, inputs)
            if got.get("") == wanted.get(""):
                break
            differ = [n for n in got if n in wanted and got[n] != wanted[n]]
            innermost = [n for n in differ if n not in switched and not any(
                other != n and other.startswith(f"{n}." if n else "") for other in differ)]
            if not innermost:  # nothing left to switch: output_loss names the mismatch
                break
            for name in innermost:
                modules[name].training = False
            switched += innermost
    finally:
        with torch.no_grad():
            for buffer, value in zip(model.buffers(), saved, strict=True):
                buffer.copy_(value)
    return switched


def _output_keep(plan: Plan | None, name: str, module: nn.Module) -> list[int] | None:
    """The dense output channels (axis 1 of its output) that ``plan`` keeps of the layer
    ``name``: those of its bias, else of its weight's output axis, else of its running mean."""
    if plan is None:
        return None
    kept = {(e["name"], e["dim"]): e["keep"] for e in plan.params}
    out_axis = 1 if getattr(module, "transposed", False) else 0
    for key in ((f"{name}.bias", 0), (f"{name}.weight", out_axis),
                (f"{name}.running_mean", 0)):
        if key in kept:
            return kept[key]
    return None


class _Teacher:
    """A teacher beside the student: its outputs on each batch, and with ``feature_weight`` >
    0 the feature maps of layers both models have under one name, caught by forward hooks."""

    def __init__(self, teacher: nn.Module, student: nn.Module, temperature: float,
                 distill_weight: float, feature_weight: float, features: str | Sequence[str],
                 plan: Plan | None, mix: float = 0.0) -> None:
        self.teacher, self.student, self.mix = teacher, student, mix
        self.temperature, self.distill_weight = temperature, distill_weight
        self.feature_weight, self.plan = feature_weight, plan
        self.switched: list[str] | None = None  # set on the first batch without targets
        self.layers = _feature_layers(student, teacher, features) if feature_weight > 0 else []
        self.skipped: dict[str, str] = {}
        self.keep: dict[str, torch.Tensor | None] = {}
        self.caught: dict[str, dict[str, torch.Tensor]] = {"student": {}, "teacher": {}}
        self.hooks: list[Any] = []

    def __enter__(self) -> _Teacher:
        for side, model in (("student", self.student), ("teacher", self.teacher)):
            modules = dict(model.named_modules())
            for name in self.layers:
                self.hooks.append(modules[name].register_forward_hook(self._catch(side, name)))
        return self

    def __exit__(self, *exc: Any) -> None:
        for hook in self.hooks:
            hook.remove()

    def _catch(self, side: str, name: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            tensors = flatten_outputs(output)
            if tensors:
                self.caught[side][name] = tensors[0]
        return hook

    def loss(self, forward: nn.Module, inputs: Inputs, targets: torch.Tensor | None,
             ) -> torch.Tensor:
        """The batch's distillation loss (with the label loss when it has targets)."""
        if targets is None and self.switched is None:
            self.switched = eval_structure(self.student, inputs)
        if targets is None:
            inputs = mixed(inputs, self.mix)
        output = inputs.call(forward)
        with torch.no_grad():
            reference = inputs.call(self.teacher)
        if targets is None:
            loss = output_loss(output, reference, self.temperature)
        else:
            logits = first_tensor(output)
            loss = F.cross_entropy(logits, targets)
            soft = distillation_loss(logits, first_tensor(reference), self.temperature)
            loss = (1.0 - self.distill_weight) * loss + self.distill_weight * soft
        if self.layers:
            features = self._feature_loss()
            if features is not None:
                loss = loss + self.feature_weight * features
        return loss

    def _feature_loss(self) -> torch.Tensor | None:
        """The mean :func:`relative_mse` over the layers caught on this batch, the teacher's
        maps cut to the kept channels; a layer whose maps cannot be matched is dropped, with
        the reason, on the first batch."""
        terms = []
        students, teachers = self.caught["student"], self.caught["teacher"]
        for name in list(self.layers):
            student, teacher = students.pop(name, None), teachers.pop(name, None)
            if student is None or teacher is None:
                self._skip(name, "not run by both models")
                continue
            if name not in self.keep:
                self.keep[name] = self._alignment(name, student, teacher)
            keep = self.keep[name]
            if keep is not None:
                teacher = teacher.index_select(1, keep.to(teacher.device))
            if teacher.shape != student.shape or not teacher.is_floating_point():
                self._skip(name, f"the pruned layer gives {tuple(student.shape)}, the dense one "
                                 f"{tuple(teacher.shape)}, and the plan does not say which "
                                 "channels it kept")
                continue
            terms.append(relative_mse(student, teacher))
        students.clear()  # layers skipped still catch: hold no graph past the batch
        teachers.clear()
        return torch.stack(terms).mean() if terms else None

    def _alignment(self, name: str, student: torch.Tensor, teacher: torch.Tensor,
                   ) -> torch.Tensor | None:
        """The teacher channels to compare with the student's, None for all of them."""
        if student.shape == teacher.shape or student.dim() < 2:
            return None
        keep = _output_keep(self.plan, name, dict(self.student.named_modules())[name])
        if keep is None or len(keep) != student.shape[1] or max(keep) >= teacher.shape[1]:
            return None
        return torch.tensor(keep, dtype=torch.long)

    def _skip(self, name: str, reason: str) -> None:
        self.layers.remove(name)
        self.skipped[name] = reason

    def notes(self) -> dict[str, Any]:
        """What an epoch's record says about the distillation, when there is anything."""
        notes: dict[str, Any] = {}
        if self.switched:
            notes["eval_mode_layers"] = list(self.switched)
        if self.feature_weight > 0:
            notes["features"] = list(self.layers)
            notes["features_skipped"] = dict(self.skipped)
        return notes


def _feature_layers(student: nn.Module, teacher: nn.Module, features: str | Sequence[str],
                    ) -> list[str]:
    """The layers whose feature maps are matched: ``"auto"`` for every convolution of the
    student that the teacher has under the same name, else the names given."""
    in_student, in_teacher = dict(student.named_modules()), dict(teacher.named_modules())
    if isinstance(features, str) and features == "auto":
        return [name for name, module in in_student.items()
                if isinstance(module, nn.modules.conv._ConvNd) and name in in_teacher]
    names = [features] if isinstance(features, str) else list(features)
    for name in names:
        if not name or name not in in_student or name not in in_teacher:
            raise StructPruneError(f"no layer {name!r} in both the model and its teacher: name "
                                   "layers as named_modules() does, or use 'auto'")
    return list(dict.fromkeys(names))


def fit(
    model: nn.Module,
    train_batches: Iterable,
    epochs: int,
    *,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    seed: int = 0,
    regularizer: Regularizer | None = None,
    teacher: nn.Module | None = None,
    temperature: float = 4.0,
    distill_weight: float = 0.5,
    feature_weight: float = 0.0,
    features: str | Sequence[str] = "auto",
    plan: Plan | None = None,
    mix: float = 0.0,
    progress: bool = True,
    device: str | torch.device = "cpu",
    start_epoch: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place on batches (any form of :mod:`structprune.batches`); one
    record per epoch.

    Each batch with targets: ``loss = CE(model(x), y)`` (of the first tensor of the model's
    output), or with a ``teacher`` ``(1 - distill_weight) * CE + distill_weight *
    distillation_loss(...)``. A batch of inputs only needs a ``teacher``: ``loss =
    output_loss(model(x), teacher(x))``, every output tensor matched, classifier-shaped
    logits by the softened KL at ``temperature`` and the others by their error relative to
    the teacher's mean square on the batch (:func:`relative_mse`); ``distill_weight`` plays
    no part. On the first such batch the modules that would return other tensors in
    training mode than in eval mode (an ultralytics head) are set to eval mode alone
    (:func:`eval_structure`), so both models give comparable tensors while the student's
    BatchNorm layers train. The teacher runs in eval mode under ``no_grad`` and is never
    changed.

    With ``feature_weight`` > 0, ``feature_weight`` times the mean :func:`relative_mse` of
    the feature maps of ``features`` (module names in both models, or ``"auto"``: every
    convolution) is added; where the student's layer has fewer channels, the teacher's are
    cut to the ones ``plan`` (the pruning plan, in dense indices) kept, and a layer that
    still does not match is left out and named in the record, with the reason.
    With ``mix`` > 0, each batch without targets is blended by :func:`mixed` (Beta(``mix``,
    ``mix``) shares) before the teacher and the student see it.
    ``regularizer(model)`` is added when given; then one AdamW step. The learning rate
    follows :func:`cosine_lr`, set at the start of each epoch.

    ``torch.manual_seed(seed)`` is called first, so dropout and any loader drawing from the
    global generator repeat; ``train_batches`` is iterated as given once per epoch (a
    ``DataLoader`` with its own seeded generator, as :mod:`structprune.accuracy.data` makes,
    reshuffles reproducibly). A progress bar per epoch is shown when ``progress`` and stderr is a
    terminal. The model (and teacher) are moved to ``device``; the model is left in training
    mode, the teacher in eval mode.

    To resume, pass the epochs already done as ``start_epoch`` and the optimizer's saved
    ``state_dict()`` as ``optimizer_state``; ``on_epoch_end(epoch, optimizer)`` is called after
    each epoch (1-based), to write a checkpoint.

    Returns ``[{"epoch": 1, "loss": mean loss over the epoch's samples}, ...]``, with
    ``eval_mode_layers`` (the modules set to eval mode) and, with ``feature_weight``,
    ``features`` and ``features_skipped`` where they apply.
    """
    _check(epochs, lr, weight_decay, temperature, distill_weight, feature_weight)
    if mix < 0:
        raise StructPruneError(f"mix ({mix}) must be 0 (off) or more: e.g. 1.0 blends samples "
                               "by shares drawn uniformly")
    if feature_weight > 0 and teacher is None:
        raise StructPruneError("feature maps are matched against a teacher's: pass the dense "
                               "model as teacher (--distill) with a feature weight")
    torch.manual_seed(seed)
    model.to(device).train()
    distiller = None
    if teacher is not None:
        teacher.to(device).eval()
        distiller = _Teacher(teacher, model, temperature, distill_weight, feature_weight,
                             features, plan, mix)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise StructPruneError("the model has no trainable parameters (requires_grad=True)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    forward = distributed.wrap(model)  # under torchrun: gradients averaged over the ranks
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    history = []
    with torch.enable_grad(), distiller or nullcontext():  # whatever the caller's grad mode
        for epoch in range(int(start_epoch), int(epochs)):
            history.append(_epoch(forward, model, optimizer, train_batches, epoch, epochs, lr,
                                  regularizer, distiller, progress, device))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, optimizer)
    return history


def _batch_size(inputs: Inputs) -> int:
    tensors = flatten_outputs((inputs.args, inputs.kwargs))
    return int(tensors[0].shape[0]) if tensors and tensors[0].dim() else 1


def _epoch(forward: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
           train_batches: Iterable, epoch: int, epochs: int, lr: float,
           regularizer: Regularizer | None, distiller: _Teacher | None, progress: bool,
           device: str | torch.device) -> dict[str, Any]:
    """One pass over the batches; the epoch's record."""
    for group in optimizer.param_groups:
        group["lr"] = cosine_lr(lr, epoch, int(epochs))
    total, samples = 0.0, 0
    sampler = getattr(train_batches, "sampler", None)
    if hasattr(sampler, "set_epoch"):  # a distributed sampler reshuffles per epoch
        sampler.set_epoch(epoch)
    bar = tqdm(train_batches, desc=f"epoch {epoch + 1}/{epochs}", leave=False,
               disable=None if progress else True)
    for batch in bar:
        inputs, targets = split(batch)
        if targets is not None or distiller is None:
            inputs, targets = labelled(batch, "training without a teacher to distil from")
        inputs, targets = inputs.to(device), to_device(targets, device)
        if distiller is not None:
            loss = distiller.loss(forward, inputs, targets)
        else:
            loss = F.cross_entropy(first_tensor(inputs.call(forward)), targets)
        if regularizer is not None:
            loss = loss + regularizer(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        size = len(targets) if targets is not None else _batch_size(inputs)
        total += float(loss.detach()) * size
        samples += size
        bar.set_postfix(loss=f"{total / samples:.4f}")
    bar.close()
    if not samples:
        raise StructPruneError("the training batches are empty: give at least one batch")
    return {"epoch": epoch + 1, "loss": total / samples,
            **(distiller.notes() if distiller is not None else {})}
