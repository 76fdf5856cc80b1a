"""What to do next, as pure functions of the replayed state.

* `decide(command, state) -> events`: the events a user command starts with (or none).
* `next_step(state) -> Step | None`: the next effect the orchestrator must run; the effect's
  outcome comes back as events, and the loop repeats until no step is left.
* `abort_step(state, outcome, error)`: how a cancelled or failed load unwinds.

Guards live here, never in the machine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final, Literal

from engine.core import events as ev
from engine.core.evolve import CRASH_WINDOW_S
from engine.core.rules import reload_reason
from engine.core.state import SlotState


@dataclass(frozen=True, slots=True)
class Load:
    load_id: str
    spec: ev.LoadSpec
    at: float
    binary: ev.BinaryIdentity | None = None  # the llama-server a spawn would run now
    respawn: bool = False  # brings back the last successful load (crash or idle unload)


@dataclass(frozen=True, slots=True)
class Unload:
    at: float


@dataclass(frozen=True, slots=True)
class Cancel:
    at: float


Command = Load | Unload | Cancel


def duplicate_of_serving(
    spec: ev.LoadSpec, state: SlotState, binary: ev.BinaryIdentity | None = None
) -> bool:
    """A healthy server already serves exactly this target (contract rule 3)."""
    return (
        state.state == "ready"
        and state.process is not None
        and (why_reload(spec, state, binary) is None)
    )


def why_reload(
    spec: ev.LoadSpec, state: SlotState, binary: ev.BinaryIdentity | None = None
) -> str | None:
    """Why `spec` differs from what serves (None: the same target, or nothing serves)."""
    served = state.serving
    if served is None:
        return None
    reason = reload_reason(
        spec,
        served.spec,
        served.model.source,
        served.model.variant,
        served.model.is_vision,
        served.extra_args,
    )
    changed = served.binary is not None and binary is not None and served.binary != binary
    if reason is None and changed:  # rebuilt or replaced llama-server: same args, new code
        return "binary_changed"
    return reason


def decide(command: Command, state: SlotState) -> list[ev.Event]:
    match command:
        case Load(load_id=load_id, spec=spec, at=at, binary=binary, respawn=respawn):
            if duplicate_of_serving(spec, state, binary):
                return [ev.LoadShortCircuited(at=at, load_id=load_id, spec=spec)]
            reason = why_reload(spec, state, binary) if state.state == "ready" else None
            if respawn and state.state != "ready":
                reason = "respawn"  # keeps the crash history: the crash-loop guard counts on
            return [ev.LoadRequested(at=at, load_id=load_id, spec=spec, reason=reason)]
        case Unload(at=at):
            if state.state in ("ready", "failed", "crashed"):
                return [ev.UnloadRequested(at=at)]
            return []
        case Cancel():
            # Cancellation is a signal to the running load, which journals its own outcome.
            return []


CRASH_LOOP_CRASHES: Final = 3  # crashes within CRASH_WINDOW_S that end respawning


def respawn_events(state: SlotState, at: float) -> list[ev.Event]:
    """What bringing the last successful load back starts with: `respawn_requested` after a
    crash or an idle unload, `load_failed(crash_loop)` after too many crashes, or nothing
    (nothing to bring back: the slot serves, or was unloaded or failed on purpose)."""
    if state.last_loaded is None:
        return []
    if state.state == "crashed":
        recent = [t for t in state.crash_times if at - t < CRASH_WINDOW_S]
        if len(recent) >= CRASH_LOOP_CRASHES:
            error = (
                f"crash loop: llama-server crashed {len(recent)} times within "
                f"{CRASH_WINDOW_S / 60:g} minutes (last: {state.last_failure_kind}); "
                "no respawn until a load"
            )
            return [ev.LoadFailed(at=at, error=error, failure_kind="crash_loop")]
        return [ev.RespawnRequested(at=at, after_crash_seq=state.crash_version, reason="crash")]
    if state.state == "idle" and state.idle_unloaded:
        return [ev.RespawnRequested(at=at, reason="idle")]
    return []


# --- steps ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resolve:
    """Find the model file (local or hub) and read its header."""


@dataclass(frozen=True, slots=True)
class Admit:
    """Estimate the load's memory need against what the host has; refuse what cannot fit."""


@dataclass(frozen=True, slots=True)
class Kill:
    reason: ev.KillReason


@dataclass(frozen=True, slots=True)
class Settle:
    """Wait for GPU memory freed by the last kill to settle before sizing the next load."""


@dataclass(frozen=True, slots=True)
class Spawn:
    """Plan the launch (context, GPUs, offload, slots) and start llama-server for it."""


@dataclass(frozen=True, slots=True)
class AwaitHealth:
    """Poll /health until 200 (then read /props), the process exits, the deadline passes or
    the load is cancelled."""


@dataclass(frozen=True, slots=True)
class Emit:
    """No effect needed: append these events."""

    events: tuple[ev.Event, ...]


Step = Resolve | Admit | Kill | Settle | Spawn | AwaitHealth | Emit


def next_step(state: SlotState, at: float) -> Step | None:
    pending = state.pending
    match state.state:
        case "resolving":
            assert pending is not None
            if pending.model is None:
                return Resolve()
            if pending.admission is None:
                return Admit()
            if pending.admission == "refused":
                return abort_step(state, "refused", pending.error or "refused", at)
            return Kill("replace") if state.process is not None else Settle()
        case "killing":
            return Kill("replace") if state.process is not None else Settle()
        case "settling":
            assert pending is not None
            return Spawn() if pending.settled else Settle()
        case "warming":
            assert pending is not None
            if pending.health_passed:
                return Emit((ev.LoadSucceeded(at=at, load_id=pending.load_id),))
            return AwaitHealth()
        case "unloading":
            return Kill("unload") if state.process is not None else Emit((ev.Unloaded(at=at),))
        case _:
            return None


def abort_step(
    state: SlotState, outcome: Literal["cancelled", "failed", "refused"], error: str, at: float
) -> Step:
    """Unwind a load: kill what it started, then journal how it ended.

    A load stopped before it touched the running server is *abandoned*: that server keeps
    serving and the slot returns to `ready`.
    """
    pending = state.pending
    assert pending is not None
    load_id = pending.load_id
    process = state.process
    if process is not None and process.load_id == load_id and process.pid:
        return Kill("cancel" if outcome == "cancelled" else "failure")
    if state.state == "resolving" and process is not None:
        return Emit((ev.LoadAbandoned(at=at, load_id=load_id, outcome=outcome, error=error),))
    if outcome == "cancelled":
        return Emit((ev.LoadCancelled(at=at, load_id=load_id, reason=error),))
    # A refused load with no server to keep serving ends failed, like any failed load.
    return Emit((ev.LoadFailed(at=at, load_id=load_id, error=error),))
