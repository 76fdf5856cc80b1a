"""The public request and result types, and how a request becomes a validated `LoadSpec`."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    SecretStr,
    StrictBool,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
)

from engine.core.capabilities import ServerCapabilities
from engine.core.events import LoadSpec
from engine.core.policy import check_extra_args
from engine.core.rules import (
    CACHE_TYPES,
    MAX_CONTEXT,
    MAX_SLOTS,
    SPECULATIVE_TYPES,
    InvalidRequest,
    check_text,
)
from engine.core.state import LoadedModel

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


class LoadRequest(BaseModel):
    """What the Studio backend asks for. Field names match today's Studio backends."""

    # Strict: `max_seq_length=True` is not 1 and `"512"` is not 512; a bad type names its field.
    model_config = ConfigDict(frozen=True, extra="forbid")

    model_path: StrictStr
    gguf_variant: StrictStr | None = None
    max_seq_length: StrictInt | None = None  # None = not set (inherit), 0 = model native
    cache_type_kv: StrictStr | None = None
    speculative_type: StrictStr | None = None
    chat_template_override: StrictStr | None = None
    llama_extra_args: list[StrictStr] | None = None  # None = inherit, [] = clear
    hf_token: SecretStr | None = None
    force: StrictBool = False
    parallel_slots: StrictInt | None = None  # None = 4 with --kv-unified when supported, else 1

    @field_validator("llama_extra_args", mode="before")
    @classmethod
    def _args_are_a_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            raise ValueError("must be a list of strings (one token each), not one string")
        return value


def as_request(request: LoadRequest | dict[str, Any]) -> LoadRequest:
    """A dict becomes a LoadRequest; a refusal names the field it is about."""
    if isinstance(request, LoadRequest):
        return request
    try:
        return LoadRequest(**request)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise InvalidRequest(f"{field}: {first['msg']}") from None


def to_spec(
    request: LoadRequest | dict[str, Any],
    locate: Callable[[str], str | None],
    *,
    capabilities: ServerCapabilities,
    allow_flags: frozenset[str] = frozenset(),
) -> LoadSpec:
    """Validate and normalise; every refusal names the field or flag it is about.

    `locate(model_path)` is the file system's answer (engine.adapters.local_models): the
    resolved path of a local model file, None for a hub repo id, InvalidRequest otherwise.
    Extra args come out canonical (engine.core.policy), checked against what the binary
    (`capabilities`) knows and the operator's `allow_flags`.
    """
    request = as_request(request)
    for field in ("model_path", "gguf_variant", "cache_type_kv", "speculative_type"):
        value = getattr(request, field)
        if value is not None:
            check_text(field, value)
    if request.chat_template_override is not None:
        # Templates are multi-line text: newlines and tabs are fine, other controls are not.
        check_text(
            "chat_template_override", re.sub(r"[\n\r\t]", " ", request.chat_template_override)
        )
    extra_args = request.llama_extra_args
    if extra_args is not None:
        extra_args = list(check_extra_args(extra_args, capabilities, allow_flags))

    model = request.model_path.strip()
    if not model:
        raise InvalidRequest("model_path: must not be empty")
    local = locate(model)
    if local is not None:
        model = local
    elif not _REPO_ID.match(model):
        raise InvalidRequest(
            f"model_path: {model!r} is neither an existing .gguf file nor a hub repo id "
            "like 'owner/name'"
        )

    ctx = request.max_seq_length
    if ctx is not None and not 0 <= ctx <= MAX_CONTEXT:
        raise InvalidRequest(f"max_seq_length: must be in 0..{MAX_CONTEXT} (0 = native), got {ctx}")
    slots = request.parallel_slots
    if slots is not None and not 1 <= slots <= MAX_SLOTS:
        raise InvalidRequest(f"parallel_slots: must be in 1..{MAX_SLOTS}, got {slots}")
    cache = (request.cache_type_kv or "").strip().lower() or None
    if cache is not None and cache not in CACHE_TYPES:
        raise InvalidRequest(
            f"cache_type_kv: {request.cache_type_kv!r} is not one of "
            f"{', '.join(sorted(CACHE_TYPES))}"
        )
    speculative = (request.speculative_type or "").strip().lower() or None
    if speculative is not None and speculative not in SPECULATIVE_TYPES:
        raise InvalidRequest(
            f"speculative_type: {request.speculative_type!r} is not one of "
            f"{', '.join(sorted(SPECULATIVE_TYPES))}"
        )
    variant = (request.gguf_variant or "").strip() or None
    token = request.hf_token.get_secret_value() if request.hf_token is not None else None
    return LoadSpec(
        model=model,
        variant=variant,
        max_seq_length=ctx,
        cache_type_kv=cache,
        speculative_type=speculative,
        chat_template_override=request.chat_template_override,
        extra_args=tuple(extra_args) if extra_args is not None else None,
        token_fingerprint=token_fingerprint(token),
        force=request.force,
        parallel_slots=slots,
    )


def token_fingerprint(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest() if token else None


LoadStatus = Literal["loaded", "already_loaded", "cancelled", "failed"]


@dataclass(frozen=True, slots=True)
class LoadResult:
    status: LoadStatus
    load_id: str
    state: str
    pid: int | None = None
    port: int | None = None
    model_file: str | None = None
    error: str | None = None
    log_tail: str | None = None
    joined: bool = False  # this call joined an identical load already in flight
    api_key: SecretStr | None = None  # the server's key (memory only; None = no key)
    failure_kind: str | None = None  # engine.core.failure.FailureKind of a failed load
    fallback_reason: str | None = None  # what the server gave up to start (the retry ladder)

    @property
    def ok(self) -> bool:
        return self.status in ("loaded", "already_loaded")


@dataclass(frozen=True, slots=True)
class Status:
    """A consistent snapshot of the slot; never waits for a load in progress."""

    state: str
    slot: str
    pid: int | None
    port: int | None
    model_path: str | None  # what the request named (path or repo id)
    model_file: str | None  # the GGUF file the server runs
    variant: str | None
    settings: dict[str, Any]
    extra_args: tuple[str, ...]
    extra_args_source: str | None
    loading: str | None  # load id in flight
    queued_loads: int  # load calls accepted and not yet returned (in flight + waiting)
    last_error: str | None
    journal_version: int
    api_key: SecretStr | None = None  # send as `Authorization: Bearer ...` (never journaled)
    base_url: str | None = None  # http://127.0.0.1:PORT, or http://localhost over `socket_path`
    socket_path: str | None = None  # listen="unix": the server's Unix socket
    # The launch: what the server reported (context_length, parallel_slots from /props), the
    # plan's fit ceiling, GPUs and offload, and the model's native context and kind.
    context_length: int | None = None
    max_context_length: int | None = None
    native_context_length: int | None = None
    parallel_slots: int | None = None
    gpus: tuple[int, ...] = ()
    offload: str | None = None  # "full" | "partial" | "cpu"
    kind: str | None = None  # "chat" | "embedding" | "rerank"
    last_failure_kind: str | None = None  # engine.core.failure.FailureKind (crash or load)
    fallback_reason: str | None = None  # what the serving process gave up (the retry ladder)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def launch_status(served: LoadedModel | None) -> dict[str, Any]:
    """Status fields of the launch: the server's own figures (/props) over the plan's."""
    if served is None:
        return {}
    plan, props = served.plan, served.props
    kind = served.model.kind
    return dict(
        context_length=props.n_ctx if props is not None else None,
        max_context_length=plan.max_context if plan is not None else None,
        native_context_length=(
            plan.native_context if plan is not None else served.model.native_ctx
        ),
        parallel_slots=(
            props.total_slots
            if props is not None and props.total_slots is not None
            else plan.parallel_slots
            if plan is not None
            else None
        ),
        gpus=plan.gpus if plan is not None else (),
        offload=plan.offload if plan is not None else None,
        kind=kind,
    )
