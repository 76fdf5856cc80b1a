"""Postmortem analysis of a slot's events (pure: replayed steps in, a report out).

`analyse` reads replayed steps (each event with the state it led to, as `replay_steps`
yields them; it does not fold again) and collects what a developer asks first after an
incident: every load with its per-phase durations, settings and extra args; every failed,
cancelled, interrupted or crashed load with its error and log tail; recoveries; and
anomalies. Two anomaly kinds break the contract and make `studio-engine verify` fail: two
live processes for one slot, and a spawn before the previous process was confirmed dead (or
a process forgotten while still alive).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any, Final

from engine.core import events as ev
from engine.core.failure import FALLBACK_REASONS
from engine.core.state import SlotState

HEALTH_WAIT_THRESHOLD_S: Final = 60.0
PHASES: Final = ("resolve", "kill", "settle", "spawn", "warm")
# Contract violations (DESIGN.md rule 1); every other anomaly is worth a look, not a bug.
VIOLATIONS: Final = frozenset(
    {"two_live_processes", "spawn_without_confirmed_kill", "lost_process", "unended_load"}
    | {"evicted_pinned"}  # the node (@node stream): a pinned server evicted by the node
)

# event type -> (phase it opens, phase it closes)
PHASE_OPENS: Final = {
    "load_requested": "resolve",
    "kill_started": "kill",
    "settle_started": "settle",
    "spawn_started": "spawn",
    "spawned": "warm",
}
PHASE_CLOSES: Final = {
    "model_resolved": "resolve",
    "load_abandoned": "resolve",
    "process_exited": "kill",
    "settled": "settle",
    "spawned": "spawn",
    "health_passed": "warm",
    "health_failed": "warm",
    "spawn_retried": "warm",
}


@dataclass(frozen=True, slots=True)
class Anomaly:
    seq: int
    at: float
    kind: str
    message: str

    @property
    def violation(self) -> bool:
        return self.kind in VIOLATIONS


@dataclass(slots=True)
class LoadReport:
    load_id: str
    seq: int
    requested_at: float
    model: str
    settings: dict[str, Any]
    requested_extra_args: list[str] | None  # None = inherit
    extra_args: list[str] | None = None  # what the server got (after inheritance/stripping)
    extra_args_source: str | None = None
    argv: list[str] | None = None
    pid: int | None = None
    outcome: str = "in flight"
    error: str | None = None
    log_tail: str | None = None
    ended_at: float | None = None
    phases: dict[str, float] = field(default_factory=dict)
    spans: list[tuple[str, float, float]] = field(default_factory=list)  # (phase, start, end)
    reload_reason: str | None = None  # why it was not a duplicate of what served
    planned: dict[str, Any] | None = None  # the launch plan (context, slots, GPUs, offload)
    effective: dict[str, Any] | None = None  # what the server reported (/props)
    failure_kind: str | None = None  # engine.core.failure.FailureKind of a failed load
    rungs: list[str] = field(default_factory=list)  # the retry ladder: "kind -> change"
    fallback_reason: str | None = None  # what its server gave up to start

    @property
    def total_s(self) -> float | None:
        return None if self.ended_at is None else self.ended_at - self.requested_at


@dataclass(frozen=True, slots=True)
class Incident:
    """A load or server that ended badly: failed, cancelled, interrupted or crashed."""

    seq: int
    at: float
    kind: str
    load_id: str | None
    error: str
    log_tail: str | None
    failure_kind: str | None = None


@dataclass(frozen=True, slots=True)
class Restart:
    """A server brought back (`respawn_requested`) or unloaded for being idle."""

    seq: int
    at: float
    kind: str  # "respawn after crash", "respawn after idle unload", "idle unload"
    detail: str


@dataclass(frozen=True, slots=True)
class Recovery:
    seq: int
    at: float
    previous_state: str
    summary: str | None = None
    adopted_pid: int | None = None
    orphans_killed: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Row:
    seq: int
    at: float
    type: str
    state: str
    event: ev.Event


@dataclass(slots=True)
class Report:
    slot: str
    events: int = 0
    final_state: str = "idle"
    timeline: list[Row] = field(default_factory=list)
    loads: list[LoadReport] = field(default_factory=list)
    incidents: list[Incident] = field(default_factory=list)
    recoveries: list[Recovery] = field(default_factory=list)
    anomalies: list[Anomaly] = field(default_factory=list)
    restarts: list[Restart] = field(default_factory=list)

    @property
    def violations(self) -> list[Anomaly]:
        return [a for a in self.anomalies if a.violation]

    def to_json(self) -> dict[str, Any]:
        return {
            "slot": self.slot,
            "events": self.events,
            "final_state": self.final_state,
            "loads": [{**asdict(load), "total_s": load.total_s} for load in self.loads],
            "incidents": [asdict(i) for i in self.incidents],
            "recoveries": [asdict(r) for r in self.recoveries],
            "restarts": [asdict(r) for r in self.restarts],
            "anomalies": [{**asdict(a), "violation": a.violation} for a in self.anomalies],
            "timeline": [
                {
                    "seq": r.seq,
                    "at": r.at,
                    "state": r.state,
                    "event": r.event.model_dump(mode="json"),
                }
                for r in self.timeline
            ],
        }


def _settings(spec: ev.LoadSpec) -> dict[str, Any]:
    data = spec.model_dump(
        include={
            "variant",
            "max_seq_length",
            "cache_type_kv",
            "speculative_type",
            "chat_template_override",
            "force",
            "parallel_slots",
        }
    )
    template = data.get("chat_template_override")
    if isinstance(template, str) and len(template) > 60:
        data["chat_template_override"] = template[:57] + "..."
    return data


def _requested(event: ev.BaseEvent, spec: ev.LoadSpec, seq: int, at: float) -> LoadReport:
    """The report of a load call, as it was asked for."""
    return LoadReport(
        load_id=event.load_id or "",
        seq=seq,
        requested_at=at,
        model=spec.model,
        settings=_settings(spec),
        requested_extra_args=None if spec.extra_args is None else list(spec.extra_args),
    )


class _Analysis:
    def __init__(self, slot: str, health_wait_s: float, keep: Callable[[int, float], bool]) -> None:
        self.report = Report(slot)
        self.health_wait_s = health_wait_s
        self.keep = keep
        self.live: dict[int, str] = {}  # pid -> load id, for processes not confirmed dead
        self.loads: dict[str, LoadReport] = {}
        self.opened: dict[tuple[str, str], float] = {}  # (load id, phase) -> start
        self.recovery: Recovery | None = None

    def anomaly(self, seq: int, at: float, kind: str, message: str) -> None:
        if self.keep(seq, at):
            self.report.anomalies.append(Anomaly(seq, at, kind, message))

    def incident(
        self,
        seq: int,
        at: float,
        kind: str,
        load_id: str | None,
        error: str,
        tail: str | None,
        failure_kind: str | None = None,
    ) -> None:
        if self.keep(seq, at):
            self.report.incidents.append(
                Incident(seq, at, kind, load_id, error, tail, failure_kind)
            )

    def restart(self, seq: int, at: float, kind: str, detail: str) -> None:
        if self.keep(seq, at):
            self.report.restarts.append(Restart(seq, at, kind, detail))

    def end_load(self, load_id: str | None, at: float, outcome: str, error: str | None) -> None:
        load = self.loads.get(load_id or "")
        if load is None or load.ended_at is not None:
            return
        load.outcome, load.ended_at = outcome, at
        if error is not None:
            load.error = error
        for phase in PHASES:  # a phase cut short by the end of the load still counts
            self._close(load, phase, at)

    def _close(self, load: LoadReport, phase: str, at: float) -> None:
        start = self.opened.pop((load.load_id, phase), None)
        if start is not None:
            load.phases[phase] = load.phases.get(phase, 0.0) + at - start
            load.spans.append((phase, start, at))

    def step(self, seq: int, before: SlotState, event: ev.Event, after: SlotState) -> None:
        at = event.at
        pending = before.pending
        current = pending.load_id if pending is not None else None
        self._phases(at, event, current)
        self._processes(seq, at, before, event)
        self._loads(seq, at, before, event, after, current)
        self._recoveries(seq, at, event)

    def _phases(self, at: float, event: ev.Event, load_id: str | None) -> None:
        if event.type == "load_requested":
            load_id = event.load_id
        if load_id is None:
            return
        load = self.loads.get(load_id)
        closes = PHASE_CLOSES.get(event.type)
        if closes is not None and load is not None:
            self._close(load, closes, at)
        opens = PHASE_OPENS.get(event.type)
        if opens is not None:
            self.opened[(load_id, opens)] = at

    def _processes(self, seq: int, at: float, before: SlotState, event: ev.Event) -> None:
        match event:
            case ev.SpawnStarted():
                if self.live:
                    pids = ", ".join(str(p) for p in self.live)
                    self.anomaly(
                        seq,
                        at,
                        "spawn_without_confirmed_kill",
                        f"spawn of load {event.load_id} started while pid {pids} was not "
                        "confirmed dead",
                    )
            case ev.Spawned(pid=pid) | ev.RecoveryAdopted(pid=pid):
                others = [p for p in self.live if p != pid]
                if others:
                    self.anomaly(
                        seq,
                        at,
                        "two_live_processes",
                        f"pid {pid} is live while pid {', '.join(map(str, others))} of the "
                        "same slot was never confirmed dead",
                    )
                process = before.process
                self.live[pid] = process.load_id if process is not None else ""
            case ev.ProcessExited(pid=pid) | ev.Crashed(pid=pid) | ev.OrphanKilled(pid=pid):
                self.live.pop(pid, None)
            case ev.LoadFailed() | ev.Unloaded():
                process = before.process
                if process is not None and process.pid in self.live:
                    self.anomaly(
                        seq,
                        at,
                        "lost_process",
                        f"{event.type} forgot pid {process.pid}, which was never confirmed dead",
                    )
                    self.live.pop(process.pid)

    def _loads(
        self,
        seq: int,
        at: float,
        before: SlotState,
        event: ev.Event,
        after: SlotState,
        current: str | None,
    ) -> None:
        match event:
            case ev.LoadRequested(spec=spec) | ev.LoadShortCircuited(spec=spec):
                report = _requested(event, spec, seq, at)
                if isinstance(event, ev.LoadRequested):
                    report.reload_reason = event.reason
                if isinstance(event, ev.LoadShortCircuited):
                    report.outcome, report.ended_at = "already_loaded", at
                    served = before.serving
                    if served is not None:
                        report.extra_args = list(served.extra_args)
                        report.argv = list(served.argv)
                self.loads[report.load_id] = report
                if self.keep(seq, at):
                    self.report.loads.append(report)
            case ev.LoadSuperseded(spec=spec, reason=reason):
                report = _requested(event, spec, seq, at)
                report.outcome, report.error, report.ended_at = "cancelled while queued", reason, at
                self.loads[report.load_id] = report
                if self.keep(seq, at):
                    self.report.loads.append(report)
            case ev.LoadJoined(joined_load_id=joined_id):
                joined = self.loads.get(joined_id)
                report = LoadReport(
                    load_id=event.load_id or "",
                    seq=seq,
                    requested_at=at,
                    model=joined.model if joined is not None else "?",
                    settings=dict(joined.settings) if joined is not None else {},
                    requested_extra_args=joined.requested_extra_args if joined else None,
                    outcome=f"joined {joined_id}",
                    ended_at=at,
                )
                if self.keep(seq, at):
                    self.report.loads.append(report)
            case ev.SpawnStarted():
                load = self.loads.get(current or "")
                if load is not None:
                    load.extra_args = list(event.extra_args)
                    load.extra_args_source = event.extra_args_source
                    load.argv = list(event.argv)
            case ev.LaunchPlanned(plan=plan):
                load = self.loads.get(current or "")
                if load is not None:
                    load.planned = plan.model_dump(
                        include={
                            "context",
                            "max_context",
                            "native_context",
                            "parallel_slots",
                            "kv_unified",
                            "gpus",
                            "offload",
                            "reason",
                        }
                    )
            case ev.ServerPropsRead(props=props):
                load = self.loads.get(current or "")
                if load is not None:
                    load.effective = props.model_dump(exclude_none=True)
                planned = before.pending.plan if before.pending is not None else None
                if planned is not None and props.n_ctx is not None:
                    unified = planned.kv_unified or planned.parallel_slots == 1
                    per_slot = planned.context // planned.parallel_slots
                    expected = planned.context if unified else per_slot
                    if props.n_ctx != expected:
                        self.anomaly(
                            seq,
                            at,
                            "context_mismatch",
                            f"load {current} planned {expected} tokens per slot, the server "
                            f"reports n_ctx {props.n_ctx}",
                        )
            case ev.Spawned(pid=pid):
                load = self.loads.get(current or "")
                if load is not None:
                    load.pid = pid
            case ev.SpawnRetried(attempt=attempt, port=port, failure_kind=why, change=change):
                load = self.loads.get(current or "")
                if load is not None:
                    load.rungs.append(f"{why} -> {change}")
                    if change != "new_port":
                        given_up = FALLBACK_REASONS[change]
                        gave_up = load.fallback_reason
                        load.fallback_reason = f"{gave_up}; {given_up}" if gave_up else given_up
                if change == "new_port":
                    self.anomaly(
                        seq,
                        at,
                        "port_in_use",
                        f"port {port} of load {current} was taken by another listener; "
                        f"spawned again (retry {attempt})",
                    )
            case ev.HealthPassed(waited_s=waited):
                if waited > self.health_wait_s:
                    self.anomaly(
                        seq, at, "slow_health", f"health wait of load {current} took {waited:.1f} s"
                    )
            case ev.HealthFailed(error=error, log_tail=tail):
                load = self.loads.get(current or "")
                if load is not None:
                    load.error, load.log_tail = error, tail
                    started = load.phases.get("warm")
                    if started is not None and started > self.health_wait_s:
                        self.anomaly(
                            seq,
                            at,
                            "slow_health",
                            f"health wait of load {current} lasted {started:.1f} s and failed",
                        )
            case ev.Settled(outcome="timeout", waited_s=waited):
                self.anomaly(
                    seq,
                    at,
                    "settle_timeout",
                    f"GPU memory of load {current} did not settle within {waited:.2f} s",
                )
            case ev.LoadSucceeded():
                self.end_load(current, at, "loaded", None)
            case ev.LoadCancelled(reason=reason):
                self.end_load(current, at, "cancelled", reason)
                self.incident(seq, at, "cancelled", current, reason, None)
            case ev.LoadAbandoned(outcome=outcome, error=error):
                self.end_load(current, at, f"{outcome} (previous server kept serving)", error)
                self.incident(seq, at, outcome, current, error, None)
            case ev.LoadFailed(error=error, log_tail=tail, failure_kind=failure_kind):
                interrupted = before.state == "recovering"
                kind = "interrupted" if interrupted else "failed"
                load = self.loads.get(current or "")
                tail = tail or (load.log_tail if load is not None else None)
                self.end_load(current, at, kind, error)
                if load is not None:
                    load.log_tail, load.failure_kind = tail, failure_kind
                if failure_kind == "crash_loop":
                    kind = "crash loop"
                self.incident(seq, at, kind, current or event.load_id, error, tail, failure_kind)
            case ev.RecoveryAdopted():
                if current is not None and after.pending is None:
                    if after.process is not None and after.process.load_id == current:
                        self.end_load(current, at, "loaded (adopted after backend restart)", None)
                    else:  # the previous server was adopted; the load it was replacing died
                        error = "interrupted by backend crash; previous server adopted"
                        self.end_load(current, at, "interrupted", error)
                        self.incident(seq, at, "interrupted", current, error, None)
            case ev.RecoveryFinished(summary=summary):
                if current is not None and after.pending is None:
                    self.end_load(current, at, "interrupted", summary)
                    self.incident(seq, at, "interrupted", current, summary, None)
            case ev.Crashed(pid=pid, returncode=code, log_tail=tail, failure_kind=crash_kind):
                process = before.process
                load_id = process.load_id if process is not None else None
                how = "" if code is None else f" with code {code}"
                error = f"llama-server pid {pid} exited{how}"
                self.incident(seq, at, "crashed", load_id, error, tail, crash_kind)
            case ev.RespawnRequested(reason=reason, after_crash_seq=crash):
                after_what = (
                    f"crash (stream version {crash})" if reason == "crash" else "idle unload"
                )
                self.restart(seq, at, f"respawn after {after_what}", "the last successful load")
            case ev.UnloadRequested(reason="idle"):
                served = before.serving
                what = served.spec.model if served is not None else "the server"
                self.restart(seq, at, "idle unload", f"{what} unused past idle_unload_after")
            case _:
                pass

    def _recoveries(self, seq: int, at: float, event: ev.Event) -> None:
        match event:
            case ev.RecoveryStarted(previous_state=previous):
                self.recovery = Recovery(seq, at, previous)
                if self.keep(seq, at):
                    self.report.recoveries.append(self.recovery)
            case ev.OrphanKilled(pid=pid, marker=marker):
                self.anomaly(
                    seq, at, "orphan_killed", f"recovery killed orphan pid {pid} ({marker})"
                )
                self._update_recovery(orphans_killed=pid)
            case ev.RecoveryAdopted(pid=pid):
                self._update_recovery(adopted_pid=pid)
            case ev.RecoveryFinished(summary=summary):
                self._update_recovery(summary=summary)
                self.recovery = None
            case _:
                pass

    def _update_recovery(self, **change: Any) -> None:
        current = self.recovery
        if current is None:
            return
        if "orphans_killed" in change:
            change["orphans_killed"] = (*current.orphans_killed, change["orphans_killed"])
        updated = Recovery(**{**asdict(current), **change})
        self.recovery = updated
        recoveries = self.report.recoveries
        if recoveries and recoveries[-1] is current:
            recoveries[-1] = updated


def analyse(
    records: Iterable[tuple[int, ev.Event, SlotState]],
    slot: str = "default",
    *,
    health_wait_s: float = HEALTH_WAIT_THRESHOLD_S,
    since: float | int | None = None,
    until: float | int | None = None,
) -> Report:
    """The report for `records`: (seq, event, state after it) in stream order, from the first.

    `since`/`until` (an int = sequence number, a float = epoch seconds) bound what the report
    lists; the states still come from the first event, so they are right at the window's start.
    """

    def keep(seq: int, at: float) -> bool:
        for bound, after in ((since, True), (until, False)):
            if bound is None:
                continue
            value: float = seq if isinstance(bound, int) else at
            if (value < bound) if after else (value > bound):
                return False
        return True

    analysis = _Analysis(slot, health_wait_s, keep)
    state = SlotState()
    for seq, event, after in records:
        analysis.step(seq, state, event, after)
        if keep(seq, event.at):
            analysis.report.timeline.append(Row(seq, event.at, event.type, after.state, event))
        state = after
    # Every call ends (DESIGN.md rule 11): only the load still in flight at the journal's end
    # may lack one.
    in_flight = state.pending.load_id if state.pending is not None else None
    for load in analysis.loads.values():
        if load.ended_at is None and load.load_id != in_flight:
            analysis.anomaly(
                load.seq,
                load.requested_at,
                "unended_load",
                f"load {load.load_id} was requested but the journal never says how it ended",
            )
    report = analysis.report
    report.events = len(report.timeline)
    report.final_state = state.state
    return report
