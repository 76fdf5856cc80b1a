"""The slot state that `fold(evolve, events)` rebuilds: plain frozen dataclasses.

Everything the engine decides from (short-circuit, inheritance, recovery, settle) is a field
here, and every field is derived from the journal alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.core.events import BinaryIdentity, LaunchPlan, LoadSpec, ResolvedModel, ServerProps
from engine.core.failure import Change


@dataclass(frozen=True, slots=True)
class ServerProcess:
    """A llama-server we started. (pid, create_time) is its identity: pids get reused.

    On Linux the identity is (boot_id, start_ticks) when known: the start time in clock ticks
    since boot never moves, while create_time (boot time + ticks) moves with the wall clock.
    """

    pid: int
    create_time: float
    port: int
    load_id: str
    marker: str
    log_path: str
    socket_path: str | None = None  # listen="unix": the server's socket (port unused)
    start_ticks: int | None = None
    boot_id: str | None = None


@dataclass(frozen=True, slots=True)
class LoadedModel:
    """What a server serves: the spec it was asked for and where the model turned out to be."""

    spec: LoadSpec
    model: ResolvedModel
    extra_args: tuple[str, ...]
    extra_args_source: str | None
    argv: tuple[str, ...]
    plan: LaunchPlan | None = None  # None in journals written before launch planning
    binary: BinaryIdentity | None = None
    props: ServerProps | None = None  # what the server reported after health
    fallbacks: tuple[Change, ...] = ()  # retry-ladder changes this server was started with


@dataclass(frozen=True, slots=True)
class PendingLoad:
    """The load in flight, from `load_requested` until it succeeds, fails or is cancelled."""

    load_id: str
    spec: LoadSpec
    model: ResolvedModel | None = None
    admission: str | None = None  # the memory verdict: "fits", "refused" or "forced"
    settled: bool = False
    plan: LaunchPlan | None = None  # set at launch_planned
    launch: LoadedModel | None = None  # set at spawn_started: what the new server gets
    health_passed: bool = False
    error: str | None = None
    spawn_retries: int = 0  # spawns retried down the ladder (at most 3)
    fallbacks: tuple[Change, ...] = ()  # the ladder's changes so far, in order


@dataclass(frozen=True, slots=True)
class SlotState:
    state: str = "idle"  # the machine state name
    version: int = 0  # stream version of the last applied event
    process: ServerProcess | None = None  # the live (or not yet confirmed dead) server
    serving: LoadedModel | None = None  # what `process` serves, once it passed health
    pending: PendingLoad | None = None
    # Extra args of the last *successful* load and its model identity; they survive unload.
    extra_args: tuple[str, ...] = ()
    extra_args_source: str | None = None
    last_kill_at: float | None = None  # wall clock of the last confirmed kill (arms settle)
    last_error: str | None = None
    updated_at: float | None = None
    # The state a recovery started from; kept across a recovery that was itself interrupted,
    # so the next one still knows whether the server was live (adopt) or being killed.
    recovering_from: str | None = None
    last_failure_kind: str | None = None  # engine.core.failure.FailureKind of the last failure
    # What a respawn (after a crash or an idle unload) brings back: the last successful load.
    last_loaded: LoadSpec | None = None
    crash_times: tuple[float, ...] = ()  # recent crashes since the last explicit load
    crash_version: int | None = None  # stream version of the last `crashed`
    idle_unloaded: bool = False  # the last unload was the idle timer's
