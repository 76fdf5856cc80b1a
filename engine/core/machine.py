"""The lifecycle machine: one `transitions` Machine, the single source of truth for diagrams.

Every event type is a trigger, and no transition has a condition: guards live in `decide`,
so replaying a journal through the machine cannot take a different path than the live run.

`TRANSITION_TABLE` is compiled once from the Machine object. `evolve` looks destinations up
there instead of firing a trigger per event: a `transitions` trigger costs ~8 µs, which alone
would cap replay below the 100k events/s target. A unit test proves the table and the
Machine agree on every (state, trigger) pair.
"""

from __future__ import annotations

from typing import Any, Final

from transitions import Machine

from engine.core.events import EVENT_TYPES

STATES: Final = (
    "idle",
    "resolving",
    "killing",
    "settling",
    "spawning",
    "warming",
    "ready",
    "unloading",
    "failed",
    "crashed",
    "recovering",
)
STABLE: Final = ("idle", "ready", "failed", "crashed")
IN_FLIGHT: Final = ("resolving", "killing", "settling", "spawning", "warming")
SAME: Final = "="  # `transitions` notation for "stay in the source state"

# (trigger, sources, destination) — read top to bottom, this is the whole lifecycle.
TRANSITIONS: Final[tuple[tuple[str, tuple[str, ...], str], ...]] = (
    # A load resolves its model before touching the running server.
    ("load_requested", STABLE, "resolving"),
    ("load_short_circuited", ("ready",), SAME),
    ("load_joined", (*STABLE, *IN_FLIGHT, "unloading", "recovering"), SAME),
    ("load_superseded", (*STABLE, *IN_FLIGHT, "unloading", "recovering"), SAME),
    ("download_started", ("resolving",), SAME),
    ("file_downloaded", ("resolving",), SAME),
    ("model_resolved", ("resolving",), SAME),
    ("admission_checked", ("resolving",), SAME),
    ("load_abandoned", ("resolving",), "ready"),
    # The previous server is killed, and only then does GPU memory get to settle.
    ("kill_started", ("resolving", "warming"), "killing"),
    ("kill_started", ("unloading", "recovering"), SAME),
    ("kill_escalated", ("killing", "unloading", "recovering"), SAME),
    ("process_exited", ("killing", "unloading", "recovering", "warming"), SAME),
    ("settle_started", ("resolving", "killing"), "settling"),
    ("vram_sampled", ("settling",), SAME),
    ("settled", ("settling",), SAME),
    ("launch_planned", ("settling",), SAME),
    # Spawn (intent first, then the pid), warm up, commit.
    ("spawn_started", ("settling",), "spawning"),
    ("spawned", ("spawning",), "warming"),
    # Our server could not own its port: it is dead (killed if need be), spawn again.
    ("spawn_retried", ("warming", "killing"), "settling"),
    ("health_passed", ("warming",), SAME),
    ("health_failed", ("warming",), SAME),
    ("server_props_read", ("warming",), SAME),
    ("load_succeeded", ("warming",), "ready"),
    ("load_cancelled", IN_FLIGHT, "idle"),
    ("load_failed", (*IN_FLIGHT, "recovering"), "failed"),
    # A crash loop ends in `failed` (failure_kind=crash_loop): no respawn until a load.
    ("load_failed", ("crashed",), "failed"),
    # Unload and crash.
    ("unload_requested", ("ready", "failed", "crashed"), "unloading"),
    ("unloaded", ("unloading",), "idle"),
    ("crashed", ("ready",), "crashed"),
    # The last successful load comes back (a load_requested follows).
    ("respawn_requested", ("crashed", "idle"), SAME),
    # Recovery after a backend restart: replay, then reconcile with the process table.
    ("recovery_started", STATES, "recovering"),
    ("orphan_killed", ("recovering",), SAME),
    ("recovery_adopted", ("recovering",), "ready"),
    ("recovery_finished", ("recovering",), "idle"),
    ("recovery_finished", ("ready", "failed"), SAME),
)


class _Slot:
    """Bare model object for the Machine (the machine only tracks the state name)."""

    state: str


def build_machine(model: Any = None, initial: str = "idle") -> Machine:
    """The Machine for `model` (a fresh bare model if None). Used for diagrams and tests."""
    return Machine(
        model=model if model is not None else _Slot(),
        states=list(STATES),
        transitions=[
            {"trigger": trigger, "source": list(sources), "dest": dest}
            for trigger, sources, dest in TRANSITIONS
        ],
        initial=initial,
        auto_transitions=False,
        ignore_invalid_triggers=False,
    )


def compile_table(machine: Machine) -> dict[tuple[str, str], str]:
    """{(state, trigger): destination} read back from the Machine object itself."""
    table: dict[tuple[str, str], str] = {}
    for trigger, event in machine.events.items():
        for source, transitions in event.transitions.items():
            (transition,) = transitions  # no conditions => exactly one transition per source
            table[(source, trigger)] = transition.dest if transition.dest is not None else source
    return table


TRANSITION_TABLE: Final = compile_table(build_machine())

# Every event type must be a trigger, and every trigger an event type.
_missing = set(EVENT_TYPES) ^ {trigger for trigger, _, _ in TRANSITIONS}
if _missing:  # pragma: no cover - a programming error caught at import
    raise RuntimeError(f"events and machine triggers disagree: {sorted(_missing)}")
