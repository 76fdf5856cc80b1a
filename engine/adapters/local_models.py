"""Resolving a local .gguf path: identity, header facts, and vision by a sibling mmproj file."""

from __future__ import annotations

from pathlib import Path

from engine.adapters.gguf_header import NotAGguf, read_header
from engine.core.errors import StepFailed
from engine.core.events import ResolvedModel
from engine.core.plan import model_kind
from engine.core.rules import InvalidRequest


def locate_model_file(model_path: str) -> str | None:
    """The resolved path of the local .gguf file `model_path` names; None for a hub repo id.

    Anything that looks like a path must name an existing file: a typo is refused here,
    before the running server is touched, instead of being tried as a repo id.
    """
    looks_local = (
        model_path.startswith(("/", "./", "../", "~"))
        or model_path.lower().endswith(".gguf")
        or Path(model_path).exists()
    )
    if not looks_local:
        return None
    path = Path(model_path).expanduser().resolve()
    if path.is_dir():
        raise InvalidRequest(f"model_path: {path} is a folder; name the .gguf file in it")
    if not path.is_file():
        raise InvalidRequest(f"model_path: no such file: {path}")
    return str(path)


def find_mmproj(model_file: Path) -> Path | None:
    """A local model is a vision model iff an `mmproj*.gguf` sits beside it."""
    found = sorted(model_file.parent.glob("mmproj*.gguf"))
    return found[0] if found else None


def describe_model(
    source: str,
    model_file: Path,
    *,
    mmproj: Path | None = None,
    variant: str | None = None,
    size_bytes: int | None = None,
) -> ResolvedModel:
    """A ResolvedModel with the facts read from the GGUF header (local and hub models alike).

    `size_bytes` overrides the file's size (split GGUFs: the sum of every shard).
    """
    try:
        header = read_header(model_file)
    except NotAGguf as exc:
        raise StepFailed(str(exc), None, "invalid_model_file") from exc
    return ResolvedModel(
        source=source,
        model_file=str(model_file),
        variant=variant,
        is_vision=mmproj is not None,
        mmproj_file=str(mmproj) if mmproj else None,
        native_ctx=header.native_ctx,
        architecture=header.architecture,
        size_bytes=size_bytes if size_bytes is not None else model_file.stat().st_size,
        mmproj_size_bytes=mmproj.stat().st_size if mmproj else 0,
        block_count=header.block_count,
        head_count_kv=header.head_count_kv,
        key_length=header.key_length,
        value_length=header.value_length,
        architecture_type=header.architecture_type,
        kind=model_kind(header.architecture, header.architecture_type, header.pooling_type),
        sliding_window=header.sliding_window,
        swa_layers=header.swa_layers,
        recurrent_layers=header.recurrent_layers,
        recurrent_state_bytes=header.recurrent_state_bytes,
        expert_count=header.expert_count,
    )


def resolve_local(model_path: str) -> ResolvedModel:
    path = Path(model_path)
    if not path.is_file():
        raise StepFailed(f"model file not found: {path}")
    return describe_model(f"file:{path}", path, mmproj=find_mmproj(path))
