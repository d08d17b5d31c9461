"""structprune: structured channel pruning for PyTorch CNNs.

Stages, one module each: capture -> analyse -> score -> plan -> apply -> verify -> export ->
bench. ``prune`` runs the first six in one call.
"""

from .analyse import Analysis, Group, analyse
from .api import PruneResult, prune
from .apply import apply_plan
from .capture import Capture, capture
from .errors import CaptureError, PlanError, StructPruneError, VerificationError
from .io import load, save
from .plan import Plan, PlanSettings, make_plan
from .rules import DEFAULT_REGISTRY, register_op, register_rule
from .score import score
from .verify import masked_model, verify

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_REGISTRY", "Analysis", "Capture", "CaptureError", "Group", "Plan", "PlanError",
    "PlanSettings", "PruneResult", "StructPruneError", "VerificationError", "analyse",
    "apply_plan", "capture", "load", "make_plan", "save", "masked_model", "prune", "register_op",
    "register_rule", "score", "verify",
]
