"""Saving and loading pruned models without pickle: plan.json plus safetensors weights."""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from structprune.core.apply import apply_plan
from structprune.core.plan import Plan
from structprune.errors import PlanError
from structprune.files import atomic_write

WEIGHTS = "pruned.safetensors"
PLAN = "plan.json"


def save(model: nn.Module, directory: str | os.PathLike, plan: Plan) -> None:
    """Write ``plan.json`` and the pruned weights (safetensors, no pickle) into ``directory``."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plan.save(directory / PLAN)
    atomic_write(directory / WEIGHTS, lambda path: save_model(model, str(path)))


def load(directory: str | os.PathLike, dense: nn.Module | Callable[[], nn.Module] | str,
         seed: int = 0) -> nn.Module:
    """Rebuild a pruned model: the dense architecture, the plan applied, the weights loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from structprune.front.models import build_model

    directory = Path(directory)
    plan = Plan.load(directory / PLAN)
    if isinstance(dense, str):
        dense = build_model(dense, seed)
    elif not isinstance(dense, nn.Module):
        dense = dense()
    model = apply_plan(dense, plan, inplace=True)
    try:
        state = load_file(str(directory / WEIGHTS))
    except (SafetensorError, OSError) as exc:
        raise PlanError(f"cannot load {directory / WEIGHTS}: {str(exc).splitlines()[0]}") from exc
    own = model.state_dict(keep_vars=True)
    ordered = OrderedDict(state)
    ordered._metadata = getattr(model.state_dict(), "_metadata", None)  # layer versions
    try:
        result = model.load_state_dict(ordered, strict=False)
    except RuntimeError as exc:
        raise PlanError(f"cannot load {directory / WEIGHTS}: {str(exc).splitlines()[0]}") from exc
    loaded = {id(own[k]) for k in state if k in own}
    missing = [k for k in result.missing_keys if id(own[k]) not in loaded]  # not tied aliases
    if missing or result.unexpected_keys:
        raise PlanError(f"{directory / WEIGHTS} does not match the plan's model "
                        f"(missing {missing[:3]}, unexpected {result.unexpected_keys[:3]})")
    return model
