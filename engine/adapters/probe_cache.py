"""The hub probe cache: definitive answers about a repo, persisted in the journal.

Keyed by (repo id casefolded, SHA-256 fingerprint of the token or None); the token itself is
never stored. Only definitive answers are cached — a file list, or a refusal ("not found",
"gated", "no GGUF"), which is asked again after `ERROR_RETRY_S`. Concurrent probes of one key
run once; different keys never wait for each other. The records live in the journal stream
`@hub-probes`, so they survive restarts and are shared by every engine on the journal.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Final

from pydantic import ValidationError

from engine.adapters.journal import Journal
from engine.core import events as ev
from engine.core.errors import ConcurrencyConflict
from engine.effects import CancelToken

log = logging.getLogger("studio-engine")

# Cached refusals (not found, gated, no GGUF) are definitive for this long, then re-probed.
ERROR_RETRY_S: Final = 600.0

Key = tuple[str, str | None]  # (repo id casefolded, token fingerprint)


class ProbeCache:
    """Definitive probe answers, persisted in the journal's `@hub-probes` stream.

    The in-memory map is a read-through view of that stream: a miss first catches up with
    rows other engines (or an earlier run) appended, then probes once for all callers. Nothing
    is read until a hub model is asked for, so opening an engine costs no read here.
    """

    def __init__(self, journal: Journal | None) -> None:
        self._journal = journal
        self._entries: dict[Key, ev.HubProbed] = {}
        self._version = 0
        self._lock = threading.Lock()  # guards the maps; never held during I/O
        self._write_lock = threading.Lock()  # our own appends, one at a time
        self._inflight: dict[Key, Future[ev.HubProbed]] = {}

    def cached(self, key: Key) -> ev.HubProbed | None:
        """The recorded answer for `key`, if any (never probes)."""
        with self._lock:
            hit = self._entries.get(key)
        return hit if hit is not None else self._catch_up(key)

    def forget(self, key: Key) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def get(
        self,
        key: Key,
        probe: Callable[[], ev.HubProbed],
        cancel: CancelToken,
    ) -> ev.HubProbed:
        """The cached answer for `key`, else `probe()` run once however many callers ask.

        A cached refusal older than `ERROR_RETRY_S` is probed again: "gated" ends when the
        user accepts the terms, "not found" when the repo is created or made public.
        """
        with self._lock:
            hit = _fresh(self._entries.get(key))
            if hit is not None:
                return hit
            flight = self._inflight.get(key)
            owner = flight is None
            if flight is None:
                flight = self._inflight[key] = Future()
        if not owner:
            return _wait(flight, cancel)
        try:
            result = _fresh(self._catch_up(key))
            if result is None:
                result = probe()
                self._store(result)
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set_result(result)
            return result
        finally:
            with self._lock:
                del self._inflight[key]

    def _catch_up(self, key: Key | None = None) -> ev.HubProbed | None:
        """Read records appended since we last looked; return `key`'s entry if there is one."""
        if self._journal is None:
            return None
        rows = list(self._journal.read_rows(ev.HUB_PROBE_STREAM, after_version=self._version))
        with self._lock:
            for seq, version, _at, _type, payload in rows:
                try:
                    record = ev.HUB_PROBED_ADAPTER.validate_json(payload)
                except ValidationError:  # a cache may forget; it must not break loads
                    log.warning("ignoring unreadable hub probe record #%d", seq)
                else:
                    self._entries[(record.key, record.token_fingerprint)] = record
                self._version = max(self._version, version)
            return self._entries.get(key) if key is not None else None

    def _store(self, record: ev.HubProbed) -> None:
        with self._write_lock:
            if self._journal is not None:
                for _attempt in range(5):
                    try:
                        self._journal.append(ev.HUB_PROBE_STREAM, self._version, [record])
                    except ConcurrencyConflict:  # another engine appended first: catch up
                        self._catch_up()
                        continue
                    with self._lock:
                        self._version += 1
                    break
                else:  # still served from memory; the next run probes again
                    log.warning("hub probe of %s not persisted: journal kept moving", record.key)
            with self._lock:
                self._entries[(record.key, record.token_fingerprint)] = record


def _fresh(record: ev.HubProbed | None) -> ev.HubProbed | None:
    if record is not None and record.error is not None and time.time() - record.at > ERROR_RETRY_S:
        return None
    return record


def _wait(flight: Future[ev.HubProbed], cancel: CancelToken) -> ev.HubProbed:
    while True:
        cancel.check()
        try:
            return flight.result(timeout=0.05)
        except TimeoutError:
            continue
