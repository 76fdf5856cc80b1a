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

from engine.core.failure import Change, FailureKind

SCHEMA_VERSION = 1

KillReason = Literal["replace", "unload", "cancel", "failure", "recovery"]
SettleKind = Literal["stable", "timeout", "cpu-only", "probe-error", "cold", "stale", "gpu-change"]
AbandonOutcome = Literal["cancelled", "failed", "refused"]
# chat: --jinja; embedding: --embedding; rerank: --reranking; projector: never served alone.
ModelKind = Literal["chat", "embedding", "rerank", "projector"]
Offload = Literal["full", "partial", "cpu"]  # all layers on GPU, split with RAM, no GPU
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
    parallel_slots: int | None = None  # None = the planner's default (4 with --kv-unified, else 1)


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
    # Launch-planning facts (absent from journals written before them: None = unknown).
    architecture_type: str | None = None  # general.type: "model", "mmproj", ...
    kind: ModelKind = "chat"
    sliding_window: int | None = None  # tokens a sliding-window layer attends to
    swa_layers: int | None = None  # how many layers use the sliding window
    recurrent_layers: int | None = None  # SSM layers: a fixed state per sequence, no KV
    recurrent_state_bytes: int | None = None  # per recurrent layer and sequence
    expert_count: int | None = None  # MoE: informative (the file size holds the experts)


class BinaryIdentity(_Record):
    """The llama-server a process runs: a changed binary is a different target."""

    path: str
    size_bytes: int
    mtime_ns: int
    version: str = ""


class BaseEvent(_Record):
    schema_version: int = SCHEMA_VERSION
    at: float  # wall-clock seconds since the epoch; the orchestrator's clock
    load_id: str | None = None

    @property
    def kind(self) -> str:
        """The record's type, for readers of any stream (each subclass has a `type` literal)."""
        return str(getattr(self, "type", type(self).__name__))


# --- loads ------------------------------------------------------------------------------


class LoadRequested(BaseEvent):
    type: Literal["load_requested"] = "load_requested"
    spec: LoadSpec
    reason: str | None = None  # why it is not a duplicate of what serves (None: nothing serves)


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
    failure_kind: FailureKind | None = None  # engine.core.failure (None: not a server failure)


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


# --- launch planning ----------------------------------------------------------------------


class GpuInfo(_Record):
    index: int  # NVML index (physical; what CUDA_VISIBLE_DEVICES names)
    uuid: str = ""
    total_bytes: int
    free_bytes: int


class Inventory(_Record):
    """What the host has when the launch is planned (after the previous server settled)."""

    gpus: tuple[GpuInfo, ...] = ()
    ram_total_bytes: int  # the cgroup limit when one applies, else physical memory
    ram_available_bytes: int
    ram_source: str = "host"  # "host", "cgroup v2" or "cgroup v1"


class PlanRequest(_Record):
    """What the load pins down: an explicit context is never shrunk."""

    context: int | None = None  # None = auto-fit; 0 (native) is resolved before planning
    parallel_slots: int | None = None  # None = the default
    cache_type_kv: str | None = None


class PlanPolicy(_Record):
    fit_fraction: float = Field(default=0.97, ge=0.80, le=1.00)
    supports_kv_unified: bool = False
    supports_fit: bool = False


class DeviceBudget(_Record):
    index: int  # GPU index; -1 = host RAM (CPU-only host)
    budget_bytes: int  # free minus the reserve the policy keeps
    planned_bytes: int  # what this plan puts there (0 for a device not chosen)


class LaunchPlan(_Record):
    context: int
    max_context: int  # the fit ceiling: the largest aligned context that fits
    native_context: int
    parallel_slots: int
    kv_unified: bool
    gpus: tuple[int, ...]  # CUDA_VISIBLE_DEVICES, in this order (empty: not set)
    offload: Offload
    flags: tuple[str, ...]  # -ngl/--fit flags for the command line
    devices: tuple[DeviceBudget, ...]
    weights_bytes: int
    kv_cache_bytes: int
    need_bytes: int
    reason: str


class LaunchPlanned(BaseEvent):
    """The pure planner's inputs and its decision, between admission and spawn."""

    type: Literal["launch_planned"] = "launch_planned"
    plan: LaunchPlan  # first: the decision leads in timelines, its inputs follow
    request: PlanRequest
    policy: PlanPolicy
    inventory: Inventory


class ServerProps(_Record):
    """What the running server says it got (`GET /props`); the truth over the plan."""

    n_ctx: int | None = None
    total_slots: int | None = None
    model_alias: str | None = None
    build_info: str | None = None
    error: str | None = None  # /props could not be read; the load still succeeds


class ServerPropsRead(BaseEvent):
    type: Literal["server_props_read"] = "server_props_read"
    props: ServerProps


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
    socket_path: str | None = None  # listen="unix": where the server listens instead of a port
    binary: BinaryIdentity | None = None
    cuda_visible_devices: str | None = None  # set in the child's environment when not None


class Spawned(BaseEvent):
    type: Literal["spawned"] = "spawned"
    pid: int
    create_time: float
    # Linux process identity, immune to wall-clock steps (None in journals written before it).
    start_ticks: int | None = None
    boot_id: str | None = None


class SpawnRetried(BaseEvent):
    """A rung of the retry ladder (engine.core.failure.next_rung): the spawned server failed
    in a way a changed command line may fix; it is confirmed dead, and the load spawns again
    with `change` (a new port when a foreign listener held it)."""

    type: Literal["spawn_retried"] = "spawn_retried"
    attempt: int  # 1 for the first retry
    failure_kind: FailureKind
    port: int  # the failed server's port
    change: Change = "new_port"  # journals before the ladder only retried on new ports


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
    reason: Literal["idle"] | None = None  # idle: Engine.open(idle_unload_after=...)


class Unloaded(BaseEvent):
    type: Literal["unloaded"] = "unloaded"


class Crashed(BaseEvent):
    type: Literal["crashed"] = "crashed"
    pid: int
    returncode: int | None = None
    log_tail: str | None = None
    failure_kind: FailureKind | None = None  # None in journals written before classification


class RespawnRequested(BaseEvent):
    """`Engine.ensure_ready` (or the monitor, respawn="immediate") brings back the last
    successful load after a crash or an idle unload; a load_requested follows."""

    type: Literal["respawn_requested"] = "respawn_requested"
    after_crash_seq: int | None = None  # the slot stream version of the crash (None: idle)
    reason: Literal["crash", "idle"] = "crash"


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
    | LaunchPlanned
    | ServerPropsRead
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
    | SpawnRetried
    | HealthPassed
    | HealthFailed
    | UnloadRequested
    | Unloaded
    | Crashed
    | RespawnRequested
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


# --- the capability probe cache: one record per llama-server binary identity -------------------

CAPABILITIES_STREAM = "@capabilities"


class CapabilitiesProbed(BaseEvent):
    """`llama-server --help` of one binary, keyed by its identity (path, size, mtime).

    The help text itself is stored (not the parsed flags), so a better parser reads old
    records correctly; engine.core.capabilities.parse_help turns it into flags.
    """

    type: Literal["capabilities_probed"] = "capabilities_probed"
    binary: str
    size_bytes: int
    mtime_ns: int
    help_text: str


CAPABILITIES_PROBED_ADAPTER: TypeAdapter[CapabilitiesProbed] = TypeAdapter(CapabilitiesProbed)


# --- files the engine deleted: server logs past retention, keys of dead servers -----------------

RUN_FILES_STREAM = "@run-files"


class LogsPruned(BaseEvent):
    """Server logs (and the keys of those servers) deleted by the retention policy
    (engine.core.retention): the last 50 loads per slot, failed ones for 7 days."""

    type: Literal["logs_pruned"] = "logs_pruned"
    slot: str
    load_ids: tuple[str, ...]
