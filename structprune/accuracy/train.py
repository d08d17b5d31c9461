"""Train: fit a model on batches, for sparsity training, fine-tuning and distillation.

:func:`fit` minimises cross-entropy with Adam (decoupled weight decay, AdamW) under a cosine
learning-rate schedule over the epochs. Two optional terms make it serve the pruning
workflow:

- ``regularizer(model) -> tensor`` is added to the loss of every batch (sparsity training,
  e.g. an L1 or group-lasso term that drives whole channels toward zero before pruning);
- ``teacher``: knowledge distillation (Hinton et al. 2015) from a teacher, typically the dense
  model, into the pruned one: ``(1 - w) * CE + w * T^2 * KL(p_teacher || p_student)`` with
  both distributions softened by the temperature ``T`` (:func:`distillation_loss`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from structprune.accuracy import distributed
from structprune.batches import first_tensor, labelled, to_device
from structprune.errors import StructPruneError

Regularizer = Callable[[nn.Module], torch.Tensor]


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


def cosine_lr(lr: float, epoch: int, epochs: int) -> float:
    """The learning rate of ``epoch`` (0-based): ``lr`` at the first, falling along half a
    cosine toward 0 over ``epochs``."""
    return lr * 0.5 * (1.0 + math.cos(math.pi * epoch / max(epochs, 1)))


def _check(epochs: int, lr: float, weight_decay: float, temperature: float,
           distill_weight: float) -> None:
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
    progress: bool = True,
    device: str | torch.device = "cpu",
    start_epoch: int = 0,
    optimizer_state: dict[str, Any] | None = None,
    on_epoch_end: Callable[[int, torch.optim.Optimizer], None] | None = None,
) -> list[dict[str, Any]]:
    """Train ``model`` in place on batches with targets (any form of
    :mod:`structprune.batches` that has them); one record per epoch.

    Each batch: ``loss = CE(model(x), y)`` (of the first tensor of the model's output), or
    with a ``teacher`` ``(1 - distill_weight) * CE + distill_weight * distillation_loss(...)``
    (the teacher runs in eval mode under ``no_grad``), plus ``regularizer(model)`` when given;
    then one AdamW step. The learning rate follows :func:`cosine_lr`, set at the start of each epoch.

    ``torch.manual_seed(seed)`` is called first, so dropout and any loader drawing from the
    global generator repeat; ``train_batches`` is iterated as given once per epoch (a
    ``DataLoader`` with its own seeded generator, as :mod:`structprune.accuracy.data` makes,
    reshuffles reproducibly). A progress bar per epoch is shown when ``progress`` and stderr is a
    terminal. The model (and teacher) are moved to ``device``; the model is left in training
    mode, the teacher in eval mode.

    To resume, pass the epochs already done as ``start_epoch`` and the optimizer's saved
    ``state_dict()`` as ``optimizer_state``; ``on_epoch_end(epoch, optimizer)`` is called after
    each epoch (1-based), to write a checkpoint.

    Returns ``[{"epoch": 1, "loss": mean loss over the epoch's samples}, ...]``.
    """
    _check(epochs, lr, weight_decay, temperature, distill_weight)
    torch.manual_seed(seed)
    model.to(device).train()
    if teacher is not None:
        teacher.to(device).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise StructPruneError("the model has no trainable parameters (requires_grad=True)")
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    forward = distributed.wrap(model)  # under torchrun: gradients averaged over the ranks
    if optimizer_state is not None:
        optimizer.load_state_dict(optimizer_state)

    history = []
    with torch.enable_grad():  # whatever the caller's grad mode
        for epoch in range(int(start_epoch), int(epochs)):
            history.append(_epoch(forward, model, optimizer, train_batches, epoch, epochs, lr,
                                  regularizer, teacher, temperature, distill_weight, progress,
                                  device))
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1, optimizer)
    return history


def _epoch(forward: nn.Module, model: nn.Module, optimizer: torch.optim.Optimizer,
           train_batches: Iterable, epoch: int, epochs: int, lr: float,
           regularizer: Regularizer | None, teacher: nn.Module | None, temperature: float,
           distill_weight: float, progress: bool, device: str | torch.device,
           ) -> dict[str, Any]:
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
        inputs, targets = labelled(batch, "training")
        inputs, targets = inputs.to(device), to_device(targets, device)
        logits = first_tensor(inputs.call(forward))
        loss = F.cross_entropy(logits, targets)
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = first_tensor(inputs.call(teacher))
            soft = distillation_loss(logits, teacher_logits, temperature)
            loss = (1.0 - distill_weight) * loss + distill_weight * soft
        if regularizer is not None:
            loss = loss + regularizer(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(targets)
        samples += len(targets)
        bar.set_postfix(loss=f"{total / samples:.4f}")
    bar.close()
    if not samples:
        raise StructPruneError("the training batches are empty: give at least one batch")
    return {"epoch": epoch + 1, "loss": total / samples}
