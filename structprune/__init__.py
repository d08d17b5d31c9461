"""structprune: structured channel pruning for PyTorch CNNs.

Stages, one module each: capture -> analyse -> score -> plan -> apply -> verify -> export ->
bench. ``prune`` runs the first six in one call.
"""

from structprune.config import PruneConfig
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

__all__ = [
    "DEFAULT_REGISTRY", "Analysis", "Capture", "CaptureError", "Group", "Plan", "PlanError",
    "PruneConfig", "PruneResult", "StructPruneError", "VerificationError", "analyse",
    "apply_plan", "capture", "load", "make_plan", "save", "masked_model", "prune", "register_op",
    "register_rule", "score", "verify",
]
