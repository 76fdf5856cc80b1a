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


class JournalUnavailable(EngineError):
    """The journal refused a write for good (disk full, lock never released, connection lost).

    Names the journal and the cause, never the SQL or its parameters. Any server this engine
    started and could not journal was killed before this was raised; the next call (or the
    crash monitor) reconciles the slot with the journal once it is writable again.
    """


class JournalBusy(EngineError):
    """Another connection held the journal's write lock past the busy timeout at open."""


class EngineClosed(EngineError):
    """A call on an engine after `close()`: it holds no lease and watches no server."""


# --- the journal -----------------------------------------------------------------------------


class JournalError(RuntimeError):
    """Anything wrong with a journal, explained for a human."""


class SchemaTooNew(JournalError):
    pass


class CorruptJournal(JournalError):
    def __init__(self, seq: int, message: str, where: str | None = None) -> None:
        self.seq, self.message = seq, message
        prefix = f"{where}: " if where else ""
        super().__init__(f"{prefix}journal event #{seq}: {message}")

    def naming(self, where: str) -> CorruptJournal:
        """The same error, saying which journal (file or URL) it is about."""
        return CorruptJournal(self.seq, self.message, where)


class ConcurrencyConflict(JournalError):
    """Another writer appended to this stream first."""


class SecretInPayload(JournalError):
    pass
