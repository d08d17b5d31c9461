"""Saving and loading pruned models without pickle: plan.json plus safetensors weights."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch.nn as nn

from .apply import apply_plan
from .errors import PlanError
from .plan import Plan

WEIGHTS = "pruned.safetensors"
PLAN = "plan.json"


def save(model: nn.Module, directory: str | os.PathLike, plan: Plan) -> None:
    """Write ``plan.json`` and the pruned weights (safetensors, no pickle) into ``directory``."""
    from safetensors.torch import save_model

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    plan.save(directory / PLAN)
    tmp = directory / f".{WEIGHTS}.tmp"
    save_model(model, str(tmp))
    os.replace(tmp, directory / WEIGHTS)


def load(directory: str | os.PathLike, dense: nn.Module | Callable[[], nn.Module] | str,
         seed: int = 0) -> nn.Module:
    """Rebuild a pruned model: the dense architecture, the plan applied, the weights loaded."""
    from safetensors import SafetensorError
    from safetensors.torch import load_model

    from .models import build_model

    directory = Path(directory)
    plan = Plan.load(directory / PLAN)
    if isinstance(dense, str):
        dense = build_model(dense, seed)
    elif not isinstance(dense, nn.Module):
        dense = dense()
    model = apply_plan(dense, plan, inplace=True)
    try:
        load_model(model, str(directory / WEIGHTS))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise PlanError(f"cannot load {directory / WEIGHTS}: {str(exc).splitlines()[0]}") from exc
    return model
