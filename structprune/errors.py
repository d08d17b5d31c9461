"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations


class StructPruneError(Exception):
    """A problem with the user's model, inputs, settings or files; the message says what to do."""


class CaptureError(StructPruneError):
    """The model could not be traced or run on the example inputs."""


class PlanError(StructPruneError):
    """A plan cannot be made, read or applied to this model."""


class VerificationError(StructPruneError):
    """The pruned model does not match the masked dense model."""
