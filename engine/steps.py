"""The effects behind each step of the pure core (`decide.Step`), as the orchestrator runs them.

Each function runs one effect for the engine's pending load and journals it through
`engine._emit`: the intent before the effect where a crash could otherwise lose it
(kill_started before SIGTERM, spawn_started with argv and marker before Popen), the outcome
right after. None of them changes state any other way; like engine.recovery, they are the
orchestrator's own code, kept apart so that engine.orchestrator stays about sequencing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from engine import admission, health
from engine import events as ev
from engine.cmdline import build_argv
from engine.effects import CancelToken, DownloadProgress, FileProgress, StepFailed
from engine.gpu import wait_for_settle
from engine.process import make_marker
from engine.rules import effective_extra_args
from engine.state import SlotState

if TYPE_CHECKING:
    from engine.orchestrator import Engine


class EngineError(RuntimeError):
    pass


def launch_extra_args(state: SlotState) -> tuple[str, ...]:
    """The extra args the pending load's server gets (inherited ones minus shadowed flags)."""
    pending = state.pending
    assert pending is not None and pending.model is not None
    return effective_extra_args(
        pending.spec, pending.model.source, state.extra_args, state.extra_args_source
    )


def resolve(engine: Engine, token: CancelToken) -> None:
    pending = engine._state.pending
    assert pending is not None
    with engine._state_lock:
        flight = next((f for f in engine._flights if f.load_id == pending.load_id), None)
    model = engine._effects.resolve(
        pending.spec,
        token,
        hf_token=flight.hf_token if flight else None,
        listener=DownloadRecorder(engine, pending.load_id),
    )
    engine._emit(ev.ModelResolved(at=engine._effects.now(), load_id=pending.load_id, model=model))


def admit(engine: Engine) -> None:
    state = engine._state
    pending = state.pending
    assert pending is not None and pending.model is not None
    extra_args = launch_extra_args(state)
    need = admission.estimate(pending.model, pending.spec, extra_args)
    budget = replace(engine._effects.memory_budget(state.process), limit_bytes=engine._memory_limit)
    verdict = admission.verdict(need.need, budget, pending.spec.force)
    engine._emit(
        ev.AdmissionChecked(
            at=engine._effects.now(),
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


def kill(engine: Engine, reason: ev.KillReason) -> None:
    process = engine._state.process
    assert process is not None
    load_id = engine._state.pending.load_id if engine._state.pending else None
    now = engine._effects.now
    engine._emit(
        ev.KillStarted(
            at=now(),
            load_id=load_id,
            pid=process.pid,
            create_time=process.create_time,
            reason=reason,
        )
    )
    exited = engine._effects.terminate(process, engine._kill_grace)
    if exited is None:
        engine._emit(ev.KillEscalated(at=now(), load_id=load_id, pid=process.pid))
        exited = engine._effects.kill(process, engine._kill_grace)
    if exited is None:
        raise EngineError(f"llama-server pid {process.pid} survived SIGKILL")
    engine._emit(
        ev.ProcessExited(
            at=now(), load_id=load_id, pid=process.pid, returncode=exited.returncode
        )
    )


def settle(engine: Engine, token: CancelToken) -> None:
    state = engine._state
    assert state.pending is not None
    load_id = state.pending.load_id
    now, monotonic = engine._effects.now, engine._effects.monotonic
    kill_age = now() - state.last_kill_at if state.last_kill_at is not None else None
    if state.state != "settling":
        engine._emit(ev.SettleStarted(at=now(), load_id=load_id, kill_age_s=kill_age))
    token.check()
    since_kill = monotonic() - kill_age if kill_age is not None else 0.0

    def sampled(sample: list[tuple[int, int]]) -> None:
        engine._emit(ev.VramSampled(at=now(), load_id=load_id, free_mib=tuple(sample)))

    outcome = wait_for_settle(
        engine._effects.probe_vram,
        since_kill,
        max_wait=engine._settle_max_wait,
        clock=monotonic,
        sleep=token.sleep,
        on_sample=sampled,
        gpus_present=engine._effects.has_gpu() if kill_age is not None else None,
    )
    engine._emit(
        ev.Settled(
            at=now(),
            load_id=load_id,
            outcome=outcome.kind,
            waited_s=round(outcome.waited_s, 6),
            samples=len(outcome.samples),
        )
    )


def spawn(engine: Engine, token: CancelToken) -> None:
    state = engine._state
    pending = state.pending
    assert pending is not None and pending.model is not None
    effects = engine._effects
    extra_args = launch_extra_args(state)
    port = effects.free_port()
    template = pending.spec.chat_template_override
    argv = build_argv(
        effects.binary,
        pending.model,
        pending.spec,
        extra_args,
        port=port,
        threads=engine._threads,
        template_file=effects.template_file(template) if template is not None else None,
    )
    marker = make_marker(engine.journal_id, engine.slot, pending.load_id)
    log_path = effects.log_path(pending.load_id)
    token.check()
    engine._emit(
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
    engine._emit(
        ev.Spawned(at=effects.now(), load_id=pending.load_id, pid=pid, create_time=create_time)
    )


def await_health(engine: Engine, token: CancelToken) -> None:
    state = engine._state
    process, pending = state.process, state.pending
    assert process is not None and pending is not None
    effects = engine._effects
    start = effects.monotonic()
    try:
        exited = health.await_health(
            lambda: effects.health(process.port),
            lambda: effects.exit_status(process),
            token,
            engine._health_timeout,
            effects.monotonic,
        )
    except TimeoutError as exc:
        tail = effects.log_tail(process.log_path)
        engine._emit(
            ev.HealthFailed(
                at=effects.now(), load_id=pending.load_id, error=str(exc), log_tail=tail
            )
        )
        raise StepFailed(str(exc), tail) from exc
    if exited is None:
        engine._emit(
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
    engine._emit(
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

    def __init__(self, engine: Engine, load_id: str) -> None:
        self._engine, self._load_id = engine, load_id

    def started(self, repo_id: str, revision: str, files: Sequence[tuple[str, int]]) -> None:
        engine = self._engine
        engine._download = DownloadProgress(
            self._load_id, repo_id, tuple(FileProgress(p, 0, size) for p, size in files)
        )
        engine._emit(
            ev.DownloadStarted(
                at=engine._effects.now(),
                load_id=self._load_id,
                repo_id=repo_id,
                revision=revision,
                files=tuple(ev.DownloadFile(path=p, size_bytes=size) for p, size in files),
                total_bytes=sum(size for _, size in files),
            )
        )

    def advanced(self, path: str, done: int, total: int) -> None:
        download = self._engine._download
        if download is None or download.load_id != self._load_id:
            return
        files = tuple(
            FileProgress(path, done, total or f.total) if f.path == path else f
            for f in download.files
        )
        # One reference swap: readers on other threads see the old or the new snapshot.
        self._engine._download = replace(download, files=files)

    def finished(self, path: str, size: int, seconds: float) -> None:
        self.advanced(path, size, size)
        engine = self._engine
        engine._emit(
            ev.FileDownloaded(
                at=engine._effects.now(),
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
