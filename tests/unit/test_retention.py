"""Log retention (pure): the last 50 loads per slot, failed ones 7 days more, the live one."""

from __future__ import annotations

from engine.core.retention import FAILED_FOR_S, LogFile, expired_logs

NOW = 1_800_000_000.0


def test_only_the_newest_loads_are_kept() -> None:
    logs = [LogFile(f"l{i:03}", NOW - i, failed=False) for i in range(60)]
    assert expired_logs(logs, NOW, keep=50) == [f"l{i:03}" for i in range(50, 60)]


def test_failed_logs_stay_seven_days_and_the_live_one_always() -> None:
    old = NOW - FAILED_FOR_S - 1
    logs = [
        *(LogFile(f"new{i}", NOW - i, failed=False) for i in range(3)),
        LogFile("failed-recent", NOW - 3600, failed=True),
        LogFile("failed-old", old, failed=True),
        LogFile("ok-old", old - 1, failed=False),
        LogFile("live-old", old - 2, failed=False),
    ]
    assert expired_logs(logs, NOW, keep=2, live="live-old") == [
        "new2",
        "failed-old",
        "ok-old",
    ]
    assert expired_logs(logs, NOW, keep=50) == []
