"""Which files of a hub repo a load means (pure): the GGUF variant, split shards, projector.

With no variant named, `PREFERRED_VARIANTS` in order, then the smallest GGUF; a named variant
matches the quantisation tag in a file name case-insensitively (a file name works too). A
split GGUF (`-00001-of-00003.gguf`) is one candidate: every shard, the first one first.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from engine.core import events as ev
from engine.core.errors import StepFailed

# Picked in this order when a request names no variant; then the smallest GGUF in the repo.
PREFERRED_VARIANTS: Final = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0")
# Projector precision, best first; then the smallest mmproj file.
MMPROJ_PREFERENCE: Final = ("F16", "BF16", "Q8_0", "F32")

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:[IT]?Q\d+(?:_[A-Za-z0-9]+)*|BF16|F16|F32|MXFP4(?:_MOE)?))"
    r"(?![A-Za-z0-9])",
    re.IGNORECASE,
)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One model in a repo: a single .gguf file or a complete set of split shards."""

    name: str  # repo path without `.gguf` and without the split suffix
    files: tuple[str, ...]  # repo paths, the first shard first
    size: int
    tag: str | None  # quantisation read from the file name, e.g. "Q4_K_M"
    missing: tuple[int, ...] = ()  # shard numbers absent from the repo

    @property
    def variant(self) -> str:
        return self.tag or self.name.rsplit("/", 1)[-1]


def quant_tag(stem: str) -> str | None:
    """The quantisation named in a file stem (the last one, e.g. `x-Q4_K_M` -> `Q4_K_M`)."""
    found = _QUANT.findall(stem)
    return found[-1] if found else None


def _basename(path: str) -> str:
    return path.rsplit("/", 1)[-1]


def is_mmproj(path: str) -> bool:
    base = _basename(path).lower()
    return base.startswith("mmproj") and base.endswith(".gguf")


def gguf_candidates(files: Sequence[ev.DownloadFile]) -> list[Candidate]:
    """Every model GGUF in a repo listing (projectors excluded), split shards grouped."""
    found: list[Candidate] = []
    shards: dict[tuple[str, int], dict[int, ev.DownloadFile]] = {}
    for file in files:
        if not file.path.lower().endswith(".gguf") or is_mmproj(file.path):
            continue
        split = _SPLIT.match(file.path)
        if split is None:
            stem = file.path[: -len(".gguf")]
            found.append(Candidate(stem, (file.path,), file.size_bytes, quant_tag(_basename(stem))))
            continue
        group = shards.setdefault((split["stem"], int(split["count"])), {})
        group[int(split["index"])] = file
    for (stem, count), parts in shards.items():
        ordered = [parts[i] for i in sorted(parts)]
        missing = tuple(i for i in range(1, count + 1) if i not in parts)
        found.append(
            Candidate(
                stem,
                tuple(p.path for p in ordered),
                sum(p.size_bytes for p in ordered),
                quant_tag(_basename(stem)),
                missing,
            )
        )
    return sorted(found, key=lambda c: c.name)


def _complete(candidate: Candidate, repo_id: str) -> Candidate:
    if candidate.missing:
        numbers = ", ".join(str(i) for i in candidate.missing)
        raise StepFailed(f"{repo_id}: split GGUF {candidate.name!r} lacks shard(s) {numbers}")
    return candidate


def _listing(candidates: Sequence[Candidate]) -> str:
    return ", ".join(sorted({c.variant for c in candidates}))


def pick_variant(candidates: Sequence[Candidate], variant: str | None, repo_id: str) -> Candidate:
    """The candidate a request means; every refusal names what the repo offers."""
    if not candidates:
        raise StepFailed(f"hub repo {repo_id!r} has no GGUF model file")
    if variant is None:
        for preferred in PREFERRED_VARIANTS:
            same = [c for c in candidates if (c.tag or "").casefold() == preferred.casefold()]
            if same:
                return _complete(min(same, key=lambda c: (c.size, c.name)), repo_id)
        return _complete(min(candidates, key=lambda c: (c.size, c.name)), repo_id)
    want = variant.casefold().removesuffix(".gguf")
    matches = [c for c in candidates if (c.tag or "").casefold() == want]
    if not matches:  # a file name, or a tag the regex reads differently (e.g. "UD-Q4_K_XL")
        matches = [
            c
            for c in candidates
            if want in (c.name.casefold(), _basename(c.name).casefold())
            or re.search(rf"(?<![a-z0-9_]){re.escape(want)}(?![a-z0-9_])", c.name.casefold())
        ]
    if not matches:
        raise StepFailed(
            f"gguf_variant {variant!r} is not in hub repo {repo_id!r}; "
            f"it has: {_listing(candidates)}"
        )
    if len(matches) > 1:
        names = ", ".join(c.name for c in matches)
        raise StepFailed(
            f"gguf_variant {variant!r} matches several files in {repo_id!r} ({names}); "
            "name one of them"
        )
    return _complete(matches[0], repo_id)


def pick_mmproj(files: Sequence[ev.DownloadFile]) -> ev.DownloadFile | None:
    """The vision projector to use, if the repo has one (which makes it a vision model)."""
    projectors = [f for f in files if is_mmproj(f.path)]
    for preferred in MMPROJ_PREFERENCE:
        same = [
            f
            for f in projectors
            if (quant_tag(_basename(f.path)[: -len(".gguf")]) or "").casefold()
            == preferred.casefold()
        ]
        if same:
            return min(same, key=lambda f: (f.size_bytes, f.path))
    return min(projectors, key=lambda f: (f.size_bytes, f.path)) if projectors else None
