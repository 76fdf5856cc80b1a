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
* Variant: engine.core.variants picks the files; split GGUFs download every shard, run the first.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final, cast

from pydantic import SecretStr

from engine.adapters.journal import Journal
from engine.adapters.local_models import describe_model
from engine.adapters.probe_cache import Key, ProbeCache
from engine.core import events as ev
from engine.core.errors import StepFailed
from engine.core.request import token_fingerprint
from engine.core.scrub import scrub as scrub_secrets
from engine.core.variants import gguf_candidates, pick_mmproj, pick_variant
from engine.effects import Cancelled, CancelToken, DownloadListener

log = logging.getLogger("studio-engine")

DEFAULT_ENDPOINT: Final = "https://huggingface.co"
PROBE_TIMEOUT_S: Final = 10.0


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
    return scrub_secrets(text).strip().splitlines()[0][:300] if text.strip() else ""


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
    def __init__(self, journal: Journal | None = None) -> None:
        self.cache = ProbeCache(journal)

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
            probe = self.cache.get(key, lambda: self._probe_remote(spec.model, token, key), cancel)
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
        return ev.HubProbed(at=time.time(), key=key[0], token_fingerprint=key[1], **fields)

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
