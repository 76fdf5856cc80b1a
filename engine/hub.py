"""Hub models: probe a repo (cached in the journal), pick the GGUF variant, download with progress.

The one module that talks to `huggingface_hub`. The environment is read at call time
(HF_ENDPOINT, HF_HUB_CACHE / HF_HOME, HF_HUB_OFFLINE, HF_TOKEN) and passed explicitly, because
huggingface_hub freezes most of it into constants when it is first imported.

* Probe: one `model_info` request gives the canonical repo id, the commit and the file list.
  Its definitive answers (including "not found", "gated", "no GGUF") are cached per
  (repo id casefolded, token fingerprint) in the journal stream `@hub-probes`, so they survive
  restarts; transient failures (timeouts, connection errors, 5xx, 429) are never cached.
  Concurrent probes of one key run once; different keys never wait for each other.
* Download: files are pinned to the probed commit, so a model already in the hub cache costs
  no request at all. Progress is reported per chunk (memory) and per file (journal); the
  cancel token is checked between files and at every chunk huggingface_hub hands over
  (10 MiB for plain HTTP downloads).
* Variant: `PREFERRED_VARIANTS` when none is named, else a case-insensitive match of the
  quantisation tag in the file name; split GGUFs download every shard and run the first.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

from pydantic import SecretStr, ValidationError

from engine import events as ev
from engine.effects import Cancelled, CancelToken, DownloadListener, StepFailed
from engine.journal import ConcurrencyConflict, Journal
from engine.local_models import describe_model
from engine.request import token_fingerprint
from engine.rules import HF_TOKEN_PATTERN

log = logging.getLogger("studio-engine")

# Picked in this order when a request names no variant; then the smallest GGUF in the repo.
PREFERRED_VARIANTS: Final = ("Q4_K_M", "Q4_K_S", "Q5_K_M", "Q8_0")
# Projector precision, best first; then the smallest mmproj file.
MMPROJ_PREFERENCE: Final = ("F16", "BF16", "Q8_0", "F32")
DEFAULT_ENDPOINT: Final = "https://huggingface.co"
PROBE_TIMEOUT_S: Final = 10.0
# Cached refusals (not found, gated, no GGUF) are definitive for this long, then re-probed.
ERROR_RETRY_S: Final = 600.0

_SPLIT = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.gguf$", re.IGNORECASE)
_QUANT = re.compile(
    r"(?<![A-Za-z0-9])((?:UD-)?(?:[IT]?Q\d+(?:_[A-Za-z0-9]+)*|BF16|F16|F32|MXFP4(?:_MOE)?))"
    r"(?![A-Za-z0-9])",
    re.IGNORECASE,
)

Key = tuple[str, str | None]  # (repo id casefolded, token fingerprint)


# --- choosing files (pure) ----------------------------------------------------------------------


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


# --- the environment, read at call time ---------------------------------------------------------


def hub_endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def hub_cache_dir() -> Path:
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    home = os.environ.get("HF_HOME") or os.path.join(xdg, "huggingface")
    return Path(home).expanduser() / "hub"


def _is_true(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_offline() -> bool:
    from huggingface_hub import constants

    # huggingface_hub refuses the network if it was offline at import, whatever the env says now.
    env = os.environ
    return (
        _is_true(env.get("HF_HUB_OFFLINE"))
        or _is_true(env.get("TRANSFORMERS_OFFLINE"))
        or bool(constants.HF_HUB_OFFLINE)
    )


def scrub(text: str) -> str:
    """Error text from the hub client, safe for the journal and logs."""
    return HF_TOKEN_PATTERN.sub("hf_***", text).strip().splitlines()[0][:300] if text else ""


# --- the probe cache --------------------------------------------------------------------------


class ProbeCache:
    """Definitive probe answers, persisted in the journal's `@hub-probes` stream.

    The in-memory map is a read-through view of that stream: a miss first catches up with
    rows other engines (or an earlier run) appended, then probes once for all callers.
    """

    def __init__(self, journal: Journal | None) -> None:
        self._journal = journal
        self._entries: dict[Key, ev.HubProbed] = {}
        self._version = 0
        self._lock = threading.Lock()  # guards the maps; never held during I/O
        self._write_lock = threading.Lock()  # our own appends, one at a time
        self._inflight: dict[Key, Future[ev.HubProbed]] = {}
        self._catch_up()

    def cached(self, key: Key) -> ev.HubProbed | None:
        with self._lock:
            return self._entries.get(key)

    def forget(self, key: Key) -> None:
        with self._lock:
            self._entries.pop(key, None)

    def get(
        self,
        key: Key,
        probe: Callable[[], ev.HubProbed],
        cancel: CancelToken,
    ) -> ev.HubProbed:
        """The cached answer for `key`, else `probe()` run once however many callers ask.

        A cached refusal older than `ERROR_RETRY_S` is probed again: "gated" ends when the
        user accepts the terms, "not found" when the repo is created or made public.
        """
        with self._lock:
            hit = _fresh(self._entries.get(key))
            if hit is not None:
                return hit
            flight = self._inflight.get(key)
            owner = flight is None
            if flight is None:
                flight = self._inflight[key] = Future()
        if not owner:
            return _wait(flight, cancel)
        try:
            result = _fresh(self._catch_up(key))
            if result is None:
                result = probe()
                self._store(result)
        except BaseException as exc:
            flight.set_exception(exc)
            raise
        else:
            flight.set_result(result)
            return result
        finally:
            with self._lock:
                del self._inflight[key]

    def _catch_up(self, key: Key | None = None) -> ev.HubProbed | None:
        """Read records appended since we last looked; return `key`'s entry if there is one."""
        if self._journal is None:
            return None
        rows = list(self._journal.read_rows(ev.HUB_PROBE_STREAM, after_version=self._version))
        with self._lock:
            for seq, version, _at, _type, payload in rows:
                try:
                    record = ev.HUB_PROBED_ADAPTER.validate_json(payload)
                except ValidationError:  # a cache may forget; it must not break loads
                    log.warning("ignoring unreadable hub probe record #%d", seq)
                else:
                    self._entries[(record.key, record.token_fingerprint)] = record
                self._version = max(self._version, version)
            return self._entries.get(key) if key is not None else None

    def _store(self, record: ev.HubProbed) -> None:
        with self._write_lock:
            if self._journal is not None:
                for _attempt in range(5):
                    try:
                        self._journal.append(ev.HUB_PROBE_STREAM, self._version, [record])
                    except ConcurrencyConflict:  # another engine appended first: catch up
                        self._catch_up()
                        continue
                    with self._lock:
                        self._version += 1
                    break
                else:  # still served from memory; the next run probes again
                    log.warning("hub probe of %s not persisted: journal kept moving", record.key)
            with self._lock:
                self._entries[(record.key, record.token_fingerprint)] = record


def _fresh(record: ev.HubProbed | None) -> ev.HubProbed | None:
    if record is not None and record.error is not None and time.time() - record.at > ERROR_RETRY_S:
        return None
    return record


def _wait(flight: Future[ev.HubProbed], cancel: CancelToken) -> ev.HubProbed:
    while True:
        cancel.check()
        try:
            return flight.result(timeout=0.05)
        except TimeoutError:
            continue


# --- huggingface_hub's progress hook ----------------------------------------------------------


class _Bar:
    """The `tqdm_class` handed to huggingface_hub: it only forwards byte counts to `report`,
    which may raise `Cancelled` to stop the download at a chunk boundary."""

    report: Callable[[int], None]

    def __init__(self, *args: Any, total: int | None = None, initial: int = 0, **_: Any) -> None:
        self.total = total
        self.n = initial

    def update(self, n: float | None = 1) -> None:
        self.n += int(n or 0)
        type(self).report(self.n)

    def update_transfer(self, n: float | None = 1) -> None:  # xet: bytes on the wire
        pass

    def set_postfix_str(self, *args: Any, **kwargs: Any) -> None:
        pass

    set_transfer_postfix_str = set_postfix_str
    refresh = set_postfix_str

    def close(self) -> None:
        pass

    def __enter__(self) -> _Bar:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


# --- the adapter ------------------------------------------------------------------------------


class Hub:
    def __init__(self, journal: Journal | None = None, *, clock: Callable[[], float] = time.time):
        self.cache = ProbeCache(journal)
        self._clock = clock

    def resolve(
        self,
        spec: ev.LoadSpec,
        cancel: CancelToken,
        *,
        hf_token: SecretStr | None = None,
        listener: DownloadListener | None = None,
    ) -> ev.ResolvedModel:
        cancel.check()
        token = self._token(spec, hf_token)
        key: Key = (spec.model.casefold(), token_fingerprint(token))
        offline = hub_offline()
        cache_dir = hub_cache_dir()
        if offline:
            probe = self.cache.cached(key) or self._probe_local(spec.model, key)
        else:
            probe = self.cache.get(
                key, lambda: self._probe_remote(spec.model, token, key), cancel
            )
        if probe.error is not None:
            raise StepFailed(probe.error)
        assert probe.repo_id is not None and probe.commit is not None
        repo_id, commit = probe.repo_id, probe.commit
        try:
            chosen = pick_variant(gguf_candidates(probe.files), spec.variant, repo_id)
        except StepFailed as exc:
            if offline:  # the listing may be the cache's, which holds only what was downloaded
                raise StepFailed(
                    f"{exc.error} (HF_HUB_OFFLINE is set: the hub cache at {cache_dir} was "
                    "searched, not the hub)"
                ) from None
            raise
        projector = pick_mmproj(probe.files)
        wanted = [*chosen.files, *([projector.path] if projector else [])]
        sizes = {f.path: f.size_bytes for f in probe.files}

        from huggingface_hub import try_to_load_from_cache

        paths: dict[str, str] = {}
        for path in wanted:
            found = try_to_load_from_cache(repo_id, path, cache_dir=cache_dir, revision=commit)
            if isinstance(found, str):
                paths[path] = found
        missing = [p for p in wanted if p not in paths]
        if missing and offline:
            raise StepFailed(
                f"HF_HUB_OFFLINE is set and {repo_id}/{missing[0]} is not in the hub cache "
                f"({cache_dir})"
            )
        if missing and listener is not None:
            listener.started(repo_id, commit, [(p, sizes.get(p, 0)) for p in missing])
        for path in missing:
            cancel.check()
            start = time.monotonic()
            try:
                paths[path] = self._download(
                    repo_id, commit, path, sizes.get(path, 0), token, cancel, listener
                )
            except _GoneFromHub as gone:
                self.cache.forget(key)  # the probed commit is stale: the next load probes again
                raise StepFailed(str(gone)) from None
            if listener is not None:
                listener.finished(path, Path(paths[path]).stat().st_size, time.monotonic() - start)
        cancel.check()
        return describe_model(
            f"hf:{repo_id}",
            Path(paths[chosen.files[0]]),
            mmproj=Path(paths[projector.path]) if projector else None,
            variant=chosen.variant,
            size_bytes=sum(Path(paths[p]).stat().st_size for p in chosen.files),
        )

    @staticmethod
    def _token(spec: ev.LoadSpec, hf_token: SecretStr | None) -> str | None:
        """The request's token, else the environment's (HF_TOKEN, then the saved login)."""
        if hf_token is not None:
            token = hf_token.get_secret_value()
            if token_fingerprint(token) != spec.token_fingerprint:
                raise StepFailed("hf_token does not match the request it came with")
            return token
        if spec.token_fingerprint is not None:
            raise StepFailed("the request's hf_token is not available to this load")
        from huggingface_hub import get_token

        return get_token()

    # --- probing ------------------------------------------------------------------------

    def _record(self, key: Key, **fields: Any) -> ev.HubProbed:
        return ev.HubProbed(at=self._clock(), key=key[0], token_fingerprint=key[1], **fields)

    def _listed(
        self, key: Key, repo_id: str, commit: str, files: list[ev.DownloadFile]
    ) -> ev.HubProbed:
        if not gguf_candidates(files):
            shown = ", ".join(f.path for f in files[:5]) or "no files"
            return self._record(
                key, repo_id=repo_id, error=f"hub repo {repo_id!r} has no GGUF model file ({shown})"
            )
        return self._record(
            key,
            repo_id=repo_id,
            commit=commit,
            files=tuple(files),
            is_vision=pick_mmproj(files) is not None,
        )

    def _probe_remote(self, repo_id: str, token: str | None, key: Key) -> ev.HubProbed:
        from huggingface_hub import HfApi
        from huggingface_hub.errors import (
            DisabledRepoError,
            GatedRepoError,
            RepositoryNotFoundError,
        )

        api = HfApi(endpoint=hub_endpoint(), token=token or False)
        try:
            info = api.model_info(repo_id, files_metadata=True, timeout=PROBE_TIMEOUT_S)
        except GatedRepoError:
            return self._record(
                key,
                error=f"hub repo {repo_id!r} is gated: accept its terms on the hub and pass an "
                "hf_token that has access",
            )
        except RepositoryNotFoundError:
            return self._record(
                key,
                error=f"hub repo {repo_id!r} not found (or private, and the token used has no "
                "access)",
            )
        except DisabledRepoError:
            return self._record(key, error=f"hub repo {repo_id!r} is disabled")
        except Exception as exc:
            raise _transient(f"probing hub repo {repo_id!r}", exc) from None
        if not info.sha:
            raise StepFailed(f"the hub did not say which commit {repo_id!r} is at")
        files = [
            ev.DownloadFile(
                path=s.rfilename, size_bytes=s.size or (s.lfs.size if s.lfs is not None else 0)
            )
            for s in info.siblings or []
        ]
        return self._listed(key, info.id, info.sha, files)

    def _probe_local(self, requested: str, key: Key) -> ev.HubProbed:
        """Offline: what the hub cache holds for the repo (never cached: not the hub's word)."""
        cache_dir = hub_cache_dir()
        owner = requested.split("/", 1)[0]
        wanted = "models--" + requested.replace("/", "--")
        try:
            folder = next(p for p in cache_dir.iterdir() if p.name.casefold() == wanted.casefold())
        except (OSError, StopIteration):
            raise StepFailed(
                f"HF_HUB_OFFLINE is set and {requested} is not in the hub cache ({cache_dir})"
            ) from None
        name = folder.name[len("models--") :]
        repo_id = f"{name[: len(owner)]}/{name[len(owner) + 2 :]}"
        ref = folder / "refs" / "main"
        snapshots = folder / "snapshots"
        if ref.is_file():
            commit = ref.read_text().strip()
        else:  # downloads pinned to a commit write no ref: take the newest snapshot
            found = (
                sorted(snapshots.iterdir(), key=lambda p: p.stat().st_mtime)
                if snapshots.is_dir()
                else []
            )
            if not found:
                raise StepFailed(f"HF_HUB_OFFLINE is set and the hub cache of {repo_id} is empty")
            commit = found[-1].name
        root = snapshots / commit
        files = [
            ev.DownloadFile(path=p.relative_to(root).as_posix(), size_bytes=p.stat().st_size)
            for p in sorted(root.rglob("*"))
            if p.is_file()
        ]
        return self._listed(key, repo_id, commit, files)

    # --- downloading --------------------------------------------------------------------

    def _download(
        self,
        repo_id: str,
        commit: str,
        path: str,
        size: int,
        token: str | None,
        cancel: CancelToken,
        listener: DownloadListener | None,
    ) -> str:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

        def report(done: int) -> None:
            if listener is not None:
                listener.advanced(path, done, size)
            cancel.check()

        report(0)
        bar = type("_FileBar", (_Bar,), {"report": staticmethod(report)})
        try:
            return hf_hub_download(
                repo_id,
                path,
                revision=commit,
                cache_dir=hub_cache_dir(),
                endpoint=hub_endpoint(),
                token=token or False,
                etag_timeout=PROBE_TIMEOUT_S,
                tqdm_class=cast(Any, bar),
            )
        except (RepositoryNotFoundError, RevisionNotFoundError):
            raise _GoneFromHub(
                f"{repo_id}/{path} at {commit[:12]} is gone from the hub; the next load probes "
                "the repo again"
            ) from None
        except (Cancelled, StepFailed):
            raise
        except Exception as exc:
            raise _transient(f"downloading {repo_id}/{path}", exc) from None


class _GoneFromHub(Exception):
    """A file of the cached probe's commit no longer exists on the hub."""


def _transient(what: str, exc: BaseException) -> StepFailed:
    status = getattr(getattr(exc, "response", None), "status_code", None)
    detail = f"HTTP {status}" if status else type(exc).__name__
    text = scrub(str(exc))
    if text:
        detail += f": {text}"
    return StepFailed(f"{what} failed ({detail}); not cached, the next load tries again")
