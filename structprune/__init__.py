"""structprune: structured channel pruning for PyTorch CNNs.

The pass (:mod:`structprune.core`): capture -> analyse -> score -> plan -> apply -> verify;
``prune`` runs it in one call. Around it, :mod:`structprune.accuracy` (data, recovery,
training) and :mod:`structprune.deploy` (export, runtimes, speed targets); the command line
and run folders in :mod:`structprune.front`.

The headline features of the outer packages (``recover``, ``prune_for_target``,
``export_onnx``, ``prune_to_dir``) are exported here too, imported when first used so that
``import structprune`` does not load ONNX Runtime or the training stack.
"""

from importlib import import_module
from typing import Any

from structprune.config import PruneConfig, RunConfig, TargetConfig
from structprune.core.analyse import Analysis, Group, analyse
from structprune.core.api import PruneResult, prune
from structprune.core.apply import apply_plan
from structprune.core.capture import Capture, capture
from structprune.core.plan import Plan
from structprune.core.rules import DEFAULT_REGISTRY, register_op, register_rule
from structprune.core.score import score
from structprune.core.selection import make_plan
from structprune.core.verify import masked_model, verify
from structprune.errors import CaptureError, PlanError, StructPruneError, VerificationError
from structprune.front.io import load, save

__version__ = "0.1.0"

# name -> module of the headline features outside the pass, imported on first use
_LAZY = {
    "recover": "structprune.accuracy.recover",
    "export_onnx": "structprune.deploy.export",
    "prune_for_target": "structprune.deploy.speed",
    "prune_to_dir": "structprune.front.workflow",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'structprune' has no attribute {name!r}")

__all__ = [
    "DEFAULT_REGISTRY", "Analysis", "Capture", "CaptureError", "Group", "Plan", "PlanError",
    "PruneConfig", "PruneResult", "RunConfig", "StructPruneError", "TargetConfig",
    "VerificationError", "analyse", "apply_plan", "capture", "export_onnx", "load", "make_plan",
    "masked_model", "prune", "prune_for_target", "prune_to_dir", "recover", "register_op",
    "register_rule", "save", "score", "verify",
]
