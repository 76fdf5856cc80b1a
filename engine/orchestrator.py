"""The Engine: takes the slot lock, asks the pure core what to do, runs the effect, journals it.

Which step comes next is `decide.next_step`; the effect behind each step is in engine.steps
(write-ahead: intent journaled before the effect, outcome right after). State is only ever
changed by `_emit`, which validates every event against the machine, appends it to the
journal and only then publishes the new state.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import threading
import time
import uuid
import weakref
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from concurrent.futures import Future
from concurrent.futures import wait as wait_futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import SecretStr

from engine import steps
from engine.adapters.binary import locate_server
from engine.adapters.feed import Feed, FeedEvent
from engine.adapters.health import ServerStatus
from engine.adapters.journal import BUSY_TIMEOUT_S, Journal
from engine.adapters.lease import LEASE_TTL_S, Lease
from engine.adapters.local_models import locate_model_file
from engine.core import events as ev
from engine.core.decide import (
    Admit,
    AwaitHealth,
    Emit,
    Kill,
    Load,
    Resolve,
    Settle,
    Spawn,
    Step,
    Unload,
    abort_step,
    decide,
    next_step,
    respawn_events,
)
from engine.core.errors import (
    CorruptJournal,
    EngineClosed,
    EngineError,
    JournalUnavailable,
    StepFailed,
)
from engine.core.evolve import evolve
from engine.core.failure import classify, fallback_reason
from engine.core.machine import STABLE
from engine.core.policy import canonical_allow
from engine.core.progress import ProgressMark
from engine.core.request import (
    LoadRequest,
    LoadResult,
    Status,
    as_request,
    launch_status,
    to_spec,
)
from engine.core.rules import InvalidRequest, same_target
from engine.core.scrub import scrub, scrub_optional
from engine.core.snapshot import encode as encode_snapshot
from engine.core.state import SlotState
from engine.effects import (
    Cancelled,
    CancelToken,
    DownloadProgress,
    Effects,
    LoadPhase,
    LoadProgress,
)
from engine.recovery import recover
from engine.replay import SNAPSHOT_EVERY, open_state, replay_state
from engine.steps import AdmissionGate, SlotSettings

log = logging.getLogger("studio-engine")

# Engines open in this interpreter: its exit closes them (honouring each one's keep_server).
_OPEN_ENGINES: weakref.WeakSet[Engine] = weakref.WeakSet()


@atexit.register
def _close_open_engines() -> None:
    for engine in list(_OPEN_ENGINES):
        try:
            engine.close(keep_server=engine.keep_server)
        except Exception:  # the next engine must still be closed
            log.exception("closing slot %r at exit failed", engine.slot)


KILL_GRACE_S = 5.0
HEALTH_TIMEOUT_S = 600.0
MONITOR_INTERVAL_S = 0.25
MONITOR_MAX_BACKOFF_S = 0.5  # a journal that is writable again hears of a crash within 1 s
# Events appended without an fsync of their own (Journal.append(durable=False)): they change no
# process, or record a change recovery re-establishes from the process table anyway. Each is
# followed by a durable event (or a clean close) whose sync covers it; a power cut can lose
# only such a tail, never a write-ahead intent (kill_started, spawn_started, spawned).
UNSYNCED_EVENTS = frozenset(
    {
        "load_short_circuited",
        "load_joined",
        "load_superseded",
        "unload_requested",
        "process_exited",
        "unloaded",
    }
)


@dataclass
class _Flight:
    """A load call, from the moment it is accepted until it returns."""

    load_id: str
    spec: ev.LoadSpec
    token: CancelToken = field(default_factory=CancelToken)
    result: Future[LoadResult] = field(default_factory=Future)
    hf_token: SecretStr | None = None  # memory only, for this flight: the spec has its hash
    respawn: bool = False  # brings back the last successful load (ensure_ready)


def _new_load_id() -> str:
    return uuid.uuid4().hex[:12]


def default_run_dir(journal: Journal) -> Path:
    """Logs and template files live beside a SQLite journal, else in the user's state dir."""
    database = journal.engine.url.database if journal.is_sqlite else None
    if database and database != ":memory:":
        path = Path(database)
        return path.with_name(path.name + ".run")
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "studio-engine" / journal_id(journal)


def journal_id(journal: Journal) -> str:
    """The random id stored in the journal (migration 0003): how markers and run folders
    name it, however its URL is spelled."""
    if journal.identity is None:  # only a read-only open of a pre-0003 journal lacks one
        raise EngineError(f"journal {journal.url} has no identity; run `studio-engine db upgrade`")
    return journal.identity


class Engine:
    def __init__(
        self,
        journal: Journal,
        effects: Effects,
        *,
        slot: str = "default",
        health_timeout: float = HEALTH_TIMEOUT_S,
        kill_grace: float = KILL_GRACE_S,
        settle_max_wait: float = 2.0,
        threads: int | None = None,
        memory_limit: int | None = None,
        snapshot_every: int = SNAPSHOT_EVERY,
        allow_flags: frozenset[str] | set[str] | tuple[str, ...] = frozenset(),
        fit_fraction: float = 0.97,
        initial_state: SlotState | None = None,
        respawn: Literal["on_demand", "immediate", "never"] = "on_demand",
        idle_unload_after: float | None = None,
        keep_server: bool = False,
    ) -> None:
        if respawn not in ("on_demand", "immediate", "never"):
            raise ValueError(
                f"respawn must be 'on_demand', 'immediate' or 'never', not {respawn!r}"
            )
        if idle_unload_after is not None and not idle_unload_after > 0:
            raise ValueError(f"idle_unload_after must be > 0 seconds, not {idle_unload_after!r}")
        self.respawn = respawn
        self.idle_unload_after = idle_unload_after
        self.keep_server = keep_server  # how the interpreter's exit closes this engine
        if snapshot_every < 0:
            raise ValueError(f"snapshot_every must be >= 0 (0 = off), not {snapshot_every!r}")
        if not 0.80 <= fit_fraction <= 1.00:
            raise ValueError(f"fit_fraction must be in 0.80..1.00, not {fit_fraction!r}")
        self.slot = slot
        self.journal = journal
        self.journal_id = journal_id(journal)
        self.effects = effects
        # The binary's own flags; `allow_flags` opens exceptions to the policy (canonical).
        self.capabilities = effects.capabilities()
        self.allow_flags = canonical_allow(self.capabilities, allow_flags)
        self.settings = SlotSettings(
            health_timeout=health_timeout,
            kill_grace=kill_grace,
            settle_max_wait=settle_max_wait,
            threads=threads,
            memory_limit=memory_limit,
            allow_flags=self.allow_flags,
            fit_fraction=fit_fraction,
        )
        self._snapshot_every = snapshot_every
        self._lease: Lease | None = None  # set by open(): this engine's claim on the slot
        self._state = (
            initial_state
            if initial_state is not None
            else open_state(journal, slot, snapshot_every)
        )
        self._state_lock = threading.Lock()  # guards appends; held only for one journal write
        self._serial = threading.Lock()  # loads and unloads on this slot run one at a time
        self._flights: list[_Flight] = []
        self._observers: list[Callable[[ev.Event, SlotState], None]] = []
        self.download: DownloadProgress | None = None  # per-chunk progress: memory only
        # progress(): (load id, memory high-water, fraction) of the last load it reported
        self._progress_lock = threading.Lock()
        self._progress_mark = ProgressMark()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None
        self._owns_journal = True  # False when a Node shares its journal with its slots
        self.gate: AdmissionGate | None = None  # set by a Node: admission across its slots
        # Idle tracking (memory only, monotonic): the node evicts idle servers LRU first and
        # never one in use. `_evicting` makes "idle" and "being stopped" one atomic decision.
        self._use_lock = threading.Lock()
        self._users = 0
        self._evicting = False
        self.last_used = time.monotonic()
        self._closed = False
        # Set when the journal refused a write in the middle of a load or unload: the slot's
        # truth (a process killed or left running) is not journaled yet. The next call, or
        # the monitor, reconciles it first. (A refused `crashed` is simply retried.)
        self._unreconciled = False

    # --- opening and closing -----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        journal_url: str | os.PathLike[str] | Journal = "studio-engine.db",
        *,
        llama_server: str | os.PathLike[str] | None = None,
        slot: str = "default",
        effects: Effects | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        monitor: bool = True,
        synchronous: str = "FULL",
        lease_ttl: float = LEASE_TTL_S,
        child_env: Mapping[str, str] | None = None,
        server_api_key: Literal["generate"] | None = "generate",
        listen: Literal["tcp", "unix"] = "tcp",
        busy_timeout: float = BUSY_TIMEOUT_S,
        **options: Any,
    ) -> Engine:
        """Open the journal, lease the slot, replay it, reconcile with reality, start the
        crash monitor.

        A missing or broken llama-server is an error here, not at the first load; so is a slot
        another live engine manages (`engine.adapters.lease.SlotBusy`), a journal that is not
        one (`JournalError`, one line) and a write lock held past `busy_timeout` seconds
        (`engine.JournalBusy`).

        Each server gets a fresh random API key (`server_api_key=None`: none, for a backend
        that proxies without one) and an allow-listed environment plus `child_env`.
        `listen="unix"` runs servers on a Unix socket in the 0700 run folder.
        """
        if listen not in ("tcp", "unix"):
            raise ValueError(f"listen must be 'tcp' or 'unix', not {listen!r}")
        if server_api_key not in ("generate", None):
            raise ValueError(
                "server_api_key must be 'generate' (a fresh key per server) or None (no key)"
            )
        binary = locate_server(llama_server) if effects is None else None
        if isinstance(journal_url, Journal):  # a Node shares its journal with its slots
            journal, owned = journal_url, False
        else:
            journal = Journal.open(journal_url, synchronous=synchronous, busy_timeout=busy_timeout)
            owned = True
        lease: Lease | None = None
        try:
            # Replay before the first write (the lease): a corrupt journal is refused with
            # its bytes untouched.
            every = options.get("snapshot_every", SNAPSHOT_EVERY)
            try:
                state = open_state(journal, slot, every) if every >= 0 else None
            except CorruptJournal as exc:
                raise exc.naming(journal.url) from exc
            with journal.guard("taking the slot lease"):
                lease = Lease.acquire(journal, slot, lease_ttl)
            if effects is None:
                from engine.adapters.runtime import RealEffects

                assert binary is not None
                directory = Path(run_dir) if run_dir is not None else default_run_dir(journal)
                effects = RealEffects(
                    binary,
                    directory,
                    journal,
                    child_env=child_env,
                    server_api_key=server_api_key is not None,
                    listen=listen,
                    slot=slot,
                )
            engine = cls(journal, effects, slot=slot, initial_state=state, **options)
            engine._owns_journal = owned
            engine._lease = lease
            engine._catch_up()
            engine._recover()
        except BaseException:
            if lease is not None:
                lease.release()
            if owned:
                journal.close()
            raise
        assert lease is not None
        lease.start()
        if monitor:
            engine._start_monitor()
        _OPEN_ENGINES.add(engine)
        return engine

    def close(self, *, keep_server: bool = False) -> None:
        """Stop the slot. `keep_server=True` leaves a healthy server for the next open to adopt.

        Every other call on a closed engine raises `engine.EngineClosed`; closing twice is a
        no-op.
        """
        _OPEN_ENGINES.discard(self)
        with self._state_lock:
            if self._closed:
                return
            self._closed = True  # from here on no new call is accepted
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join()
        try:
            try:
                if not keep_server:
                    self._unload()
                else:
                    self._cancel_all("engine closed")
            except JournalUnavailable:
                if not keep_server:
                    self._stop_server_unjournaled()
                raise
            finally:
                # Loads queued before close() journal how they ended before the journal closes.
                with self._state_lock:
                    queued = [flight.result for flight in self._flights]
                wait_futures(queued)
            state = self._state
            if self._snapshot_every and state.version and not (self._lease and self._lease.lost):
                # The next open (the common restart) then replays nothing at all.
                self.journal.save_snapshot(
                    self.slot, state.version, state.updated_at or 0.0, encode_snapshot(state)
                )
        finally:
            close = getattr(self.effects, "close", None)
            if close is not None:
                close()
            try:
                if self._lease is not None:
                    self._lease.release()
            except Exception as exc:  # it expires on its own; the journal must still close
                log.warning("slot %r: could not release the lease: %s", self.slot, exc)
            if self._owns_journal:
                self.journal.close()

    def _stop_server_unjournaled(self) -> None:
        """close() with a journal that refuses writes: nothing may be left running, even if
        the journal cannot say so yet (the next open finds the pid gone and journals that)."""
        process = self._state.process
        if process is None or not process.pid or self.effects.exit_status(process) is not None:
            return
        grace = self.settings.kill_grace
        if self.effects.terminate(process, grace) is None:
            self.effects.kill(process, grace)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the journal: the only way state changes ---------------------------------------------

    def emit(self, *events: ev.Event, durable: bool | None = None) -> SlotState:
        """Journal `events` and publish the state after them. They are fsynced unless they are
        all UNSYNCED_EVENTS (`durable` overrides)."""
        if durable is None:
            durable = not all(event.type in UNSYNCED_EVENTS for event in events)
        with self._state_lock:
            before = self._state
            states = []
            after = before
            for event in events:
                after = evolve(after, event)  # an illegal event never reaches the journal
                states.append(after)
            if self._lease is not None and self._lease.lost:
                raise EngineError(
                    f"slot {self.slot!r} was taken over by another engine; this one stopped"
                )
            snapshot = None
            every = self._snapshot_every
            if every and after.version // every != before.version // every:
                # Same transaction as the events: costs one encode per `every` events.
                snapshot = (after.version, after.updated_at or 0.0, encode_snapshot(after))
            self.journal.append(self.slot, before.version, events, snapshot, durable=durable)
            self._state = after
        for event, state in zip(events, states, strict=True):
            for observer in self._observers:
                observer(event, state)
        return after

    def hf_token(self, load_id: str) -> SecretStr | None:
        """The request's own hub token, held in memory for its load only (never journaled)."""
        with self._state_lock:
            return next((f.hf_token for f in self._flights if f.load_id == load_id), None)

    def observe(self, callback: Callable[[ev.Event, SlotState], None]) -> None:
        """Call `callback(event, state_after)` after each journaled event (tests, progress)."""
        self._observers.append(callback)

    @property
    def state(self) -> SlotState:
        return self._state

    # --- public API --------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self._closed:
            raise EngineClosed(f"engine for slot {self.slot!r} of {self.journal.url} is closed")

    def _reconcile(self) -> None:
        """After a refused journal write, journal the truth first (caller holds the slot):
        recovery compares the journal with the process table, as on open."""
        if self._unreconciled:
            recover(self, cause="a journal write failure")
            self._unreconciled = False

    def progress(self) -> LoadProgress | None:
        """How far the load in flight is (`LoadProgress`), the served one's 1.0 once ready,
        None when nothing loads or serves. Cheap enough to poll every few milliseconds."""
        self._check_open()
        state = self._state
        pending, process, download = state.pending, state.process, self.download
        model: ev.ResolvedModel | None
        if pending is None:
            if state.state != "ready" or process is None or state.serving is None:
                return None
            load_id, model = process.load_id, state.serving.model
        else:
            load_id, model = pending.load_id, pending.model
        if download is not None and download.load_id != load_id:
            download = None
        total = model.size_bytes + model.mmproj_size_bytes if model is not None else 0
        downloaded = download.done / download.total if download and download.total else 1.0
        mapped = 0
        phase: LoadPhase = "starting"
        if pending is None:
            mapped, phase = total, "ready"
        elif download is not None and model is None:
            phase = "downloading"
        elif state.state == "warming" and process is not None and process.pid:
            use = self.effects.measure(process)
            mapped, phase = min(use.rss_bytes + use.vram_bytes, total), "loading"
        with self._progress_lock:  # a high-water mark per load: never goes backwards
            self._progress_mark = mark = self._progress_mark.advance(
                load_id,
                mapped,
                total,
                ready=phase == "ready",
                downloaded=downloaded if download is not None else None,
            )
        high, fraction = mark.high, mark.fraction
        if phase == "downloading" and download is not None:
            done, of = download.done, download.total
        else:
            done, of = high, total
        return LoadProgress(load_id, phase, done, of, round(fraction, 6), download)

    def status(self) -> ServerStatus:
        self._check_open()
        state = self._state  # one immutable snapshot: never waits for a load in progress
        served = state.serving or (state.pending.launch if state.pending else None)
        spec = served.spec if served else (state.pending.spec if state.pending else None)
        process = state.process
        socket_path = process.socket_path if process else None
        return ServerStatus(
            state=state.state,
            slot=self.slot,
            pid=process.pid if process and process.pid else None,
            port=process.port if process and process.port else None,  # None on a socket
            model_path=spec.model if spec else None,
            model_file=served.model.model_file if served else None,
            variant=served.model.variant if served else None,
            settings=(
                spec.model_dump(
                    include={
                        "max_seq_length",
                        "cache_type_kv",
                        "speculative_type",
                        "chat_template_override",
                        "parallel_slots",
                    }
                )
                if spec
                else {}
            ),
            extra_args=state.extra_args,
            extra_args_source=state.extra_args_source,
            loading=state.pending.load_id if state.pending else None,
            queued_loads=len(self._flights),
            last_error=state.last_error,
            journal_version=state.version,
            api_key=self.effects.api_key(process.load_id) if process else None,
            base_url=(
                None
                if process is None
                else "http://localhost"
                if socket_path
                else f"http://127.0.0.1:{process.port}"
            ),
            socket_path=socket_path,
            last_failure_kind=state.last_failure_kind,
            fallback_reason=fallback_reason(served.fallbacks) if served is not None else None,
            **launch_status(served),
        )

    def load(self, request: LoadRequest | dict[str, Any]) -> LoadResult:
        """Load (or reload) the slot's model. Serial per slot; the latest different load wins,
        an identical one joins the load in flight."""
        self._check_open()
        request = as_request(request)
        spec = to_spec(  # InvalidRequest before anything is journaled
            request,
            locate_model_file,
            capabilities=self.capabilities,
            allow_flags=self.allow_flags,
        )
        return self._submit(spec, request.hf_token)

    def _submit(
        self, spec: ev.LoadSpec, hf_token: SecretStr | None, *, respawn: bool = False
    ) -> LoadResult:
        with self._state_lock:
            self._check_open()  # close() may have won the race for the lock
            joined = next(
                (f for f in reversed(self._flights) if f.spec == spec and not f.token.cancelled),
                None,
            )
            if joined is None:
                for earlier in self._flights:
                    if not same_target(earlier.spec, spec):  # an equivalent one is kept:
                        earlier.token.cancel("superseded by a newer load")  # we short-circuit
                flight = _Flight(_new_load_id(), spec, hf_token=hf_token, respawn=respawn)
                self._flights.append(flight)
        if joined is not None:
            return self._join(joined)
        try:
            with self._serial:
                result = self._run_load(flight)
                self._retire_log(result)
        except BaseException as exc:
            flight.result.set_exception(exc)
            raise
        finally:
            with self._state_lock:
                self._flights.remove(flight)
        flight.result.set_result(result)
        return result

    def unload(self) -> Status:
        """Cancel any load in flight, then stop the server. Stored extra args survive."""
        self._check_open()
        self._unload()
        return self.status()

    def _unload(self) -> None:
        self._cancel_all("unload requested")
        with self._serial:
            self._reconcile()
            try:
                self._emit_all(decide(Unload(at=self.effects.now()), self._state))
                self._drive(token=None)
            except JournalUnavailable:
                self._unreconciled = True  # a kill may have happened that is not journaled
                raise

    def cancel(self, reason: str = "cancelled by user") -> None:
        """Cancel every load in flight or queued; each journals how it ended."""
        self._check_open()
        self._cancel_all(reason)

    def _cancel_all(self, reason: str) -> None:
        with self._state_lock:
            for flight in self._flights:
                flight.token.cancel(reason)

    def ensure_ready(self, timeout: float | None = None) -> ServerStatus:
        """Make sure the slot serves, for a backend about to proxy a request: a server that
        crashed (or died unnoticed) or was unloaded for being idle is brought back with the
        last successful load (same spec, same extra args), journaled as `respawn_requested`.

        Raises EngineError when there is nothing to bring back (never loaded, unloaded on
        purpose, failed, a crash loop, `respawn="never"`) or the respawn fails, and
        TimeoutError (cancelling the respawn) after `timeout` seconds.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        if not self._serial.acquire(timeout=-1 if timeout is None else timeout):
            raise TimeoutError(f"slot {self.slot!r}: busy for {timeout} s")
        try:
            self.check_crashed()  # a server that died since the monitor last looked
            state = self._state
            if state.state == "ready":
                self.touch()
                return self.status()
            events = respawn_events(state, self.effects.now())
            crashed = state.state == "crashed"
            if not events or (crashed and self.respawn == "never"):
                raise EngineError(
                    f"slot {self.slot!r} is {state.state}, with nothing to respawn"
                    + (f": {state.last_error}" if state.last_error else "")
                )
            self.emit(*events)
            spec = self._state.last_loaded
            if self._state.state == "failed" or spec is None:  # the crash-loop guard
                raise EngineError(self._state.last_error or "crash loop")
        finally:
            self._serial.release()
        result = self._respawn_load(spec, deadline)
        if not result.ok:
            raise EngineError(f"respawn of slot {self.slot!r} failed: {result.error}")
        return self.status()

    def _respawn_load(self, spec: ev.LoadSpec, deadline: float | None) -> LoadResult:
        """Run the respawn's load, cancelling it if it outlives the caller's deadline."""
        if deadline is None:
            return self._submit(spec, None, respawn=True)
        outcome: Future[LoadResult] = Future()

        def run() -> None:
            try:
                outcome.set_result(self._submit(spec, None, respawn=True))
            except BaseException as exc:
                outcome.set_exception(exc)

        threading.Thread(target=run, name=f"respawn-{self.slot}", daemon=True).start()
        try:
            return outcome.result(timeout=max(deadline - time.monotonic(), 0.0))
        except TimeoutError:
            self.cancel("ensure_ready timed out")
            raise TimeoutError(f"slot {self.slot!r} was not ready in time") from None

    def events(self, since: int = 0, *, follow: bool = True) -> Iterator[FeedEvent]:
        """The slot's journaled events after `since` (a journal seq), read from the journal, so
        a reader sees what any process appended. With `follow` it blocks for new ones until
        the engine closes or the caller stops iterating."""
        feed = Feed(self.journal, since=since, stream=self.slot)
        if not follow:
            yield from feed.poll()
            return
        yield from feed.follow(self._stop)

    async def aevents(self, since: int = 0) -> AsyncIterator[FeedEvent]:
        """`events` for asyncio: follows until the engine closes."""
        async for item in Feed(self.journal, since=since, stream=self.slot).afollow(
            stop=self._stop
        ):
            yield item

    async def aload(self, request: LoadRequest | dict[str, Any]) -> LoadResult:
        self._check_open()
        return await asyncio.to_thread(self.load, request)

    async def aunload(self) -> Status:
        self._check_open()
        return await asyncio.to_thread(self.unload)

    # --- idle tracking (for a Node: TTL, LRU eviction, never evicting a server in use) -------

    def touch(self) -> None:
        """Record a use of the server now (a request served): it is the most recently used."""
        self.last_used = time.monotonic()

    @contextmanager
    def in_use(self) -> Iterator[Engine]:
        """Hold the slot's server while a request runs: a Node never evicts it meanwhile.

        Raises EngineError if the node is stopping this server right now."""
        with self._use_lock:
            if self._evicting:
                raise EngineError(f"slot {self.slot!r} is being evicted; load it again")
            self._users += 1
            self.last_used = time.monotonic()
        try:
            yield self
        finally:
            with self._use_lock:
                self._users -= 1
                self.last_used = time.monotonic()

    @property
    def users(self) -> int:
        """Holders of `in_use()` right now."""
        return self._users

    def idle_s(self) -> float:
        return 0.0 if self._users else max(time.monotonic() - self.last_used, 0.0)

    @property
    def busy(self) -> bool:
        """A load or unload is in flight or queued on this slot (it is not idle)."""
        return bool(self._flights) or self._state.state not in STABLE

    def claim_idle(self) -> bool:
        """Claim the slot for an eviction if nothing uses, loads or unloads it; never waits.

        On True the slot is held until `stop_claimed()` or `release_claim()`: loads and
        unloads wait, `in_use()` raises. A Node claims every victim first, so it never
        evicts one server and then finds the next one busy (evicting for nothing).
        """
        if not self._serial.acquire(blocking=False):
            return False  # a load or unload owns the slot: not idle
        with self._use_lock, self._state_lock:
            if not (self._users or self._flights):
                self._evicting = True
                return True
        self._serial.release()
        return False

    def release_claim(self) -> None:
        with self._use_lock:
            self._evicting = False
        self._serial.release()

    def stop_claimed(self) -> None:
        """Stop the claimed slot's server (journaled as an unload), then release the claim."""
        try:
            self._emit_all(decide(Unload(at=self.effects.now()), self._state))
            self._drive(token=None)
        finally:
            self.release_claim()

    # --- loads -------------------------------------------------------------------------------

    def _join(self, joined: _Flight) -> LoadResult:
        self.emit(
            ev.LoadJoined(
                at=self.effects.now(), load_id=_new_load_id(), joined_load_id=joined.load_id
            )
        )
        result = joined.result.result()
        return LoadResult(**{**_fields(result), "joined": True})

    def _run_load(self, flight: _Flight) -> LoadResult:
        self._reconcile()
        if flight.token.cancelled:  # superseded or cancelled while queued: it never started
            self.emit(
                ev.LoadSuperseded(
                    at=self.effects.now(),
                    load_id=flight.load_id,
                    spec=flight.spec,
                    reason=flight.token.reason,
                )
            )
            return LoadResult(
                "cancelled", flight.load_id, self._state.state, error=flight.token.reason
            )
        command = Load(
            flight.load_id,
            flight.spec,
            self.effects.now(),
            self.effects.binary_identity(),
            respawn=flight.respawn,
        )
        events = decide(command, self._state)
        self._emit_all(events)
        if isinstance(events[0], ev.LoadShortCircuited):
            return self._result(flight.load_id, "already_loaded")
        try:
            self._drive(flight.token)
        except JournalUnavailable:
            # Nothing more can be journaled now; any process this load started and could not
            # journal is dead already (steps.spawn). The next call reconciles the slot.
            self._unreconciled = True
            raise
        except Cancelled as stop:
            return self._abort(flight.load_id, "cancelled", stop.reason)
        except StepFailed as failure:
            return self._abort(
                flight.load_id, "failed", failure.error, failure.log_tail, failure.failure_kind
            )
        except InvalidRequest as invalid:
            return self._abort(flight.load_id, "failed", str(invalid))
        except Exception as exc:  # never leave a half-started server behind
            log.exception("load %s failed unexpectedly", flight.load_id)
            return self._abort(flight.load_id, "failed", f"{type(exc).__name__}: {exc}")
        process = self._state.process
        if process is None or process.load_id != flight.load_id:  # ended by the core: refused
            return self._result(flight.load_id, "failed", error=self._state.last_error)
        self.touch()  # a fresh server is not idle
        return self._result(flight.load_id, "loaded")

    def _retire_log(self, result: LoadResult) -> None:
        """Log retention after each load (the slot is held: no spawn races the pruning)."""
        process = self._state.process
        try:
            self.effects.retire_log(
                result.load_id,
                failed=result.status == "failed",
                live=process.load_id if process is not None else None,
            )
        except OSError as exc:  # housekeeping must never fail a load
            log.warning("log retention failed: %s", exc)

    def _abort(
        self,
        load_id: str,
        outcome: Literal["cancelled", "failed"],
        error: str,
        log_tail: str | None = None,
        failure_kind: str | None = None,
    ) -> LoadResult:
        error = scrub(error, self._secrets())  # errors reach the journal and the caller
        while self._state.pending is not None and self._state.pending.load_id == load_id:
            step = abort_step(self._state, outcome, error, self.effects.now())
            if isinstance(step, Kill):
                steps.kill(self, step.reason)
            else:
                assert isinstance(step, Emit)
                update = {
                    "log_tail": scrub_optional(log_tail, self._secrets()),
                    "failure_kind": failure_kind,
                }
                events = [
                    e.model_copy(update=update) if isinstance(e, ev.LoadFailed) else e
                    for e in step.events
                ]
                self._emit_all(events)
        return self._result(
            load_id, outcome, error=error, log_tail=log_tail, failure_kind=failure_kind
        )

    def _result(
        self,
        load_id: str,
        status: Any,
        *,
        error: str | None = None,
        log_tail: str | None = None,
        failure_kind: str | None = None,
    ) -> LoadResult:
        state = self._state
        process = state.process
        return LoadResult(
            status=status,
            load_id=load_id,
            state=state.state,
            pid=process.pid if process else None,
            port=process.port if process and process.port else None,  # None on a socket
            model_file=state.serving.model.model_file if state.serving else None,
            error=scrub_optional(error, self._secrets()),
            log_tail=scrub_optional(log_tail, self._secrets()),
            api_key=self.effects.api_key(process.load_id) if process else None,
            failure_kind=failure_kind,
            fallback_reason=(
                fallback_reason(state.serving.fallbacks) if state.serving is not None else None
            ),
        )

    def _secrets(self) -> list[str]:
        """Literal secrets no error or log tail may show: the live server's key."""
        process = self._state.process
        key = self.effects.api_key(process.load_id) if process else None
        return [key.get_secret_value()] if key is not None else []

    def _emit_all(self, events: list[ev.Event] | tuple[ev.Event, ...]) -> None:
        if events:
            self.emit(*events)

    # --- steps -------------------------------------------------------------------------------

    def _drive(self, token: CancelToken | None) -> None:
        """Run steps until the pure core says there is nothing left to do."""
        while (step := next_step(self._state, self.effects.now())) is not None:
            if token is not None and not isinstance(step, Emit):
                token.check()  # checkpoint before every effect
            self._run(step, token or CancelToken())

    def _run(self, step: Step, token: CancelToken) -> None:
        match step:
            case Resolve():
                steps.resolve(self, token)
            case Admit():
                steps.admit(self, token)
            case Kill(reason=reason):
                steps.kill(self, reason)
            case Settle():
                steps.settle(self, token)
            case Spawn():
                steps.spawn(self, token)
            case AwaitHealth():
                steps.await_health(self, token)
            case Emit(events=events):
                self._emit_all(events)

    # --- crash monitor -----------------------------------------------------------------------

    def _start_monitor(self) -> None:
        self._monitor = threading.Thread(
            target=self._watch, name=f"monitor-{self.slot}", daemon=True
        )
        self._monitor.start()

    def _watch(self) -> None:
        """Never dies: a journal error (lock, full disk, lost lease) is logged, and the check
        retried with backoff until the journal takes the write."""
        pause = MONITOR_INTERVAL_S
        while not self._stop.wait(pause):
            try:
                self._watch_once()
                pause = MONITOR_INTERVAL_S
            except Exception as exc:
                pause = min(pause * 2, MONITOR_MAX_BACKOFF_S)
                log.warning("slot %r: crash monitor: %s; retrying in %.2f s", self.slot, exc, pause)

    def _watch_once(self) -> None:
        state = self._state
        if not self._unreconciled and (state.state != "ready" or state.process is None):
            return
        if not self._serial.acquire(blocking=False):
            return  # a load or unload owns the slot and will see the exit itself
        try:
            self._reconcile()
            crashed = self.check_crashed()
        finally:
            self._serial.release()
        if crashed and self.respawn == "immediate":
            self._respawn_now()
        elif not crashed and self.idle_unload_after is not None:
            self.unload_if_idle()

    def _respawn_now(self) -> None:
        try:
            self.ensure_ready()
        except EngineError as exc:  # a crash loop, a failed respawn: journaled, status shows it
            log.warning("slot %r not respawned: %s", self.slot, exc)

    def unload_if_idle(self) -> bool:
        """Unload the server if unused for `idle_unload_after` seconds (journaled as
        `unload_requested {reason: "idle"}`); never while `in_use()` or a load holds it."""
        limit = self.idle_unload_after
        if limit is None or self._state.state != "ready" or self.idle_s() < limit:
            return False
        if not self.claim_idle():
            return False
        try:
            if self._state.state != "ready" or self.idle_s() < limit:
                return False
            self.emit(ev.UnloadRequested(at=self.effects.now(), reason="idle"))
            self._drive(token=None)
            return True
        finally:
            self.release_claim()

    def check_crashed(self) -> bool:
        """Journal `crashed` if the ready server exited on its own. Caller holds the slot."""
        state = self._state
        process = state.process
        if state.state != "ready" or process is None:
            return False
        exited = self.effects.exit_status(process)
        if exited is None:
            return False
        tail = self.effects.log_tail(process.log_path)
        failure = classify(exited.returncode, tail, phase="ready")  # we never signal a ready one
        self.emit(
            ev.Crashed(
                at=self.effects.now(),
                pid=process.pid,
                returncode=exited.returncode,
                log_tail=tail,
                failure_kind=failure.kind,
            )
        )
        self._after_crash()
        return True

    def _after_crash(self) -> None:
        """The crash-loop guard, at once: the slot goes to `failed` (crash_loop) instead of
        waiting in `crashed` for a respawn that would be refused."""
        if self.respawn == "never":
            return  # nothing respawns, so nothing loops
        events = respawn_events(self._state, self.effects.now())
        if events and isinstance(events[0], ev.LoadFailed):
            self.emit(*events)

    # --- recovery ----------------------------------------------------------------------------

    def _catch_up(self) -> None:
        """Fold in what a previous holder appended between our replay and our lease."""
        if self.journal.last_version(self.slot) != self._state.version:
            rows = self.journal.read_rows(self.slot, after_version=self._state.version)
            self._state = replay_state(rows, self._state)

    def _recover(self) -> None:
        """Reconcile the replayed state with the real process table (see engine.recovery)."""
        with self._serial:
            recover(self)


def _fields(result: LoadResult) -> dict[str, Any]:
    return {name: getattr(result, name) for name in result.__dataclass_fields__}
