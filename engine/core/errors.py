"""Errors the pure core and the effects share, so that neither has to import the other."""

from __future__ import annotations


class StepFailed(Exception):
    """An effect failed in a way the load reports to the user (with the server's own text)."""

    def __init__(
        self, error: str, log_tail: str | None = None, failure_kind: str | None = None
    ) -> None:
        self.error, self.log_tail = error, log_tail
        self.failure_kind = failure_kind  # engine.core.failure.FailureKind, when one applies
        super().__init__(error)


class EngineError(RuntimeError):
    """The engine cannot go on as asked (its slot was taken over, a server would not die)."""
