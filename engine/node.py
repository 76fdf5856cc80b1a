"""A Node: several llama-servers on one host, one `Engine` per slot name, one journal.

Each slot keeps every per-slot guarantee of its Engine (one server, latest load wins, joins).
The node adds admission across slots: a slot's admission step asks the node (the
`AdmissionGate` of engine.steps), which weighs the load against the node's other servers
(measured memory where it exists, planned need otherwise; `max_servers`) and evicts idle
servers least recently used first when that makes it fit (engine.core.eviction decides).
Only that decision is serialized across slots; resolving, killing, spawning and warming run
in parallel on different slots. Its facts go to the journal stream `@node`: admissions,
evictions with their cause, measured memory and pins, so `Node.open(restore=True)` can bring
back what ran and `studio-engine postmortem --slot @node` can say why a server was evicted.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

from engine.adapters.binary import ServerBinary, locate_server
from engine.adapters.feed import Feed, FeedEvent
from engine.adapters.journal import Journal
from engine.adapters.lease import LEASE_TTL_S, Lease
from engine.core import events as ev
from engine.core import eviction
from engine.core import node_events as nev
from engine.core.admission import Verdict
from engine.core.errors import CorruptJournal, EngineError
from engine.core.request import LoadRequest, LoadResult, Status
from engine.core.rules import InvalidRequest
from engine.core.state import SlotState
from engine.effects import CancelToken, Effects
from engine.orchestrator import Engine, default_run_dir

log = logging.getLogger("studio-engine")

WAIT_POLL_S: Final = 0.02  # how often a load waiting for capacity looks again
TTL_CHECK_S: Final = 0.5
CLAIM_RETRY_S: Final = 0.001
# Ready servers are measured again this often; a figure that moved by more than
# max(64 MiB, 10 %) is journaled (RSS grows as mmapped weights page in and the KV cache fills).
RESAMPLE_S: Final = 30.0
RESAMPLE_MIN_CHANGE: Final = 64 << 20
USAGE_RECORD_S: Final = 10.0  # last-use times are journaled this often (when they changed)


@dataclass(frozen=True, slots=True)
class _Held:
    """What a slot's server holds, as admission counts it."""

    bytes: int
    measured: bool  # False from admission until the ready server is measured
    pid: int | None = None


@dataclass(frozen=True, slots=True)
class SlotInfo:
    status: Status
    pinned: bool
    users: int  # holders of in_use() now
    idle_s: float
    ttl_s: float | None
    held_bytes: int  # measured, else planned; 0 without a server
    measured: bool


@dataclass(frozen=True, slots=True)
class NodeStatus:
    slots: dict[str, SlotInfo]
    servers: int  # slots holding a server (or admitted to start one)
    used_bytes: int
    memory_limit: int | None
    max_servers: int | None


class Node:
    """Several slots on one host. Open with `Node.open`; see the README's Node section."""

    def __init__(
        self,
        journal: Journal,
        lease: Lease,
        host: Effects,
        *,
        memory_limit: int | None,
        max_servers: int | None,
        wait_for_capacity: float | None,
        ttl: float | None,
        binary: ServerBinary | None,
        run_dir: Path | None,
        engine_options: dict[str, Any],
    ) -> None:
        _check_options(memory_limit, max_servers, wait_for_capacity, ttl)
        self.journal = journal
        self.memory_limit = memory_limit
        self.max_servers = max_servers
        self.wait_for_capacity = wait_for_capacity
        self.default_ttl = ttl
        self._lease = lease
        self._host = host  # memory budget and measurement; the slots have their own effects
        self._binary = binary
        self._run_dir = run_dir
        self._engine_options = engine_options
        self._state = _replay(journal)
        self._engines: dict[str, Engine] = {}
        self._held: dict[str, _Held] = {}
        self._ttls: dict[str, float | None] = {}
        self._lock = threading.Lock()  # guards _engines/_held/_ttls; never held during I/O
        self._append_lock = threading.Lock()  # appends to @node, one at a time
        self._open_lock = threading.Lock()  # slots open one at a time (lease, replay, recovery)
        # The one cross-slot critical section: decide and evict. Loads never hold it while
        # they resolve, spawn or warm, so loads on different slots overlap.
        self._admission = threading.Lock()
        self._stop = threading.Event()
        self._reaper: threading.Thread | None = None

    # --- opening and closing -----------------------------------------------------------------

    @classmethod
    def open(
        cls,
        journal_url: str | os.PathLike[str] = "studio-engine.db",
        *,
        memory_limit: int | None = None,
        max_servers: int | None = None,
        wait_for_capacity: float | None = None,
        ttl: float | None = None,
        restore: bool = False,
        llama_server: str | os.PathLike[str] | None = None,
        effects: Effects | None = None,
        run_dir: str | os.PathLike[str] | None = None,
        synchronous: str = "FULL",
        lease_ttl: float = LEASE_TTL_S,
        **engine_options: Any,
    ) -> Node:
        """Open the journal, lease `@node`, recover every slot the node knows (adopting live
        servers); `restore=True` reloads those whose server died while the node was down.

        `memory_limit` (bytes) caps what the node's servers hold together, `max_servers` how
        many run; `wait_for_capacity` (seconds) lets a load wait for servers in use to become
        idle instead of failing at once; `ttl` (seconds) is the default idle TTL of a slot.
        `engine_options` go to every slot's `Engine` (health_timeout, threads, ...).
        """
        _check_options(memory_limit, max_servers, wait_for_capacity, ttl)  # before opening
        binary = locate_server(llama_server) if effects is None else None
        # One Journal (one SQLAlchemy engine, one writer connection) for the node and all its
        # slots: appends from every slot then serialize on its write lock instead of
        # contending for SQLite's database lock across connections, and a node costs one pool.
        journal = Journal.open(journal_url, synchronous=synchronous)
        node: Node | None = None
        try:
            lease = Lease.acquire(journal, nev.NODE_STREAM, lease_ttl)
            directory = Path(run_dir) if run_dir is not None else default_run_dir(journal)
            host: Effects | None = effects
            try:
                if host is None:
                    from engine.adapters.runtime import RealEffects

                    assert binary is not None
                    host = RealEffects(binary, directory, journal)
                node = cls(
                    journal,
                    lease,
                    host,
                    memory_limit=memory_limit,
                    max_servers=max_servers,
                    wait_for_capacity=wait_for_capacity,
                    ttl=ttl,
                    binary=binary,
                    run_dir=directory,
                    engine_options={**engine_options, "effects": effects, "lease_ttl": lease_ttl},
                )
                for name in sorted(node._state.slots):
                    node._engine(name, create=True)
            except BaseException:
                if node is not None:
                    node._close_engines(keep_servers=True)
                _close_effects(host, effects)
                lease.release()
                raise
        except BaseException:
            journal.close()
            raise
        lease.start()
        node._reaper = threading.Thread(target=node._reap, name="monitor-node", daemon=True)
        node._reaper.start()
        if restore:
            try:
                node._restore()
            except BaseException:
                node.close(keep_servers=True)
                raise
        return node

    def close(self, *, keep_servers: bool = False) -> None:
        """Stop every slot (journaled as manual evictions: a restore does not bring them back);
        `keep_servers=True` leaves healthy servers for the next open to adopt."""
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join()
        try:
            try:
                self._record_usage()  # for the LRU order and the restore order of the next open
            except Exception:
                log.warning("node: could not journal last-use times at close", exc_info=True)
            if not keep_servers:
                for name in self.names():
                    self._evict_manually(name)
            self._close_engines(keep_servers)
        finally:
            _close_effects(self._host, self._engine_options.get("effects"))
            self._lease.release()
            self.journal.close()

    def __enter__(self) -> Node:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_engines(self, keep_servers: bool) -> None:
        with self._lock:
            engines = list(self._engines.values())
        errors: list[BaseException] = []
        for engine in engines:
            try:
                engine.close(keep_server=keep_servers)
            except Exception as exc:  # close the others anyway; the first error surfaces
                errors.append(exc)
        if errors:
            raise errors[0]

    # --- public API --------------------------------------------------------------------------

    def load(
        self, name: str, request: LoadRequest | dict[str, Any], *, ttl: float | None = None
    ) -> LoadResult:
        """Load `request` on slot `name` (created on first use). `ttl`: this slot's idle TTL
        in seconds (default: the node's). Admission may evict idle servers of other slots."""
        _check_ttl(ttl)
        engine = self._engine(name, create=False) or self._open_slot(name)
        if ttl is not None:
            with self._lock:
                self._ttls[name] = ttl
        result = engine.load(request)
        if result.ok:
            engine.touch()
        return result

    def unload(self, name: str) -> Status:
        """Stop slot `name`'s server (journaled as a manual eviction)."""
        self.slot(name)
        self._evict_manually(name)
        return self.slot(name).status()

    def slot(self, name: str) -> Engine:
        """The `Engine` of slot `name` (KeyError naming it if the node has no such slot)."""
        engine = self._engine(name, create=False)
        if engine is None:
            raise KeyError(
                f"node has no slot {name!r} (slots: {', '.join(self.names()) or 'none'})"
            )
        return engine

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._engines)

    def touch(self, name: str) -> None:
        self.slot(name).touch()

    def in_use(self, name: str) -> AbstractContextManager[Engine]:
        """`with node.in_use("chat"): ...` holds the slot's server: never evicted meanwhile."""
        return self.slot(name).in_use()

    def pin(self, name: str) -> None:
        """Never evict slot `name`'s server (journaled; survives restarts)."""
        self._set_pinned(name, True)

    def unpin(self, name: str) -> None:
        self._set_pinned(name, False)

    def status(self) -> NodeStatus:
        with self._lock:
            engines = dict(self._engines)
            held = dict(self._held)
            ttls = dict(self._ttls)
        state = self._state
        slots = {}
        for name, engine in sorted(engines.items()):
            mine = held.get(name)
            slots[name] = SlotInfo(
                status=engine.status(),
                pinned=state.slot(name).pinned,
                users=engine.users,
                idle_s=round(engine.idle_s(), 3),
                ttl_s=ttls.get(name, self.default_ttl),
                held_bytes=mine.bytes if mine else 0,
                measured=bool(mine and mine.measured),
            )
        return NodeStatus(
            slots=slots,
            servers=len(held),
            used_bytes=sum(h.bytes for h in held.values()),
            memory_limit=self.memory_limit,
            max_servers=self.max_servers,
        )

    @property
    def state(self) -> eviction.NodeState:
        return self._state

    async def aload(
        self, name: str, request: LoadRequest | dict[str, Any], *, ttl: float | None = None
    ) -> LoadResult:
        return await asyncio.to_thread(self.load, name, request, ttl=ttl)

    async def aunload(self, name: str) -> Status:
        return await asyncio.to_thread(self.unload, name)

    def events(self, since: int = 0, *, follow: bool = True) -> Iterator[FeedEvent]:
        """Every slot's events and the node's own (`@node`) after `since` (a journal seq), as
        any process journals them; with `follow` it blocks until the node closes."""
        feed = Feed(self.journal, since=since)
        yield from feed.follow(self._stop) if follow else feed.poll()

    async def aevents(self, since: int = 0) -> AsyncIterator[FeedEvent]:
        async for item in Feed(self.journal, since=since).afollow(stop=self._stop):
            yield item

    # --- slots -------------------------------------------------------------------------------

    def _engine(self, name: str, *, create: bool) -> Engine | None:
        with self._lock:
            engine = self._engines.get(name)
        if engine is not None or not create:
            return engine
        return self._open_slot(name)

    def _open_slot(self, name: str) -> Engine:
        _check_slot_name(name)
        with self._open_lock:
            with self._lock:
                engine = self._engines.get(name)
            if engine is not None:
                return engine
            options = dict(self._engine_options)
            if options.get("effects") is None:  # each slot its own processes, health client
                from engine.adapters.runtime import RealEffects

                assert self._binary is not None and self._run_dir is not None
                # Per slot: its own log and key folders (retention keeps one slot's live key,
                # never deletes another's), and the security options Engine.open would apply.
                options["effects"] = RealEffects(
                    self._binary,
                    self._run_dir,
                    self.journal,
                    child_env=options.get("child_env"),
                    server_api_key=options.get("server_api_key", "generate") is not None,
                    listen=options.get("listen", "tcp"),
                    slot=name,
                )
            engine = Engine.open(self.journal, slot=name, run_dir=self._run_dir, **options)
            try:
                engine.gate = self
                used_at = self._state.slot(name).last_used_at
                if used_at is not None:  # LRU order survives a restart
                    engine.last_used = time.monotonic() - max(time.time() - used_at, 0.0)
                engine.observe(lambda event, state: self._observed(name, event, state))
                with self._lock:
                    self._engines[name] = engine
                    self._ttls.setdefault(name, self._state.slot(name).ttl_s or self.default_ttl)
                if engine.state.state == "ready":  # adopted at open: measure it again
                    self._measure(name, engine.state)
            except BaseException:
                engine.close(keep_server=True)
                raise
            return engine

    def _set_pinned(self, name: str, pinned: bool) -> None:
        self.slot(name)
        if self._state.slot(name).pinned != pinned:
            with self._admission:  # never flips while a decision is being made
                self._append(nev.SlotPinned(at=time.time(), slot=name, pinned=pinned))

    def _evict_manually(self, name: str) -> None:
        engine = self.slot(name)
        if engine.state.process is not None or self._state.slot(name).resident:
            held = self._held.get(name)
            process = engine.state.process
            self._append(
                nev.Evicted(
                    at=time.time(),
                    slot=name,
                    cause="manual",
                    idle_s=round(engine.idle_s(), 3),
                    freed_bytes=held.bytes if held else 0,
                    pid=process.pid if process else None,
                )
            )
        engine.unload()

    def _observed(self, name: str, event: ev.Event, state: SlotState) -> None:
        """Every event of every slot: measure a server once ready, forget one that is gone."""
        if isinstance(event, ev.LoadSucceeded):
            try:
                self._measure(name, state)
            except Exception:  # the server is up and serving: a lost figure must not fail it
                log.warning("node: measuring slot %r failed", name, exc_info=True)
        elif state.process is None and state.pending is None:
            with self._lock:
                self._held.pop(name, None)
        elif isinstance(event, ev.LoadAbandoned) and state.process is not None:
            # The old server keeps serving: it holds what it was measured to hold, not the
            # reservation the abandoned load was admitted with.
            known = self._state.slot(name)
            if known.pid == state.process.pid and known.measured_bytes is not None:
                with self._lock:
                    self._held[name] = _Held(known.measured_bytes, True, known.pid)

    def _measure(self, name: str, state: SlotState) -> None:
        process, serving = state.process, state.serving
        if process is None or serving is None:
            return
        use = self._host.measure(process)
        extra_args = serving.extra_args
        with self._lock:
            engine = self._engines.get(name)
            current = engine.state.process if engine is not None else process
            if current is None or current.pid != process.pid:
                return  # replaced or stopped meanwhile (a resample racing a load)
            self._held[name] = _Held(use.total, True, process.pid)
            ttl = self._ttls.get(name, self.default_ttl)
        self._append(
            nev.ServerMeasured(
                at=time.time(),
                load_id=process.load_id,
                slot=name,
                pid=process.pid,
                spec=serving.spec,
                need_key=eviction.need_key(serving.model, serving.spec, extra_args),
                planned_bytes=eviction.planned_need(serving.model, serving.spec, extra_args),
                rss_bytes=use.rss_bytes,
                vram_bytes=use.vram_bytes,
                vram_by_gpu=use.vram_by_gpu,
                ttl_s=ttl,
            )
        )

    def _append(self, *events: nev.NodeEvent) -> None:
        """Fold, journal, publish: the @node stream's only writer."""
        with self._append_lock:
            if self._lease.lost:
                raise EngineError("another node took over this journal's @node lease; stopped")
            before = after = self._state
            for event in events:
                after = eviction.evolve_node(after, event)
            self.journal.append(nev.NODE_STREAM, before.version, events)
            self._state = after

    # --- admission (the AdmissionGate every slot's admission step calls) ---------------------

    def admit(
        self,
        slot: str,
        load_id: str,
        model: ev.ResolvedModel,
        spec: ev.LoadSpec,
        extra_args: tuple[str, ...],
        releasable_bytes: int,
        token: CancelToken,
    ) -> tuple[Verdict, str | None]:
        return self._admit(slot, load_id, model, spec, extra_args, releasable_bytes, token)

    def _admit(
        self,
        slot: str,
        load_id: str,
        model: ev.ResolvedModel,
        spec: ev.LoadSpec,
        extra_args: tuple[str, ...],
        releasable_bytes: int,
        token: CancelToken,
        *,
        evict: bool = True,
    ) -> tuple[Verdict, str | None]:
        known = self._state.measured.get(eviction.need_key(model, spec, extra_args))
        need = known if known is not None else eviction.planned_need(model, spec, extra_args)
        start = time.monotonic()
        deadline = start + (self.wait_for_capacity or 0.0)
        while True:
            with self._admission:
                budget = self._host.memory_budget(None)
                capacity = eviction.Capacity(
                    free_bytes=budget.free_vram_bytes
                    + budget.available_ram_bytes
                    + releasable_bytes,
                    limit_bytes=self.memory_limit,
                    max_servers=self.max_servers,
                )
                residents = self._residents()
                if not evict:  # every other server stays: counted, never a candidate
                    residents = [replace(r, kept=True) for r in residents]
                decision = eviction.decide(slot, need, residents, capacity, force=spec.force)
                waiting = (
                    evict
                    and decision.verdict == "refused"
                    and bool(decision.blocked_by)
                    and time.monotonic() < deadline
                )
                if not waiting:
                    victims = self._claim(decision.evict)
                    if victims is None:  # a victim got busy since the decision: decide again
                        time.sleep(CLAIM_RETRY_S)
                        continue
                    for engine, evicted in victims:
                        self._evict_claimed(engine, evicted, slot, load_id)
                    if decision.verdict != "refused":
                        with self._lock:
                            self._held[slot] = _Held(need, False)
                    self._append(
                        nev.NodeAdmission(
                            at=time.time(),
                            load_id=load_id,
                            slot=slot,
                            need_bytes=need,
                            need_source="measured" if known is not None else "planned",
                            free_bytes=capacity.free_bytes,
                            used_bytes=decision.used_bytes,
                            limit_bytes=self.memory_limit,
                            servers=decision.servers,
                            max_servers=self.max_servers,
                            verdict=decision.verdict,
                            evicted=tuple(e.slot for e in decision.evict),
                            waited_s=round(time.monotonic() - start, 6),
                            error=decision.error,
                        )
                    )
                    return decision.verdict, decision.error
            token.sleep(WAIT_POLL_S)  # servers in use may become idle; a cancel ends the wait

    def _residents(self) -> list[eviction.Resident]:
        with self._lock:
            engines = dict(self._engines)
            held = dict(self._held)
        residents = []
        for name, engine in engines.items():
            mine = held.get(name)
            if mine is None and engine.state.process is None:
                continue
            residents.append(
                eviction.Resident(
                    slot=name,
                    bytes=mine.bytes if mine else self._state.slot(name).measured_bytes or 0,
                    measured=bool(mine and mine.measured) or mine is None,
                    last_used=engine.last_used,
                    pinned=self._state.slot(name).pinned,
                    in_use=engine.users > 0,
                    busy=engine.busy,
                )
            )
        return residents

    def _claim(
        self, evictions: tuple[eviction.Eviction, ...]
    ) -> list[tuple[Engine, eviction.Eviction]] | None:
        """Claim every victim, or none (then None): never evict one and find the next busy."""
        claimed: list[tuple[Engine, eviction.Eviction]] = []
        for evicted in evictions:
            engine = self.slot(evicted.slot)
            if not engine.claim_idle():
                for done, _ in claimed:
                    done.release_claim()
                return None
            claimed.append((engine, evicted))
        return claimed

    def _evict_claimed(
        self,
        engine: Engine,
        evicted: eviction.Eviction,
        for_slot: str | None,
        for_load_id: str | None,
    ) -> None:
        process = engine.state.process
        try:
            self._append(
                nev.Evicted(
                    at=time.time(),
                    slot=evicted.slot,
                    cause=evicted.cause,
                    idle_s=round(engine.idle_s(), 3),
                    freed_bytes=evicted.freed_bytes,
                    pid=process.pid if process else None,
                    for_slot=for_slot,
                    for_load_id=for_load_id,
                )
            )
        except BaseException:
            engine.release_claim()
            raise
        engine.stop_claimed()

    # --- TTL ---------------------------------------------------------------------------------

    def _reap(self) -> None:
        sampled = recorded = time.monotonic()
        while not self._stop.wait(TTL_CHECK_S):
            try:
                self._expire_idle()
                if time.monotonic() - sampled >= RESAMPLE_S:
                    sampled = time.monotonic()
                    self._resample()
                if time.monotonic() - recorded >= USAGE_RECORD_S:
                    recorded = time.monotonic()
                    self._record_usage()
            except Exception:  # a journal hiccup: the next round tries again
                log.warning("node: TTL check or sampling failed", exc_info=True)

    def _record_usage(self) -> None:
        """Journal the slots whose last use moved since it was last journaled."""
        with self._lock:
            engines = dict(self._engines)
        now_wall, now = time.time(), time.monotonic()
        changed = []
        for name, engine in sorted(engines.items()):
            at = round(now_wall - (now - engine.last_used), 3)
            if abs(at - (self._state.slot(name).last_used_at or 0.0)) > 0.01:
                changed.append((name, at))
        if changed:
            self._append(nev.SlotsUsed(at=now_wall, used=tuple(changed)))

    def _resample(self) -> None:
        with self._lock:
            engines = dict(self._engines)
            held = dict(self._held)
        for name, engine in engines.items():
            state, mine = engine.state, held.get(name)
            if state.state != "ready" or state.process is None or mine is None:
                continue
            if not mine.measured or mine.pid != state.process.pid:
                continue
            now = self._host.measure(state.process).total
            if abs(now - mine.bytes) > max(RESAMPLE_MIN_CHANGE, mine.bytes // 10):
                self._measure(name, state)

    def _expire_idle(self) -> None:
        with self._lock:
            candidates = [
                (name, engine, self._ttls.get(name, self.default_ttl))
                for name, engine in self._engines.items()
            ]
        for name, engine, ttl in candidates:
            if ttl is None or engine.state.process is None or self._state.slot(name).pinned:
                continue
            if engine.idle_s() < ttl:
                continue
            with self._admission:
                held = self._held.get(name)
                if engine.idle_s() < ttl or not engine.claim_idle():
                    continue
                bytes_ = held.bytes if held else 0
                self._evict_claimed(engine, eviction.Eviction(name, "ttl", bytes_), None, None)

    # --- restore -----------------------------------------------------------------------------

    def _restore(self) -> None:
        """Reload, most recently ready first, the slots whose server died while the node was
        down. A restore never evicts: what does not fit any more stays down (logged)."""
        for name in self._state.restorable():
            engine = self.slot(name)
            spec = self._state.slot(name).spec
            if engine.state.state == "ready" or spec is None:
                continue
            engine.gate = _RestoreGate(self)
            try:
                result = self.load(name, _request_of(spec))
            finally:
                engine.gate = self
            used_at = self._state.slot(name).last_used_at or self._state.slot(name).ready_at
            if used_at is not None:  # a restore is not a use: LRU order stays the journaled one
                engine.last_used = time.monotonic() - max(time.time() - used_at, 0.0)
            if not result.ok:
                log.warning("node: restore of slot %r failed: %s", name, result.error)


class _RestoreGate:
    """Admission for a restore: the node's decision without evicting anything (a restored
    server must not push out one restored just before)."""

    def __init__(self, node: Node) -> None:
        self._node = node

    def admit(
        self,
        slot: str,
        load_id: str,
        model: ev.ResolvedModel,
        spec: ev.LoadSpec,
        extra_args: tuple[str, ...],
        releasable_bytes: int,
        token: CancelToken,
    ) -> tuple[Verdict, str | None]:
        return self._node._admit(
            slot, load_id, model, spec, extra_args, releasable_bytes, token, evict=False
        )


def _request_of(spec: ev.LoadSpec) -> LoadRequest:
    return LoadRequest(
        model_path=spec.model,
        gguf_variant=spec.variant,
        max_seq_length=spec.max_seq_length,
        cache_type_kv=spec.cache_type_kv,
        speculative_type=spec.speculative_type,
        chat_template_override=spec.chat_template_override,
        llama_extra_args=list(spec.extra_args) if spec.extra_args is not None else None,
    )


def _check_slot_name(name: str) -> None:
    if not isinstance(name, str) or not name.strip() or len(name) > 200:
        raise InvalidRequest(
            f"slot name: must be a non-empty string of at most 200 characters, not {name!r}"
        )
    if name.startswith("@"):
        raise InvalidRequest(
            f"slot name: {name!r} starts with '@', reserved for the engine's own streams"
        )
    if any(ord(c) < 32 for c in name):
        raise InvalidRequest(f"slot name: {name!r} contains a control character")


def _check_options(
    memory_limit: int | None,
    max_servers: int | None,
    wait_for_capacity: float | None,
    ttl: float | None,
) -> None:
    if memory_limit is not None and memory_limit <= 0:
        raise ValueError(f"memory_limit must be positive bytes, not {memory_limit!r}")
    if max_servers is not None and max_servers < 1:
        raise ValueError(f"max_servers must be >= 1, not {max_servers!r}")
    if wait_for_capacity is not None and wait_for_capacity < 0:
        raise ValueError(f"wait_for_capacity must be >= 0 seconds, not {wait_for_capacity!r}")
    _check_ttl(ttl)


def _check_ttl(ttl: float | None) -> None:
    if ttl is not None and not ttl > 0:
        raise ValueError(f"ttl must be a positive number of seconds (or None), not {ttl!r}")


def _close_effects(host: Effects | None, shared: Effects | None) -> None:
    if host is not None and host is not shared:
        close = getattr(host, "close", None)
        if close is not None:
            close()


def _replay(journal: Journal) -> eviction.NodeState:
    state = eviction.NodeState()
    for seq, version, _, _type, payload in journal.read_rows(nev.NODE_STREAM):
        if version != state.version + 1:
            raise CorruptJournal(seq, f"version {version} follows {state.version}: events missing")
        try:
            event = nev.parse_node_event(payload)
        except ValueError as exc:
            raise CorruptJournal(seq, f"unreadable @node event: {exc}") from exc
        state = eviction.evolve_node(state, event)
    return state
