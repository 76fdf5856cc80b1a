"""Prometheus metrics of a real session, parsed back with prometheus_client's own parser: the
values match the journal, and counters survive a restart (they are derived from it)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from engine.adapters.journal import Journal
from engine.cli.main import main
from engine.core.postmortem import analyse
from engine.metrics import JournalMetrics
from engine.orchestrator import Engine
from engine.replay import replay_steps
from tests.conftest import rows
from tests.integration.conftest import crash_server


def _samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text.decode())
        for sample in family.samples
    }


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float | None:  # fmt: skip
    return samples.get((name, tuple(sorted(labels.items()))))


def test_metrics_match_the_journal_and_survive_a_restart(
    real_engine: Engine, tiny_model: Path, tmp_path: Path, capsys: object
) -> None:
    engine = real_engine
    metrics = JournalMetrics(engine.journal, servers=lambda: {engine.slot: engine.state.process})
    model = str(tiny_model)
    assert engine.load({"model_path": model}).status == "loaded"
    assert engine.load({"model_path": model}).status == "already_loaded"
    assert engine.load({"model_path": model, "max_seq_length": 512}).status == "loaded"
    live = _samples(metrics.render())
    assert (_value(live, "studio_engine_server_memory_bytes", slot="default", kind="rss") or 0) > 0
    assert _value(live, "studio_engine_slot_state", slot="default", state="ready") == 1.0
    assert (_value(live, "studio_engine_journal_append_seconds_count") or 0) > 0

    crash_server(engine)
    engine.unload()
    after = _samples(metrics.render())

    journal_path = tmp_path / "journal.db"
    report = analyse((s.seq, s.event, s.state) for s in replay_steps(rows(journal_path)))
    outcomes = Counter(load.outcome for load in report.loads)
    assert _value(after, "studio_engine_loads_total", slot="default", outcome="loaded") == 2
    assert outcomes["loaded"] == 2 and outcomes["already_loaded"] == 1
    assert _value(after, "studio_engine_loads_total", slot="default", outcome="already_loaded") == 1
    # A SIGKILL the engine did not send reads as the kernel's OOM killer (engine.core.failure).
    crashes = _value(
        after, "studio_engine_crashes_total", slot="default", failure_kind="oom_killed"
    )
    assert crashes == 1
    assert _value(after, "studio_engine_slot_state", slot="default", state="idle") == 1.0
    assert _value(after, "studio_engine_slot_state", slot="default", state="ready") == 0.0
    spans = Counter(phase for load in report.loads for phase, _, _ in load.spans)
    for phase, n in spans.items():
        count = _value(after, "studio_engine_load_phase_seconds_count", slot="default", phase=phase)
        assert count == n, phase
        total = sum(e - s for load in report.loads for p, s, e in load.spans if p == phase)
        assert abs((_value(after, "studio_engine_load_phase_seconds_sum", slot="default",
                           phase=phase) or 0) - total) < 1e-6  # fmt: skip
    assert _value(after, "studio_engine_server_memory_bytes", slot="default", kind="rss") is None

    # A new process reading the same journal reports the same totals.
    reopened = Journal.open(journal_path, create=False)
    try:
        restarted = _samples(JournalMetrics(reopened).render())
    finally:
        reopened.close()
    counters = {k: v for k, v in after.items() if k[0].endswith(("_total", "_count", "_bucket"))}
    counters = {k: v for k, v in counters.items() if "journal_append" not in k[0]}
    assert counters and all(restarted.get(k) == v for k, v in counters.items())
    assert main(["metrics", str(journal_path)]) == 0
