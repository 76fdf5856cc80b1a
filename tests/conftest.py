from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from engine.adapters.journal import Journal
from engine.cli.tiny_model import write_tiny_model
from engine.orchestrator import Engine
from tests.fakes import FakeEffects

# huggingface_hub freezes HF_ENDPOINT / HF_HOME when first imported and, on first use, fetches
# a registry from that endpoint: point both somewhere local before anything imports it (the
# engine imports it lazily, so here is early enough), so the suite never leaves 127.0.0.1.
# Hub tests set their own endpoint and cache per test.
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:9"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="studio-engine-hf-")
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"


@pytest.fixture(autouse=True)
def no_engine_left_open() -> Iterator[None]:
    """Every test closes the engines it opens: no lease heartbeat or crash monitor outlives it."""
    before = {t.ident for t in threading.enumerate()}
    yield
    left = [
        t.name
        for t in threading.enumerate()
        if t.ident not in before and t.name.startswith(("lease-", "monitor-"))
    ]
    assert not left, f"threads of an engine that was never closed: {left}"


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


@pytest.fixture
def journal_path(tmp_path: Path) -> Path:
    return tmp_path / "journal.db"


@pytest.fixture
def fake_engine(journal_path: Path) -> Iterator[tuple[Engine, FakeEffects]]:
    effects = FakeEffects()
    engine = Engine.open(journal_path, effects=effects, monitor=False)
    yield engine, effects
    engine.close()


def rows(journal_path: Path, slot: str = "default") -> list[tuple[int, int, float, str, str]]:
    journal = Journal.open(journal_path, create=False)
    try:
        return list(journal.read_rows(slot))
    finally:
        journal.close()


def run_sql(journal_path: Path, statement: str) -> None:
    """Change a SQLite journal behind the engine's back, as a hand edit or a bug would."""
    engine = sa.create_engine(f"sqlite:///{journal_path}")
    with engine.begin() as conn:
        conn.execute(sa.text(statement))
    engine.dispose()
