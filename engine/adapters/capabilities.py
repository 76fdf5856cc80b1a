"""The capability probe: `llama-server --help`, run once per binary identity and cached.

The identity is (resolved path, size, mtime): a rebuilt or replaced binary is probed again,
an unchanged one never is. Records live in the journal stream `@capabilities`, so an
`Engine.open` with a known binary runs no subprocess for it; every engine on the journal
shares them. Parsing is pure (engine.core.capabilities).
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
from collections.abc import Mapping

from pydantic import ValidationError

from engine.adapters.journal import Journal
from engine.core import events as ev
from engine.core.capabilities import ServerCapabilities, parse_help
from engine.core.errors import ConcurrencyConflict

log = logging.getLogger("studio-engine")

HELP_TIMEOUT_S = 30.0


class CapabilityProbeError(RuntimeError):
    """`llama-server --help` did not run or printed no flags."""


def binary_identity(path: str) -> tuple[str, int, int]:
    resolved = os.path.realpath(path)
    stat = os.stat(resolved)
    return resolved, stat.st_size, stat.st_mtime_ns


def run_help(path: str, env: Mapping[str, str]) -> str:
    try:
        done = subprocess.run(
            [path, "--help"],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=HELP_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise CapabilityProbeError(f"{path} --help did not run: {exc}") from exc
    text = done.stdout + done.stderr
    if done.returncode != 0:
        raise CapabilityProbeError(f"{path} --help failed (exit {done.returncode}): {text[-300:]}")
    return text


def probe_capabilities(
    path: str, env: Mapping[str, str], journal: Journal | None
) -> ServerCapabilities:
    """The capabilities of the binary at `path`: from the journal when known, else probed."""
    binary, size, mtime_ns = binary_identity(path)
    cached = _cached(journal, binary, size, mtime_ns) if journal is not None else None
    if cached is not None:
        return parse_help(cached.help_text)
    help_text = run_help(binary, env)
    try:
        capabilities = parse_help(help_text)
    except ValueError as exc:
        raise CapabilityProbeError(f"{binary} --help: {exc}") from exc
    if journal is not None:
        record = ev.CapabilitiesProbed(
            at=time.time(), binary=binary, size_bytes=size, mtime_ns=mtime_ns, help_text=help_text
        )
        append_engine_record(journal, ev.CAPABILITIES_STREAM, record)
    return capabilities


def _cached(
    journal: Journal, binary: str, size: int, mtime_ns: int
) -> ev.CapabilitiesProbed | None:
    found = None
    for seq, _version, _at, _type, payload in journal.read_rows(ev.CAPABILITIES_STREAM):
        try:
            record = ev.CAPABILITIES_PROBED_ADAPTER.validate_json(payload)
        except ValidationError:  # a cache may forget; it must not stop an open
            log.warning("ignoring unreadable capability record #%d", seq)
            continue
        if (record.binary, record.size_bytes, record.mtime_ns) == (binary, size, mtime_ns):
            found = record  # the latest one wins
    return found


def append_engine_record(journal: Journal, stream: str, record: ev.BaseEvent) -> None:
    """Append to an engine stream (`@...`) shared by every engine on the journal."""
    for _attempt in range(5):
        try:
            journal.append(stream, journal.last_version(stream), [record])
            return
        except ConcurrencyConflict:  # another engine appended first: append after it
            continue
    log.warning("%s record not persisted: the journal kept moving", stream)
