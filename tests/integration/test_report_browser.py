"""The postmortem page of a real session, opened in a real headless browser (Debian's
`chromium`; `.ci/run` installs it when missing): it renders without a console message and
shows one bar per phase of every load."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from engine.cli.main import main
from engine.core.postmortem import analyse
from engine.orchestrator import Engine
from engine.replay import replay_steps
from tests.conftest import rows
from tests.integration.conftest import crash_server, marked_servers

pytestmark = pytest.mark.server


def _browser() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.skip("!!! chromium is not installed: the HTML postmortem page is UNTESTED")
    return found


def _chromium(browser: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [browser, "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr",
         "--v=0", *args],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip


def test_the_report_of_a_real_session_renders_one_bar_per_phase(
    real_engine: Engine, tiny_model: Path, tmp_path: Path
) -> None:
    browser = _browser()
    engine = real_engine
    assert engine.load({"model_path": str(tiny_model)}).status == "loaded"
    assert engine.load({"model_path": str(tiny_model), "max_seq_length": 512}).status == "loaded"
    crash_server(engine)
    engine.unload()
    assert not marked_servers(engine)

    journal = tmp_path / "journal.db"
    page = tmp_path / "report.html"
    assert main(["postmortem", str(journal), "--html", str(page)]) == 0

    dom = _chromium(browser, "--dump-dom", page.as_uri())
    console = [line for line in dom.stderr.splitlines() if ":CONSOLE" in line]
    assert console == [], console
    report = analyse((s.seq, s.event, s.state) for s in replay_steps(rows(journal)))
    spans = [phase for load in report.loads for phase, _, _ in load.spans]
    assert {"resolve", "kill", "spawn", "warm"} <= set(spans)
    assert re.findall(r'<rect class="phase" data-phase="(\w+)"', dom.stdout) == spans
    assert "crashed" in dom.stdout and 'class="load bad"' not in dom.stdout

    shot = tmp_path / "report.png"
    _chromium(browser, f"--screenshot={shot}", "--window-size=1400,1500", page.as_uri())
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
