"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""

from __future__ import annotations

# longest message line: a symbolic shape in an error can run to thousands of characters
LINE_LIMIT = 240


def first_line(error: BaseException | str, limit: int = LINE_LIMIT) -> str:
    """The first line of an error's message, cut to ``limit`` characters."""
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    return line if len(line) <= limit else line[:limit - 3] + "..."


class StructPruneError(Exception):
    """A problem with the user's model, inputs, settings or files; the message says what to do."""


class CaptureError(StructPruneError):
    """The model could not be traced or run on the example inputs."""


class PlanError(StructPruneError):
    """A plan cannot be made, read or applied to this model."""


class VerificationError(StructPruneError):
    """The pruned model does not match the masked dense model."""
