"""Every fact the engine records: one pydantic class per event type, one discriminated union.

Events are the only thing written to the journal and the only input of `evolve`. They are
frozen, reject unknown fields (a garbage payload fails loudly), and carry a schema version so
a journal written by a newer engine is refused instead of misread.

Secrets cannot be represented: the only token-related field is a SHA-256 fingerprint, and the
journal additionally refuses any payload that looks like a Hugging Face token.
"""

from __future__ import annotations

from typing import Annotated, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

SCHEMA_VERSION = 1

KillReason = Literal["replace", "unload", "cancel", "failure", "recovery"]
SettleKind = Literal["stable", "timeout", "cpu-only", "probe-error", "cold", "stale", "gpu-change"]
AbandonOutcome = Literal["cancelled", "failed", "refused"]
Fingerprint = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class LoadSpec(_Record):
    """A validated, normalised load request (what the user asked for, minus any secret)."""

    model: str  # resolved absolute path for a local file, repo id for a hub model
    variant: str | None = None
    max_seq_length: int | None = None  # None = not set (inherit), 0 = native context
    cache_type_kv: str | None = None
    speculative_type: str | None = None
    chat_template_override: str | None = None
    extra_args: tuple[str, ...] | None = None  # None = inherit, () = clear
    token_fingerprint: Fingerprint | None = None
    force: bool = False


class ResolvedModel(_Record):
    """Where a load's model actually lives, and the facts read from its GGUF header."""

    source: str  # model identity: "file:/abs/model.gguf" or "hf:owner/repo"
    model_file: str
    variant: str | None = None
    is_vision: bool = False
    mmproj_file: str | None = None
    native_ctx: int | None = None
    architecture: str | None = None
    size_bytes: int = 0
    mmproj_size_bytes: int = 0
    # KV cache geometry from the GGUF header, for the admission estimate (None = unknown).
    block_count: int | None = None
    head_count_kv: int | None = None
    key_length: int | None = None
    value_length: int | None = None


class BaseEvent(_Record):
    schema_version: int = SCHEMA_VERSION
    at: float  # wall-clock seconds since the epoch; the orchestrator's clock
    load_id: str | None = None


# --- loads ------------------------------------------------------------------------------


class LoadRequested(BaseEvent):
    type: Literal["load_requested"] = "load_requested"
    spec: LoadSpec


class LoadShortCircuited(BaseEvent):
    type: Literal["load_short_circuited"] = "load_short_circuited"
    spec: LoadSpec


class LoadJoined(BaseEvent):
    type: Literal["load_joined"] = "load_joined"
    joined_load_id: str


class LoadSuperseded(BaseEvent):
    """A load call that ended while queued, before it started: superseded by a newer load or
    cancelled. Its request and its end in one event, so every call is journaled."""

    type: Literal["load_superseded"] = "load_superseded"
    spec: LoadSpec
    reason: str


class ModelResolved(BaseEvent):
    type: Literal["model_resolved"] = "model_resolved"
    model: ResolvedModel


class LoadCancelled(BaseEvent):
    type: Literal["load_cancelled"] = "load_cancelled"
    reason: str


class LoadFailed(BaseEvent):
    type: Literal["load_failed"] = "load_failed"
    error: str
    log_tail: str | None = None


class LoadAbandoned(BaseEvent):
    """A load stopped before it touched the running server, which keeps serving."""

    type: Literal["load_abandoned"] = "load_abandoned"
    outcome: AbandonOutcome
    error: str


class LoadSucceeded(BaseEvent):
    """The new server is healthy: its settings and extra args are now the committed ones."""

    type: Literal["load_succeeded"] = "load_succeeded"


# --- admission ----------------------------------------------------------------------------


class AdmissionChecked(BaseEvent):
    """The memory estimate for a resolved load and the verdict, before anything is killed."""

    type: Literal["admission_checked"] = "admission_checked"
    context: int
    weights_bytes: int
    kv_cache_bytes: int
    overhead_bytes: int
    need_bytes: int
    free_vram_bytes: int
    available_ram_bytes: int
    releasable_bytes: int
    limit_bytes: int | None = None  # Engine(memory_limit=...), when set
    verdict: Literal["fits", "refused", "forced"]
    error: str | None = None  # the refusal message, when refused


# --- hub download (coarse grain: never one event per chunk) -------------------------------


class DownloadFile(_Record):
    path: str  # path inside the repo
    size_bytes: int


class DownloadStarted(BaseEvent):
    """A hub model needs files the local hub cache does not have yet."""

    type: Literal["download_started"] = "download_started"
    repo_id: str
    revision: str  # the commit the files are pinned to
    files: tuple[DownloadFile, ...]
    total_bytes: int


class FileDownloaded(BaseEvent):
    type: Literal["file_downloaded"] = "file_downloaded"
    path: str
    size_bytes: int
    seconds: float


# --- kill ---------------------------------------------------------------------------------


class KillStarted(BaseEvent):
    type: Literal["kill_started"] = "kill_started"
    pid: int
    create_time: float
    reason: KillReason


class KillEscalated(BaseEvent):
    type: Literal["kill_escalated"] = "kill_escalated"
    pid: int


class ProcessExited(BaseEvent):
    type: Literal["process_exited"] = "process_exited"
    pid: int
    returncode: int | None = None  # None when the process was not our child


# --- GPU memory settle ----------------------------------------------------------------------


class SettleStarted(BaseEvent):
    type: Literal["settle_started"] = "settle_started"
    kill_age_s: float | None = None  # None = no kill on record (cold start)


class VramSampled(BaseEvent):
    type: Literal["vram_sampled"] = "vram_sampled"
    free_mib: tuple[tuple[int, int], ...]  # (gpu index, free MiB)


class Settled(BaseEvent):
    type: Literal["settled"] = "settled"
    outcome: SettleKind
    waited_s: float = 0.0
    samples: int = 0


# --- spawn and health -------------------------------------------------------------------------


class SpawnStarted(BaseEvent):
    """Write-ahead intent: journaled before Popen, so a crash mid-spawn is recoverable."""

    type: Literal["spawn_started"] = "spawn_started"
    argv: tuple[str, ...]
    port: int
    marker: str
    log_path: str
    extra_args: tuple[str, ...]
    extra_args_source: str | None = None


class Spawned(BaseEvent):
    type: Literal["spawned"] = "spawned"
    pid: int
    create_time: float
    # Linux process identity, immune to wall-clock steps (None in journals written before it).
    start_ticks: int | None = None
    boot_id: str | None = None


class HealthPassed(BaseEvent):
    type: Literal["health_passed"] = "health_passed"
    waited_s: float


class HealthFailed(BaseEvent):
    type: Literal["health_failed"] = "health_failed"
    error: str
    returncode: int | None = None
    log_tail: str | None = None


# --- unload, crash, recovery ------------------------------------------------------------------


class UnloadRequested(BaseEvent):
    type: Literal["unload_requested"] = "unload_requested"


class Unloaded(BaseEvent):
    type: Literal["unloaded"] = "unloaded"


class Crashed(BaseEvent):
    type: Literal["crashed"] = "crashed"
    pid: int
    returncode: int | None = None
    log_tail: str | None = None


class RecoveryStarted(BaseEvent):
    type: Literal["recovery_started"] = "recovery_started"
    previous_state: str


class RecoveryAdopted(BaseEvent):
    type: Literal["recovery_adopted"] = "recovery_adopted"
    pid: int
    create_time: float
    start_ticks: int | None = None
    boot_id: str | None = None


class OrphanKilled(BaseEvent):
    type: Literal["orphan_killed"] = "orphan_killed"
    pid: int
    create_time: float
    marker: str


class RecoveryFinished(BaseEvent):
    type: Literal["recovery_finished"] = "recovery_finished"
    summary: str


Event = Annotated[
    LoadRequested
    | LoadShortCircuited
    | LoadJoined
    | LoadSuperseded
    | ModelResolved
    | AdmissionChecked
    | LoadCancelled
    | LoadFailed
    | LoadAbandoned
    | LoadSucceeded
    | DownloadStarted
    | FileDownloaded
    | KillStarted
    | KillEscalated
    | ProcessExited
    | SettleStarted
    | VramSampled
    | Settled
    | SpawnStarted
    | Spawned
    | HealthPassed
    | HealthFailed
    | UnloadRequested
    | Unloaded
    | Crashed
    | RecoveryStarted
    | RecoveryAdopted
    | OrphanKilled
    | RecoveryFinished,
    Field(discriminator="type"),
]

EVENT_ADAPTER: TypeAdapter[Event] = TypeAdapter(Event)
# The slot events only: records of other streams (HubProbed) are BaseEvents too, but never
# machine triggers.
EVENT_TYPES: dict[str, type[BaseEvent]] = {
    cls.model_fields["type"].default: cls for cls in get_args(get_args(Event)[0])
}


def parse_event(payload: str | bytes) -> Event:
    """Decode one journaled payload; raises pydantic.ValidationError on garbage."""
    return EVENT_ADAPTER.validate_json(payload)


def dump_event(event: BaseEvent) -> str:
    return event.model_dump_json()


# --- the hub probe cache: its own stream, never a slot's --------------------------------------

# Streams whose name starts with "@" belong to the engine, not to a slot: replay skips them.
HUB_PROBE_STREAM = "@hub-probes"


def is_slot_stream(stream: str) -> bool:
    return not stream.startswith("@")


class HubProbed(BaseEvent):
    """A definitive answer about a hub repo (the latest one per key wins on reload).

    Keyed by the requested repo id casefolded (the hub matches ids case-insensitively) and the
    fingerprint of the token used; the token itself is never stored.
    """

    type: Literal["hub_probed"] = "hub_probed"
    key: str
    token_fingerprint: Fingerprint | None = None
    repo_id: str | None = None  # canonical casing
    commit: str | None = None
    files: tuple[DownloadFile, ...] = ()
    is_vision: bool = False
    error: str | None = None  # definitive refusal: not found, gated, no GGUF in the repo


HUB_PROBED_ADAPTER: TypeAdapter[HubProbed] = TypeAdapter(HubProbed)
