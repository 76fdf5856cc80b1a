"""Which server logs to keep (pure): the last `keep` loads of a slot, and the logs of failed
loads for `failed_for_s` seconds more. Everything older is deleted (and the deletion journaled)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

KEEP_LOADS: Final = 50
FAILED_FOR_S: Final = 7 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class LogFile:
    load_id: str
    mtime: float
    failed: bool


def expired_logs(
    logs: list[LogFile],
    now: float,
    *,
    keep: int = KEEP_LOADS,
    failed_for_s: float = FAILED_FOR_S,
    live: str | None = None,
) -> list[str]:
    """Load ids whose logs go: beyond the newest `keep`, unless failed and younger than
    `failed_for_s`; the live server's log (`live`) always stays."""
    newest_first = sorted(logs, key=lambda log: (log.mtime, log.load_id), reverse=True)
    return [
        log.load_id
        for log in newest_first[keep:]
        if log.load_id != live and not (log.failed and now - log.mtime < failed_for_s)
    ]
