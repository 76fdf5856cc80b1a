"""The capability probe against the real binary: parsed once per binary identity, cached in
the journal's `@capabilities` stream, and every risky flag of the live `--help` classified."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from engine.adapters import capabilities as probe
from engine.adapters.binary import locate_server
from engine.adapters.journal import Journal
from engine.core import events as ev
from engine.core.capabilities import parse_help
from engine.core.policy import unclassified
from engine.orchestrator import Engine
from tests.fakes import HELP_FIXTURE


def test_every_risky_flag_of_the_live_binary_is_classified() -> None:
    binary = locate_server()
    live = parse_help(probe.run_help(str(binary.path), {**os.environ, **binary.env}))
    assert unclassified(live) == [], "new llama-server flags touch files/sockets/code: classify"
    saved = parse_help(HELP_FIXTURE.read_text())
    # The unit tables run on the saved help: it must be this binary's, or they test another one.
    assert set(saved.flags) == set(live.flags), (
        "tests/fixtures/llama-server-help.txt is from another llama-server: save the new "
        "`llama-server --help` there"
    )


def test_open_with_a_known_binary_runs_no_probe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    journal = tmp_path / "journal.db"
    calls: list[str] = []
    real_run_help = probe.run_help

    def counting(path: str, env: dict[str, str]) -> str:
        calls.append(path)
        return real_run_help(path, env)

    monkeypatch.setattr(probe, "run_help", counting)
    with Engine.open(journal, run_dir=tmp_path / "run", monitor=False) as first:
        assert first.capabilities.supports("--kv_unified")
    assert len(calls) == 1
    with Engine.open(journal, run_dir=tmp_path / "run", monitor=False) as second:
        assert second.capabilities.canonical("-c") == "--ctx-size"
    assert len(calls) == 1, "the second open ran --help again"
    reader = Journal.open(journal, create=False)
    try:
        records = list(reader.read_rows(ev.CAPABILITIES_STREAM))
    finally:
        reader.close()
    assert len(records) == 1 and records[0][3] == "capabilities_probed"


def test_a_changed_binary_is_probed_again(tmp_path: Path) -> None:
    binary = locate_server()
    copy = tmp_path / "bin" / "llama-server"
    copy.parent.mkdir()
    copy.write_bytes(binary.path.read_bytes())
    copy.chmod(0o755)
    env = {**os.environ, **binary.env}
    if not binary.env:  # the copy needs the original's libraries beside it
        env["LD_LIBRARY_PATH"] = os.pathsep.join(str(d) for d in binary.library_dirs)
    journal = Journal.open(tmp_path / "journal.db")
    try:
        probe.probe_capabilities(str(copy), env, journal)
        os.utime(copy, ns=(0, 1_000_000_000))  # same file, new mtime: a new identity
        probe.probe_capabilities(str(copy), env, journal)
        probe.probe_capabilities(str(copy), env, journal)  # now known: no new record
        assert journal.last_version(ev.CAPABILITIES_STREAM) == 2
    finally:
        journal.close()
