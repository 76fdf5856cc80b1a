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
from engine.core.rules import effective_extra_args
from engine.core.state import ServerProcess, SlotState
from engine.effects import CancelToken, DownloadProgress, Effects, FileProgress


@dataclass(frozen=True, slots=True)
class SlotSettings:
    """The knobs a slot's steps run under (`Engine.open(**options)` sets them)."""

    health_timeout: float
    kill_grace: float
    settle_max_wait: float
    threads: int | None
    memory_limit: int | None  # bytes this slot may use at most (None = the host's)


class Slot(Protocol):
    """What a step needs from the slot it runs on."""

    slot: str
    journal_id: str
    effects: Effects
    settings: SlotSettings
    download: DownloadProgress | None  # per-chunk progress of the load in flight: memory only

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


def admit(engine: Slot) -> None:
    state = engine.state
    pending = state.pending
    assert pending is not None and pending.model is not None
    extra_args = launch_extra_args(state)
    need = admission.estimate(pending.model, pending.spec, extra_args)
    budget = replace(
        engine.effects.memory_budget(state.process), limit_bytes=engine.settings.memory_limit
    )
    verdict = admission.verdict(need.need, budget, pending.spec.force)
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
            error=admission.refusal_message(need.need, budget) if verdict != "fits" else None,
        )
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
    port = effects.free_port()
    template = pending.spec.chat_template_override
    argv = build_argv(
        effects.binary,
        pending.model,
        pending.spec,
        extra_args,
        port=port,
        threads=engine.settings.threads,
        template_file=effects.template_file(template) if template is not None else None,
    )
    marker = make_marker(engine.journal_id, engine.slot, pending.load_id)
    log_path = effects.log_path(pending.load_id)
    token.check()
    engine.emit(
        ev.SpawnStarted(
            at=effects.now(),
            load_id=pending.load_id,
            argv=argv,
            port=port,
            marker=marker,
            log_path=log_path,
            extra_args=extra_args,
            extra_args_source=pending.model.source,
        )
    )
    pid, create_time = effects.spawn(argv, marker, log_path)
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
        child = ServerProcess(pid, create_time, port, pending.load_id, marker, log_path)
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
            lambda: effects.health(process.port),
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
        raise StepFailed(str(exc), tail) from exc
    if exited is None:
        engine.emit(
            ev.HealthPassed(
                at=effects.now(),
                load_id=pending.load_id,
                waited_s=round(effects.monotonic() - start, 6),
            )
        )
        return
    tail = effects.log_tail(process.log_path)
    error = f"llama-server exited with code {exited.returncode} before it was healthy"
    reported = server_error(tail)
    if reported:
        error += f": {reported}"
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
    raise StepFailed(error, tail)


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


def server_error(log_tail: str) -> str | None:
    """The server's own last error line, for the user-facing message."""
    for line in reversed(log_tail.splitlines()):
        text = line.strip()
        if "error" in text.lower() or "failed" in text.lower():
            return text[-300:]
    return None
