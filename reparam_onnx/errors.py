"""Exceptions with the CLI exit code they map to."""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from .report import Report


class ReparamError(Exception):
    """Base class; `exit_code` is what the command line returns."""
    exit_code = 2


class InputError(ReparamError):
    """A bad model, path, option or rule file (exit code 2)."""
    exit_code = 2


class VerificationError(ReparamError):
    """The fused model is not equivalent to the input, or could not be checked (exit code 3)."""
    exit_code = 3

    def __init__(self, message: str, report: Optional[Report] = None):
        super().__init__(message)
        self.report = report
