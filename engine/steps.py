"""The effects behind each step of the pure core (`decide.Step`), as the orchestrator runs them.

Each function runs one effect for the slot's pending load and journals it through
`slot.emit`: the intent before the effect where a crash could otherwise lose it
(kill_started before SIGTERM, spawn_started with argv and marker before Popen), the outcome
right after. None of them changes state any other way. They see the slot only through the
`Slot` protocol below (the orchestrator's `Engine` is one), so neither this module nor
engine.recovery imports the orchestrator.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from pydantic import SecretStr

from engine.adapters import health
from engine.adapters.gpu import wait_for_settle
from engine.adapters.process import make_marker
from engine.core import admission
from engine.core import events as ev
from engine.core.cmdline import build_argv
from engine.core.errors import EngineError, StepFailed
from engine.core.failure import (
    MAX_RETRIES,
    Change,
    FailureKind,
    apply_fallbacks,
    classify,
    next_rung,
)
from engine.core.plan import plan_launch, unservable
from engine.core.policy import check_extra_args
from engine.core.rules import effective_extra_args
from engine.core.state import ServerProcess, SlotState
from engine.effects import CancelToken, DownloadProgress, Effects, Exited, FileProgress

MAX_SPAWN_RETRIES = MAX_RETRIES


@dataclass(frozen=True, slots=True)
class SlotSettings:
    """The knobs a slot's steps run under (`Engine.open(**options)` sets them)."""

    health_timeout: float
    kill_grace: float
    settle_max_wait: float
    threads: int | None
    memory_limit: int | None  # bytes this slot may use at most (None = the host's)
    allow_flags: frozenset[str] = frozenset()  # policy exceptions (canonical names)
    fit_fraction: float = 0.97  # share of each GPU the launch planner may fill (0.80-1.00)


class AdmissionGate(Protocol):
    """Admission beyond the slot (an `engine.Node`): may evict other slots' idle servers."""

    def admit(
        self,
        slot: str,
        load_id: str,
        model: ev.ResolvedModel,
        spec: ev.LoadSpec,
        extra_args: tuple[str, ...],
        releasable_bytes: int,
        token: CancelToken,
    ) -> tuple[admission.Verdict, str | None]:
        """The verdict for this launch, and the refusal message when it is refused."""
        ...


class Slot(Protocol):
    """What a step needs from the slot it runs on."""

    slot: str
    journal_id: str
    effects: Effects
    settings: SlotSettings
    download: DownloadProgress | None  # per-chunk progress of the load in flight: memory only
    gate: AdmissionGate | None  # set by a Node: admission across its slots

    @property
    def state(self) -> SlotState: ...

    def emit(self, *events: ev.Event, durable: bool | None = None) -> SlotState:
        """Validate the events against the machine, journal them, publish the new state
        (fsynced unless they are all orchestrator.UNSYNCED_EVENTS, or `durable` says)."""
        ...

    def hf_token(self, load_id: str) -> SecretStr | None: ...


def launch_extra_args(state: SlotState) -> tuple[str, ...]:
    """The extra args the pending load's server gets (inherited ones minus shadowed flags)."""
    pending = state.pending
    assert pending is not None and pending.model is not None
    return effective_extra_args(
        pending.spec, pending.model.source, state.extra_args, state.extra_args_source
    )


def resolve(engine: Slot, token: CancelToken) -> None:
    pending = engine.state.pending
    assert pending is not None
    model = engine.effects.resolve(
        pending.spec,
        token,
        hf_token=engine.hf_token(pending.load_id),
        listener=DownloadRecorder(engine, pending.load_id),
    )
    engine.emit(ev.ModelResolved(at=engine.effects.now(), load_id=pending.load_id, model=model))
    # Refused here, before admission and the kill: the running server keeps serving.
    known = engine.effects.lists_architecture(model.architecture) if model.architecture else None
    refusal = unservable(model, known)
    if refusal is not None:
        raise StepFailed(refusal, None, "unknown_architecture" if known is False else None)


def admit(engine: Slot, token: CancelToken | None = None) -> None:
    state = engine.state
    pending = state.pending
    assert pending is not None and pending.model is not None
    extra_args = launch_extra_args(state)
    if pending.spec.extra_args is None:
        # Inherited extras passed the policy when they were stored; the operator's allow_flags
        # (or the binary) may have changed since. Refused here, the old server keeps serving.
        check_extra_args(extra_args, engine.effects.capabilities(), engine.settings.allow_flags)
    need = admission.estimate(pending.model, pending.spec, extra_args)
    budget = replace(
        engine.effects.memory_budget(state.process), limit_bytes=engine.settings.memory_limit
    )
    verdict = admission.verdict(need.need, budget, pending.spec.force)
    error = admission.refusal_message(need.need, budget) if verdict != "fits" else None
    over_slot_limit = budget.limit_bytes is not None and need.need > budget.limit_bytes
    if engine.gate is not None and not (over_slot_limit and verdict == "refused"):
        # The node's decision replaces the host check: it sees the same host plus its other
        # servers, and may evict idle ones to make room. A slot's own memory_limit still holds.
        verdict, error = engine.gate.admit(
            engine.slot,
            pending.load_id,
            pending.model,
            pending.spec,
            extra_args,
            budget.releasable_bytes,
            token or CancelToken(),
        )
    engine.emit(
        ev.AdmissionChecked(
            at=engine.effects.now(),
            load_id=pending.load_id,
            context=need.context,
            weights_bytes=need.weights_bytes,
            kv_cache_bytes=need.kv_cache_bytes,
            overhead_bytes=need.overhead_bytes,
            need_bytes=need.need,
            free_vram_bytes=budget.free_vram_bytes,
            available_ram_bytes=budget.available_ram_bytes,
            releasable_bytes=budget.releasable_bytes,
            limit_bytes=budget.limit_bytes,
            verdict=verdict,
            error=error,
        )
    )


def plan(engine: Slot) -> ev.LaunchPlanned:
    """Plan the launch from what the host has now, after the previous server settled."""
    state = engine.state
    pending = state.pending
    assert pending is not None and pending.model is not None
    effects = engine.effects
    capabilities = effects.capabilities()
    request = ev.PlanRequest(
        context=admission.explicit_context(
            pending.spec, launch_extra_args(state), pending.model.native_ctx
        ),
        parallel_slots=pending.spec.parallel_slots,
        cache_type_kv=pending.spec.cache_type_kv,
    )
    policy = ev.PlanPolicy(
        fit_fraction=engine.settings.fit_fraction,
        supports_kv_unified=capabilities.supports("--kv-unified"),
        supports_fit=capabilities.supports("--fit"),
    )
    inventory = effects.inventory()
    return ev.LaunchPlanned(
        at=effects.now(),
        load_id=pending.load_id,
        inventory=inventory,
        request=request,
        policy=policy,
        plan=plan_launch(pending.model, inventory, request, policy),
    )


def kill(engine: Slot, reason: ev.KillReason) -> None:
    process = engine.state.process
    assert process is not None
    load_id = engine.state.pending.load_id if engine.state.pending else None
    now = engine.effects.now
    engine.emit(
        ev.KillStarted(
            at=now(),
            load_id=load_id,
            pid=process.pid,
            create_time=process.create_time,
            reason=reason,
        )
    )
    exited = engine.effects.terminate(process, engine.settings.kill_grace)
    if exited is None:
        engine.emit(ev.KillEscalated(at=now(), load_id=load_id, pid=process.pid))
        exited = engine.effects.kill(process, engine.settings.kill_grace)
    if exited is None:
        raise EngineError(f"llama-server pid {process.pid} survived SIGKILL")
    engine.emit(
        ev.ProcessExited(at=now(), load_id=load_id, pid=process.pid, returncode=exited.returncode)
    )


def settle(engine: Slot, token: CancelToken) -> None:
    state = engine.state
    assert state.pending is not None
    load_id = state.pending.load_id
    now, monotonic = engine.effects.now, engine.effects.monotonic
    kill_age = now() - state.last_kill_at if state.last_kill_at is not None else None
    if state.state != "settling":
        engine.emit(ev.SettleStarted(at=now(), load_id=load_id, kill_age_s=kill_age))
    token.check()
    since_kill = monotonic() - kill_age if kill_age is not None else 0.0

    def sampled(sample: list[tuple[int, int]]) -> None:
        engine.emit(ev.VramSampled(at=now(), load_id=load_id, free_mib=tuple(sample)))

    outcome = wait_for_settle(
        engine.effects.probe_vram,
        since_kill,
        max_wait=engine.settings.settle_max_wait,
        clock=monotonic,
        sleep=token.sleep,
        on_sample=sampled,
        gpus_present=engine.effects.has_gpu() if kill_age is not None else None,
    )
    engine.emit(
        ev.Settled(
            at=now(),
            load_id=load_id,
            outcome=outcome.kind,
            waited_s=round(outcome.waited_s, 6),
            samples=len(outcome.samples),
        )
    )


def spawn(engine: Slot, token: CancelToken) -> None:
    state = engine.state
    pending = state.pending
    assert pending is not None and pending.model is not None
    effects = engine.effects
    extra_args = launch_extra_args(state)
    socket_path = effects.socket_path(pending.load_id)
    port = 0 if socket_path is not None else effects.free_port()
    template = pending.spec.chat_template_override
    planned = plan(engine)
    launch = planned.plan
    argv = build_argv(
        effects.binary,
        pending.model,
        pending.spec,
        extra_args,
        port=port,
        threads=engine.settings.threads,
        template_file=effects.template_file(template) if template is not None else None,
        api_key_file=effects.api_key_file(pending.load_id),
        host=socket_path or "127.0.0.1",
        plan=launch,
    )
    argv = apply_fallbacks(argv, pending.fallbacks)  # the retry ladder's rungs so far
    # Pin the planned GPUs; a CPU-only plan leaves the environment alone.
    visible = ",".join(map(str, launch.gpus)) if launch.gpus else None
    marker = make_marker(engine.journal_id, engine.slot, pending.load_id)
    log_path = effects.log_path(pending.load_id)
    token.check()
    engine.emit(
        planned,  # the plan and the spawn intent: one append, before Popen
        ev.SpawnStarted(
            at=effects.now(),
            load_id=pending.load_id,
            argv=argv,
            port=port,
            marker=marker,
            log_path=log_path,
            extra_args=extra_args,
            extra_args_source=pending.model.source,
            socket_path=socket_path,
            binary=effects.binary_identity(),
            cuda_visible_devices=visible,
        ),
    )
    env = {"CUDA_VISIBLE_DEVICES": visible} if visible is not None else None
    pid, create_time = effects.spawn(argv, marker, log_path, env=env)
    try:
        identity = effects.identity(pid)
        engine.emit(
            ev.Spawned(
                at=effects.now(),
                load_id=pending.load_id,
                pid=pid,
                create_time=create_time,
                boot_id=identity[0] if identity else None,
                start_ticks=identity[1] if identity else None,
            )
        )
    except BaseException:
        # Every process the engine starts is journaled or dead: the journal refused the pid,
        # so nobody could ever find this server again. Kill it before the error surfaces.
        child = ServerProcess(
            pid, create_time, port, pending.load_id, marker, log_path, socket_path=socket_path
        )
        effects.kill(child, engine.settings.kill_grace)
        raise


def await_health(engine: Slot, token: CancelToken) -> None:
    state = engine.state
    process, pending = state.process, state.pending
    assert process is not None and pending is not None
    effects = engine.effects
    start = effects.monotonic()
    try:
        exited = health.await_health(
            lambda: effects.health(process.port, socket_path=process.socket_path),
            lambda: effects.exit_status(process),
            token,
            engine.settings.health_timeout,
            effects.monotonic,
        )
    except TimeoutError as exc:
        tail = effects.log_tail(process.log_path)
        engine.emit(
            ev.HealthFailed(
                at=effects.now(), load_id=pending.load_id, error=str(exc), log_tail=tail
            )
        )
        raise StepFailed(str(exc), tail, "health_timeout") from exc
    # A Unix socket lives in our 0700 run folder: nobody else can have bound it.
    foreign = process.socket_path is None and not effects.owns_port(process.pid, process.port)
    if exited is None and foreign:
        # A 200 from a listener that is not our server: never `loaded` on someone else's port.
        retry_spawn(engine, exited, "port_in_use", "new_port")
        return
    if exited is None:
        waited = round(effects.monotonic() - start, 6)
        # What the healthy server actually got (the context the user gets is its n_ctx),
        # journaled in the same append as the health pass.
        props = effects.server_props(process)
        engine.emit(
            ev.HealthPassed(at=effects.now(), load_id=pending.load_id, waited_s=waited),
            ev.ServerPropsRead(at=effects.now(), load_id=pending.load_id, props=props),
        )
        return
    tail = effects.log_tail(process.log_path)
    failure = classify(exited.returncode, tail, phase="starting")
    if failure.kind == "port_in_use":
        retry_spawn(engine, exited, failure.kind, "new_port")
        return
    argv = pending.launch.argv if pending.launch is not None else ()
    change = next_rung(failure, tail, argv, pending.fallbacks)
    if change is not None:
        retry_spawn(engine, exited, failure.kind, change)
        return
    error = failure.message
    engine.emit(
        ev.HealthFailed(
            at=effects.now(),
            load_id=pending.load_id,
            error=error,
            returncode=exited.returncode,
            log_tail=tail,
        ),
        ev.ProcessExited(
            at=effects.now(),
            load_id=pending.load_id,
            pid=process.pid,
            returncode=exited.returncode,
        ),
    )
    raise StepFailed(error, tail, failure.kind)


def retry_spawn(
    engine: Slot, exited: Exited | None, failure_kind: FailureKind, change: Change
) -> None:
    """Make sure the failed server is dead, then spawn again with `change` (journaled as
    spawn_retried), at most MAX_SPAWN_RETRIES times per load. The previous server is long
    gone: only this load's own servers are involved."""
    state = engine.state
    process, pending = state.process, state.pending
    assert process is not None and pending is not None
    effects = engine.effects
    if pending.spawn_retries >= MAX_SPAWN_RETRIES:
        error = (
            f"port {process.port} was taken by another listener; gave up after "
            f"{MAX_SPAWN_RETRIES} retries on new ports"
        )
        tail = effects.log_tail(process.log_path)
        engine.emit(ev.HealthFailed(at=effects.now(), load_id=pending.load_id, error=error))
        raise StepFailed(error, tail, failure_kind)  # the abort kills our server if it runs
    if exited is None:
        kill(engine, "failure")
    else:
        engine.emit(
            ev.ProcessExited(
                at=effects.now(),
                load_id=pending.load_id,
                pid=process.pid,
                returncode=exited.returncode,
            )
        )
    engine.emit(
        ev.SpawnRetried(
            at=effects.now(),
            load_id=pending.load_id,
            attempt=pending.spawn_retries + 1,
            failure_kind=failure_kind,
            port=process.port,
            change=change,
        )
    )


class DownloadRecorder:
    """A load's DownloadListener: journals the start and each finished file (never a chunk),
    and keeps per-chunk byte counts in memory for `Engine.progress()`."""

    def __init__(self, engine: Slot, load_id: str) -> None:
        self._engine, self._load_id = engine, load_id

    def started(self, repo_id: str, revision: str, files: Sequence[tuple[str, int]]) -> None:
        engine = self._engine
        engine.download = DownloadProgress(
            self._load_id, repo_id, tuple(FileProgress(p, 0, size) for p, size in files)
        )
        engine.emit(
            ev.DownloadStarted(
                at=engine.effects.now(),
                load_id=self._load_id,
                repo_id=repo_id,
                revision=revision,
                files=tuple(ev.DownloadFile(path=p, size_bytes=size) for p, size in files),
                total_bytes=sum(size for _, size in files),
            )
        )

    def advanced(self, path: str, done: int, total: int) -> None:
        download = self._engine.download
        if download is None or download.load_id != self._load_id:
            return
        files = tuple(
            FileProgress(path, done, total or f.total) if f.path == path else f
            for f in download.files
        )
        # One reference swap: readers on other threads see the old or the new snapshot.
        self._engine.download = replace(download, files=files)

    def finished(self, path: str, size: int, seconds: float) -> None:
        self.advanced(path, size, size)
        engine = self._engine
        engine.emit(
            ev.FileDownloaded(
                at=engine.effects.now(),
                load_id=self._load_id,
                path=path,
                size_bytes=size,
                seconds=round(seconds, 6),
            )
        )
