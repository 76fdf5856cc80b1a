"""`postmortem --html`: the page's content, drawn from a scripted journal (the browser check of
the same page is tests/integration/test_report_browser.py)."""

from __future__ import annotations

import re
from pathlib import Path

from engine.cli.main import main
from engine.cli.report import render_html, transition_counts
from engine.core import events as ev
from engine.core.postmortem import analyse
from tests.unit.test_postmortem import SPEC, _load, _records, _write


def _session() -> list[ev.BaseEvent]:
    """A load, a reload that fails at health with a hostile error text, a crash of nothing."""
    first = _load("a", 100.0, 1)
    hostile = '<script>alert("x")</script> & friends'
    second = [
        ev.LoadRequested(at=200.0, load_id="b", spec=SPEC),
        ev.ModelResolved(at=200.1, load_id="b", model=first[1].model),  # type: ignore[attr-defined]
        ev.KillStarted(at=200.1, load_id="b", pid=1, create_time=1.0, reason="replace"),
        ev.ProcessExited(at=200.3, load_id="b", pid=1, returncode=0),
        ev.SettleStarted(at=200.3, load_id="b"),
        ev.Settled(at=200.4, load_id="b", outcome="cpu-only"),
        first[4].model_copy(update={"at": 200.4, "load_id": "b"}),
        ev.Spawned(at=200.5, load_id="b", pid=2, create_time=2.0),
        ev.HealthFailed(at=201.0, load_id="b", error=hostile, log_tail="tail <b>bold</b>"),
        ev.ProcessExited(at=201.0, load_id="b", pid=2, returncode=1),
        ev.LoadFailed(at=201.0, load_id="b", error=hostile),
    ]
    return [*first, *second]


def _page(events: list[ev.BaseEvent]) -> str:
    records = _records(events)
    report = analyse(records)
    counts = transition_counts((event.type, state.state) for _, event, state in records)
    return render_html(report, "journal.db", counts)


def test_one_bar_per_phase_of_every_load() -> None:
    events = _session()
    page = _page(events)
    report = analyse(_records(events))
    bars = re.findall(r'<rect class="phase" data-phase="(\w+)"', page)
    assert bars == [phase for load in report.loads for phase, _, _ in load.spans]
    assert bars == [
        "resolve",
        "settle",
        "spawn",
        "warm",
        "resolve",
        "kill",
        "settle",
        "spawn",
        "warm",
    ]


def test_a_failed_load_is_highlighted_and_hostile_text_is_escaped() -> None:
    page = _page(_session())
    assert re.search(r'<g class="load bad" data-load="b">', page)
    assert '<g class="load" data-load="a">' in page
    assert "<script>" not in page and "&lt;script&gt;alert" in page
    assert "tail &lt;b&gt;bold&lt;/b&gt;" in page


def test_the_machine_draws_each_transition_taken_with_its_count() -> None:
    page = _page(_load("a", 100.0, 1) + _load("b", 200.0, 2))
    assert re.search(r"<title>settled x2</title>", page)
    assert re.search(r"<title>load_requested x1</title>", page)  # ready -> resolving, once
    states = re.findall(r'<g class="state" data-state="(\w+)"', page)
    assert {"idle", "ready", "crashed", "recovering", "unloading"} <= set(states)


def test_the_cli_writes_the_page(journal_path: Path, tmp_path: Path) -> None:
    _write(journal_path, _session())
    out = tmp_path / "report.html"
    assert main(["postmortem", str(journal_path), "--html", str(out)]) == 0
    assert out.read_text().startswith("<!DOCTYPE html>")
