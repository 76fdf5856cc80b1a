"""Resolving a local .gguf path: identity, header facts, and vision by a sibling mmproj file."""

from __future__ import annotations

from pathlib import Path

from engine.effects import StepFailed
from engine.events import ResolvedModel
from engine.gguf_header import NotAGguf, read_header


def find_mmproj(model_file: Path) -> Path | None:
    """A local model is a vision model iff an `mmproj*.gguf` sits beside it."""
    found = sorted(model_file.parent.glob("mmproj*.gguf"))
    return found[0] if found else None


def resolve_local(model_path: str) -> ResolvedModel:
    path = Path(model_path)
    if not path.is_file():
        raise StepFailed(f"model file not found: {path}")
    try:
        header = read_header(path)
    except NotAGguf as exc:
        raise StepFailed(str(exc)) from exc
    mmproj = find_mmproj(path)
    return ResolvedModel(
        source=f"file:{path}",
        model_file=str(path),
        is_vision=mmproj is not None,
        mmproj_file=str(mmproj) if mmproj else None,
        native_ctx=header.native_ctx,
        architecture=header.architecture,
        size_bytes=path.stat().st_size,
    )
