"""Crash recovery: reconcile the replayed journal with the real process table on open.

* our server (pid + create_time, or its marker when the pid never reached the journal) that
  answers /health is adopted — a backend restart must not cost a model load;
* an unhealthy one is killed and the slot ends `failed` with the reason;
* a kill or unload in progress is finished; a load interrupted before its spawn fails;
* any process with our marker that the journal does not own is an orphan and is killed;
  a process without our marker (a user's own llama-server) is never touched.
"""

from __future__ import annotations

from dataclasses import replace

from engine import steps
from engine.adapters.health import await_health
from engine.core import events as ev
from engine.core.errors import EngineError
from engine.core.state import ServerProcess
from engine.effects import Cancelled, CancelToken
from engine.steps import Slot

READY_HEALTH_TIMEOUT_S = 10.0


def _owned_by_slot(marker: str, journal_id: str, slot: str) -> bool:
    # Exact match on "journal/slot/": slot "a" must not claim the servers of slot "a/b".
    owner, _, load_id = marker.rpartition("/")
    return owner == f"{journal_id}/{slot}" and bool(load_id)


def recover(engine: Slot, *, cause: str = "backend crash") -> None:
    """Reconcile; `cause` says what interrupted the slot (a backend crash on open, a refused
    journal write when the engine reconciles itself)."""
    state = engine.state
    fx = engine.effects
    now = fx.now
    marked = [
        m
        for m in fx.marked_processes(engine.journal_id)
        if _owned_by_slot(m[2], engine.journal_id, engine.slot)
    ]
    process = state.process
    if state.state in ("idle", "failed", "crashed") and process is None and not marked:
        return  # nothing to reconcile

    # A recovery that was itself interrupted resumes from the state the first one found.
    origin = (state.recovering_from or "idle") if state.state == "recovering" else state.state
    engine.emit(ev.RecoveryStarted(at=now(), previous_state=state.state))
    pending = state.pending
    dropped = (
        f"; load {pending.load_id} interrupted by {cause} (in {origin}) dropped"
        if pending is not None and origin in ("resolving", "killing")
        else ""
    )

    ours = None
    if process is not None:
        # Identity (boot id + start ticks where journaled) decides, never a wall-clock time.
        alive = bool(process.pid) and fx.exit_status(process) is None
        for pid, create_time, marker in marked:
            same_pid = alive and pid == process.pid
            if same_pid or (not process.pid and marker == process.marker):
                ours = (pid, create_time, marker)
    # Orphans first: at no instant may two of our servers run for this slot. The descendants
    # of our own process carry its marker too (a wrapper script's server): they are its tree.
    for pid, create_time, marker in marked:
        if ours is not None and marker == ours[2]:
            continue
        _kill_untracked(engine, pid, create_time, marker)

    unhealthy = False
    if process is not None and ours is None and process.pid:
        engine.emit(ev.ProcessExited(at=now(), pid=process.pid))  # gone while we were down
    if process is not None and ours is not None:
        pid, create_time, marker = ours
        identity = fx.identity(pid)
        live = replace(
            process,
            pid=pid,
            create_time=create_time,
            marker=marker,
            start_ticks=identity[1] if identity else None,
            boot_id=identity[0] if identity else None,
        )
        timeout = READY_HEALTH_TIMEOUT_S if origin == "ready" else engine.settings.health_timeout
        adoptable = origin in ("resolving", "spawning", "warming", "ready")
        if adoptable and _healthy(engine, live, timeout):
            engine.emit(
                ev.RecoveryAdopted(
                    at=now(),
                    pid=pid,
                    create_time=create_time,
                    start_ticks=live.start_ticks,
                    boot_id=live.boot_id,
                ),
                ev.RecoveryFinished(
                    at=now(), summary=f"adopted healthy llama-server pid {pid}{dropped}"
                ),
            )
            return
        unhealthy = adoptable
        if process.pid:
            steps.kill(engine, "recovery")
        else:
            _kill_untracked(engine, pid, create_time, marker)

    if origin in ("killing", "unloading", "idle", "recovering"):
        engine.emit(
            ev.RecoveryFinished(at=now(), summary=f"finished interrupted {origin}{dropped}")
        )
        return
    if origin in ("failed", "crashed") and pending is None:
        engine.emit(ev.RecoveryFinished(at=now(), summary="orphans cleaned up"))
        return
    if unhealthy:
        reason = f"llama-server did not answer /health when the backend restarted (in {origin})"
    elif origin == "ready":
        reason = "llama-server was gone when the backend restarted"
    else:
        reason = f"load interrupted by {cause} (in {origin})"
    engine.emit(
        ev.LoadFailed(at=now(), load_id=pending.load_id if pending else None, error=reason),
        ev.RecoveryFinished(at=now(), summary=reason),
    )


def _healthy(engine: Slot, live: ServerProcess, timeout: float) -> bool:
    fx = engine.effects
    try:
        exited = await_health(
            lambda: fx.health(live.port, socket_path=live.socket_path),
            lambda: fx.exit_status(live),
            CancelToken(),
            timeout,
            fx.monotonic,
        )
    except (TimeoutError, Cancelled):
        return False
    # Adopt only our own listener: a TCP port may have been taken over while we were down.
    return exited is None and (live.socket_path is not None or fx.owns_port(live.pid, live.port))


def _kill_untracked(engine: Slot, pid: int, create_time: float, marker: str) -> None:
    fx = engine.effects
    victim = ServerProcess(pid, create_time, 0, "", marker, "")
    grace = engine.settings.kill_grace
    if fx.terminate(victim, grace) is None and fx.kill(victim, grace) is None:
        raise EngineError(f"orphan llama-server pid {pid} survived SIGKILL")
    engine.emit(ev.OrphanKilled(at=fx.now(), pid=pid, create_time=create_time, marker=marker))
