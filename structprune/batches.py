"""The batch contract: what a batch is, how it reaches a model, and what comes out.

Every part of structprune that runs a model on data (the data-driven criteria, recovery,
training, evaluation, the data sources' class count) reads its batches here, so every one of
them accepts the same forms.

A batch is one of:

- a tensor ``x``: the model's one input, ``model(x)``;
- a dict ``{"name": x, ...}``: keyword inputs, ``model(**batch)``;
- a tuple or list ``(x1, x2, ...)``: positional inputs, ``model(x1, x2, ...)``;
- a pair ``(inputs, targets)``: ``inputs`` in one of the three forms above and ``targets``
  the labels, or None for none.

Only the last form carries targets. A numpy array counts as a tensor.

**When a pair is (inputs, targets).** A tuple or list of two items ``(a, b)`` is
``(inputs, targets)`` when

1. ``b`` is None (inputs, explicitly without targets), or
2. ``b`` is an integer tensor or numpy array (class labels, as a DataLoader collates them), or
3. ``a`` is itself a tuple, list or dict (inputs already grouped; ``b`` may then be anything,
   float soft labels included);

otherwise (``b`` a float tensor, say) it is two positional inputs, ``model(a, b)``. So a
loader of ``(images, labels)`` needs nothing more; a model whose second input is an integer
tensor takes ``((x, ids), labels)``, ``((x, ids), None)`` or a dict; float targets come as
``((x,), targets)``. A function that needs targets (training, evaluation, the gradient
criteria) says so in one line when a batch has none.

A batch's inputs are moved to the model's device once, with :func:`to_device`; tensors
nested in tuples, lists and dicts move, anything else is passed as it is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import Any

import numpy as np
import torch
import torch.fx as fx
import torch.nn as nn

from structprune.errors import StructPruneError

Batch = Any  # one of the forms above
Error = type[StructPruneError]

DEFAULT_BATCHES = 8  # batches taken from data that is not a list or tuple

FORMS = "a tensor, a tuple or list of inputs, a dict of keyword inputs, or (inputs, targets)"
NO_TARGETS = ("give (inputs, targets) pairs, targets integer class labels (float ones as "
              "((inputs,), targets))")


@dataclass(frozen=True)
class Inputs:
    """A batch's model inputs: ``model(*args, **kwargs)``."""

    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)

    def to(self, device: torch.device | str | None) -> Inputs:
        """The same inputs with every tensor on ``device`` (None: where they are)."""
        if device is None:
            return self
        return Inputs(to_device(self.args, device), to_device(self.kwargs, device))

    def call(self, model: Callable[..., Any]) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)

    def positional(self, forward: Callable[..., Any], error: Error = StructPruneError,
                   ) -> tuple[Any, ...]:
        """The inputs as positional arguments of ``forward`` (a model's forward method), for
        a graph that takes positional inputs only: keyword inputs bound by name."""
        if not self.kwargs:
            return self.args
        try:
            bound = inspect.signature(forward).bind_partial(*self.args, **self.kwargs)
        except TypeError as exc:
            raise error(f"the batch's keyword inputs do not fit the model's forward ({exc}): "
                        "name them as forward() does") from exc
        if bound.kwargs:
            raise error(f"the batch's inputs {sorted(bound.kwargs)} cannot be passed by "
                        "position (an earlier argument is missing): give every input up to "
                        "them")
        return bound.args


def split(batch: Batch, *, error: Error = StructPruneError) -> tuple[Inputs, Any]:
    """A batch's inputs and its targets (None when it has none); see the module docstring."""
    if isinstance(batch, Inputs):
        return batch, None
    if isinstance(batch, (tuple, list)) and len(batch) == 2 and _is_pair(batch[0], batch[1]):
        return _inputs(batch[0], error), batch[1]
    return _inputs(batch, error), None


def _is_pair(first: Any, second: Any) -> bool:
    """Whether ``(first, second)`` is (inputs, targets) rather than two inputs."""
    return second is None or isinstance(first, (tuple, list, Mapping)) or _is_labels(second)


def _is_labels(value: Any) -> bool:
    """Whether ``value`` is an integer tensor or array (class labels)."""
    if isinstance(value, np.ndarray):
        return bool(np.issubdtype(value.dtype, np.integer))
    return isinstance(value, torch.Tensor) and not (
        value.is_floating_point() or value.is_complex() or value.dtype == torch.bool)


def _tensor(value: Any) -> Any:
    return torch.as_tensor(value) if isinstance(value, np.ndarray) else value


def _inputs(value: Any, error: Error) -> Inputs:
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return Inputs((_tensor(value),))
    if isinstance(value, Mapping) and value and all(isinstance(k, str) for k in value):
        return Inputs((), {k: _tensor(v) for k, v in value.items()})
    if isinstance(value, (tuple, list)) and value:
        return Inputs(tuple(_tensor(v) for v in value))
    name = type(value).__name__
    kind = f"an empty {name}" if isinstance(value, (tuple, list, Mapping)) and not value \
        else f"a {name} with keys that are not names" if isinstance(value, Mapping) \
        else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    raise error(f"a batch is {kind}: give {FORMS}")


def labelled(batch: Batch, needed_by: str, *, error: Error = StructPruneError,
             ) -> tuple[Inputs, torch.Tensor]:
    """A batch's inputs and its targets as a tensor (integer labels as int64, the index type
    losses take); one ``error`` line saying that ``needed_by`` (e.g. "training") needs targets
    when the batch has none."""
    inputs, targets = split(batch, error=error)
    if targets is None:
        raise error(f"{needed_by} needs targets, but a batch has none: {NO_TARGETS}")
    try:
        targets = torch.as_tensor(targets)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise error(f"{needed_by} needs targets as a tensor of class labels, not a "
                    f"{type(targets).__name__}: {NO_TARGETS}") from exc
    return inputs, targets.long() if _is_labels(targets) else targets


def take(data: Iterable[Batch], count: int | None = None, *, what: str = "the data",
         error: Error = StructPruneError) -> list[Batch]:
    """The first ``count`` batches of ``data`` as given (fewer if it is shorter), each checked
    to be a batch: by default all of a list or tuple, the first 8 of anything else (an
    iterator, a DataLoader)."""
    if isinstance(data, (torch.Tensor, np.ndarray, Mapping)) or not hasattr(data, "__iter__"):
        raise error(f"{what} is a {type(data).__name__}, not batches: pass a list of batches "
                    "or a DataLoader")
    if count is None:
        count = max(len(data), 1) if isinstance(data, (list, tuple)) else DEFAULT_BATCHES
    if int(count) < 1:
        raise error(f"number of calibration batches {count} must be 1 or more")
    taken = list(islice(data, int(count)))
    for batch in taken:
        split(batch, error=error)
    if not taken:
        raise error(f"{what} gave no batches: check it is not empty")
    return taken


def device_of(model: nn.Module) -> torch.device | None:
    """Where ``model``'s first parameter (else buffer) lives; None for a model with neither."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def map_tensors(value: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """``value`` with ``fn`` applied to every tensor in it (nested in tuples, named tuples,
    lists and dicts); everything else as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        mapped = [map_tensors(v, fn) for v in value]
        return type(value)(*mapped) if hasattr(value, "_fields") else tuple(mapped)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, Mapping):
        return {k: map_tensors(v, fn) for k, v in value.items()}
    return value


def to_device(value: Any, device: torch.device | str | None) -> Any:
    """``value`` with every tensor in it (nested in tuples, named tuples, lists and dicts) on
    ``device``; None leaves it as it is."""
    if device is None:
        return value
    return map_tensors(value, lambda tensor: tensor.to(device))


def call(model: nn.Module, batch: Batch) -> Any:
    """``model`` run on a batch's inputs (its targets, if any, left out), moved to the
    model's device."""
    inputs, _ = split(batch)
    return inputs.to(device_of(model)).call(model)


def flatten_outputs(value: Any) -> list[torch.Tensor]:
    """The tensors in a model's output, in the order the exporters keep (dicts by insertion,
    objects such as dataclasses by their attributes)."""
    found: list[torch.Tensor] = []

    def visit(v: Any) -> Any:
        if isinstance(v, torch.Tensor):
            found.append(v)
        elif hasattr(v, "__dict__") and not isinstance(v, (int, float, str, nn.Module)):
            fx.node.map_aggregate(vars(v), visit)
        return v

    fx.node.map_aggregate(value, visit)
    return found


def first_tensor(output: Any, *, error: Error = StructPruneError) -> torch.Tensor:
    """The first tensor of a model's output: the output itself, or the first one met depth
    first in a tuple, list, dict or object of outputs (an ultralytics detector's ``(y, [p3,
    p4, p5])`` gives ``y``)."""
    if isinstance(output, torch.Tensor):
        return output
    tensors = flatten_outputs(output)
    if not tensors:
        raise error(f"the model's output ({type(output).__name__}) holds no tensor: return "
                    "the scores as a tensor, or a tuple, list or dict holding one first")
    return tensors[0]


__all__ = ["FORMS", "Batch", "Inputs", "call", "device_of", "first_tensor", "flatten_outputs",
           "labelled", "split", "take", "to_device"]
