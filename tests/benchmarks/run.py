"""`make bench`: figures and ratios measured side by side in one run (no assertions).

python -m tests.benchmarks.run [--quick]
"""

from __future__ import annotations

import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx

from engine.adapters.journal import Journal
from engine.cli.tiny_model import write_tiny_model
from engine.core import events as ev
from engine.core.request import LoadRequest
from engine.orchestrator import Engine
from engine.replay import replay_state


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _row(name: str, value: str, target: str = "") -> None:
    print(f"  {name:46} {value:>28}   {target}")


def bench_append(folder: Path, n: int) -> None:
    """Durable append (WAL, synchronous=FULL) through the journal vs a raw sqlite3 loop."""
    event = ev.LoadJoined(at=time.time(), load_id="bench", joined_load_id="other")
    payload = event.model_dump_json()

    raw_path = folder / "raw.db"
    raw = sqlite3.connect(raw_path, isolation_level=None)
    raw.execute("PRAGMA journal_mode=WAL")
    raw.execute("PRAGMA synchronous=FULL")
    raw.execute("PRAGMA busy_timeout=5000")
    raw.execute(
        "CREATE TABLE events (seq INTEGER PRIMARY KEY, stream TEXT, version INT, "
        "type TEXT, schema_version INT, at REAL, payload TEXT, load_id TEXT, "
        "UNIQUE(stream, version))"
    )

    def raw_append(version: int) -> None:
        raw.execute("BEGIN")
        raw.execute(
            "INSERT INTO events (stream, version, type, schema_version, at, payload, "
            "load_id) VALUES (?,?,?,?,?,?,?)",
            ("default", version, "load_joined", 1, event.at, payload, "bench"),
        )
        raw.execute("COMMIT")

    journal = Journal.open(folder / "engine.db")

    def engine_append(version: int) -> None:
        journal.append("default", version - 1, [event])

    timings: dict[str, list[float]] = {"raw": [], "engine": []}
    # Interleave the two so disk hiccups hit both alike.
    for version in range(1, n + 1):
        for name, fn in (("raw", raw_append), ("engine", engine_append)):
            t = time.perf_counter()
            fn(version)
            timings[name].append(time.perf_counter() - t)
    journal.close()
    raw.close()
    raw_med, eng_med = statistics.median(timings["raw"]), statistics.median(timings["engine"])
    _row(
        "append, raw sqlite3 (median / p99)",
        f"{raw_med * 1e6:.0f} / {_pct(timings['raw'], 0.99) * 1e6:.0f} µs",
    )
    _row(
        "append, journal (median / p99)",
        f"{eng_med * 1e6:.0f} / {_pct(timings['engine'], 0.99) * 1e6:.0f} µs",
    )
    _row("append ratio journal/raw (median)", f"{eng_med / raw_med:.2f}x", "target <= 1.25")


CYCLE: list[Callable[[float], ev.BaseEvent]] = [
    lambda at: ev.LoadRequested(at=at, load_id="l", spec=ev.LoadSpec(model="/m/a.gguf")),
    lambda at: ev.ModelResolved(
        at=at,
        load_id="l",
        model=ev.ResolvedModel(source="file:/m/a.gguf", model_file="/m/a.gguf", native_ctx=2048),
    ),
    lambda at: ev.SettleStarted(at=at, load_id="l"),
    lambda at: ev.Settled(at=at, load_id="l", outcome="cold"),
    lambda at: ev.SpawnStarted(
        at=at,
        load_id="l",
        argv=("llama-server", "-m", "/m/a.gguf"),
        port=8080,
        marker="j/default/l",
        log_path="/l.log",
        extra_args=("--top-k", "20"),
        extra_args_source="file:/m/a.gguf",
    ),
    lambda at: ev.Spawned(at=at, load_id="l", pid=42, create_time=1.0),
    lambda at: ev.HealthPassed(at=at, load_id="l", waited_s=0.02),
    lambda at: ev.LoadSucceeded(at=at, load_id="l"),
    lambda at: ev.LoadShortCircuited(at=at, load_id="m", spec=ev.LoadSpec(model="/m/a.gguf")),
    lambda at: ev.UnloadRequested(at=at),
    lambda at: ev.KillStarted(at=at, pid=42, create_time=1.0, reason="unload"),
    lambda at: ev.ProcessExited(at=at, pid=42, returncode=0),
    lambda at: ev.Unloaded(at=at),
]


def write_journal(path: Path, n: int) -> None:
    journal = Journal.open(path, synchronous="OFF")
    batch: list[ev.BaseEvent] = []
    version = 0
    for i in range(n):
        batch.append(CYCLE[i % len(CYCLE)](1.8e9 + i))
        if len(batch) == 5000:
            journal.append("default", version, batch)
            version += len(batch)
            batch = []
    journal.append("default", version, batch)
    journal.close()


def bench_replay(folder: Path, n: int) -> None:
    path = folder / "replay.db"
    write_journal(path, n)
    journal = Journal.open(path)
    runs = []
    for _ in range(3):
        t = time.perf_counter()
        state = replay_state(journal.read_rows("default"))
        runs.append(time.perf_counter() - t)
        assert state.version == n
    t = time.perf_counter()
    count = sum(1 for _ in journal.read_rows("default"))
    read_only = time.perf_counter() - t
    t = time.perf_counter()
    for row in journal.read_rows("default"):
        json.loads(row[4])
    read_json = time.perf_counter() - t
    journal.close()
    best = min(runs)
    _row(f"full replay of {n:,} events", f"{n / best:,.0f} events/s", "target >= 100,000")
    _row("  for reference: SQLAlchemy read only", f"{count / read_only:,.0f} rows/s")
    _row("  for reference: read + json.loads", f"{count / read_json:,.0f} rows/s")


def bench_reload(folder: Path, rounds: int) -> None:
    """load() to healthy, minus a bare Popen + /health loop of the same argv."""
    model = write_tiny_model(folder / "tiny.gguf")
    engine = Engine.open(folder / "reload.db", run_dir=folder / "run")
    client = httpx.Client(trust_env=False, timeout=2.0)
    env = {**os.environ, **engine.effects.processes._env}  # type: ignore[attr-defined]
    engine_times, bare_times, short_circuit = [], [], []
    try:
        for i in range(rounds):
            request = LoadRequest(model_path=str(model), max_seq_length=512 + (i % 2) * 256)
            t = time.perf_counter()
            result = engine.load(request)
            engine_times.append(time.perf_counter() - t)
            assert result.status == "loaded", result
            for _ in range(20):
                t = time.perf_counter()
                assert engine.load(request).status == "already_loaded"
                short_circuit.append(time.perf_counter() - t)
            argv = without_key_file(engine.state.serving.argv)  # type: ignore[union-attr]
            engine.unload()
            port = engine.effects.free_port()
            argv[argv.index("--port") + 1] = str(port)
            t = time.perf_counter()
            bare = subprocess.Popen(
                argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
            )
            while True:
                try:
                    if client.get(f"http://127.0.0.1:{port}/health").status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.001)
            bare_times.append(time.perf_counter() - t)
            bare.terminate()
            bare.wait()
    finally:
        client.close()
        engine.close()
    eng_med, bare_med = statistics.median(engine_times), statistics.median(bare_times)
    _row("load() to healthy, tiny model (median)", f"{eng_med * 1000:.1f} ms")
    _row("bare Popen + /health poll, same argv", f"{bare_med * 1000:.1f} ms")
    _row(
        "reload overhead (difference of medians)",
        f"{(eng_med - bare_med) * 1000:.1f} ms",
        "target <= 30 ms",
    )
    _row(
        "short-circuit load() (median / p99)",
        f"{statistics.median(short_circuit) * 1000:.3f} / "
        f"{_pct(short_circuit, 0.99) * 1000:.3f} ms",
        "target <= 0.25 ms median",
    )


def without_key_file(argv: Sequence[str]) -> list[str]:
    """`argv` minus `--api-key-file FILE`: a bare server of the same argv needs no key."""
    out = list(argv)
    if "--api-key-file" in out:
        at = out.index("--api-key-file")
        del out[at : at + 2]
    return out


def bench_kill(folder: Path, rounds: int) -> None:
    """Unload of a ready tiny-model server vs a bare Popen + SIGTERM + wait of the same argv,
    and a changed-setting reload vs a bare SIGTERM + wait + Popen + /health, interleaved."""
    model = write_tiny_model(folder / "kill.gguf")
    engine = Engine.open(folder / "kill.db", run_dir=folder / "run-kill")
    env = {**os.environ, **engine.effects.processes._env}  # type: ignore[attr-defined]
    client = httpx.Client(trust_env=False, timeout=2.0, headers={"Connection": "close"})

    def bare_start(argv: list[str], ctx: str | None = None) -> subprocess.Popen[bytes]:
        argv = without_key_file(argv)  # the engine deleted that key with its server
        argv[argv.index("--port") + 1] = str(engine.effects.free_port())
        if ctx is not None:
            argv[argv.index("-c") + 1] = ctx
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{argv[argv.index('--port') + 1]}/health"
        while proc.poll() is None:
            try:
                if client.get(url).status_code == 200:
                    return proc
            except httpx.HTTPError:
                pass
            time.sleep(0.001)
        raise RuntimeError(f"bare llama-server exited with {proc.returncode}: {argv}")

    def bare_stop(proc: subprocess.Popen[bytes]) -> None:
        # Like the engine: SIGTERM, then SIGKILL after a grace. llama-server can miss a SIGTERM
        # that lands right after its first healthy answer (it then never exits on its own).
        proc.terminate()
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    unload, bare_kill, reload, bare_reload = [], [], [], []
    try:
        for _ in range(rounds):
            assert engine.load(LoadRequest(model_path=str(model), max_seq_length=512)).status == (
                "loaded"
            )
            argv = list(engine.state.serving.argv)  # type: ignore[union-attr]
            t = time.perf_counter()
            changed = engine.load(LoadRequest(model_path=str(model), max_seq_length=768))
            reload.append(time.perf_counter() - t)
            assert changed.status == "loaded", changed
            t = time.perf_counter()
            engine.unload()
            unload.append(time.perf_counter() - t)

            bare = bare_start(argv)
            t = time.perf_counter()
            bare_stop(bare)
            bare_kill.append(time.perf_counter() - t)

            bare = bare_start(argv)
            t = time.perf_counter()
            bare_stop(bare)
            bare = bare_start(argv, ctx="768")
            bare_reload.append(time.perf_counter() - t)
            bare_stop(bare)
    finally:
        client.close()
        engine.close()
    med = statistics.median
    _row("unload of a ready server (median)", f"{med(unload) * 1000:.1f} ms", "target <= 15 ms")
    _row("bare Popen + SIGTERM + wait, same argv", f"{med(bare_kill) * 1000:.1f} ms")
    _row("unload ratio engine/bare (median)", f"{med(unload) / med(bare_kill):.2f}x", "<= 1.5")
    _row("changed-setting reload (median)", f"{med(reload) * 1000:.1f} ms")
    _row("bare SIGTERM + wait + Popen + /health", f"{med(bare_reload) * 1000:.1f} ms")
    _row("reload ratio engine/bare (median)", f"{med(reload) / med(bare_reload):.2f}x")


def bench_open_binary(folder: Path, rounds: int) -> None:
    """Engine.open as a backend calls it: locate llama-server (its --version cached by binary
    identity), open the journal, take the lease, replay, scan for our processes."""
    path = folder / "open-binary.db"
    Engine.open(path, run_dir=folder / "run-open").close()  # the first check fills the cache
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        engine = Engine.open(path, run_dir=folder / "run-open")
        times.append(time.perf_counter() - t)
        engine.close()
    _row(
        "Engine.open, known binary (median / p99)",
        f"{statistics.median(times) * 1000:.1f} / {_pct(times, 0.99) * 1000:.1f} ms",
        "target <= 20 ms",
    )


def _template_rows(version: int, count: int, at: float) -> Iterator[tuple[Any, ...]]:
    """`count` rows from `version` + 1 that leave the slot idle: load_joined padding, then whole
    CYCLEs. Payloads are rendered once per cycle position and only the time is patched in."""
    templates = [
        (e.type, e.load_id, e.model_dump_json())  # type: ignore[attr-defined]
        for e in (make(0.0) for make in CYCLE)
    ]
    pad = ev.LoadJoined(at=0.0, load_id="p", joined_load_id="q")
    pad_row = (pad.type, pad.load_id, pad.model_dump_json())
    pads = count % len(CYCLE)
    for i in range(count):
        kind, load_id, payload = pad_row if i < pads else templates[(i - pads) % len(CYCLE)]
        t = at + i * 0.001
        payload = payload.replace('"at":0.0', f'"at":{t!r}')
        yield ("default", version + i + 1, kind, 1, t, payload, load_id)


def bulk_write(path: Path, version: int, count: int, at: float) -> None:
    """The fast path for big journals: one sqlite3 executemany, not Engine appends."""
    Journal.open(path, synchronous="OFF").close()  # schema at head, by Alembic
    db = sqlite3.connect(path)
    db.execute("PRAGMA synchronous=OFF")
    with db:
        db.executemany(
            "INSERT INTO events (stream, version, type, schema_version, at, payload, load_id) "
            "VALUES (?,?,?,?,?,?,?)",
            _template_rows(version, count, at),
        )
    db.close()


def bench_open(folder: Path, sizes: tuple[int, ...]) -> None:
    """Engine.open (lease, replay, recovery scan with real effects) vs journal length.

    Worst case for snapshots: the newest one is `SNAPSHOT_EVERY - 1` events old."""
    from engine.adapters.binary import locate_server
    from engine.adapters.runtime import RealEffects
    from engine.replay import SNAPSHOT_EVERY, open_state

    binary = locate_server()

    def timed_open(path: Path, every: int) -> float:
        effects = RealEffects(binary, folder / "run")
        t = time.perf_counter()
        engine = Engine.open(path, effects=effects, monitor=False, snapshot_every=every)
        took = time.perf_counter() - t
        assert engine.state.state == "idle", engine.state.state
        engine.close()
        return took

    def measure(n: int, every: int, with_full_replay: bool) -> None:
        path = folder / f"open-{n}-{every}.db"
        tail = min(every - 1, n // 2)
        t = time.perf_counter()
        bulk_write(path, 0, n - tail, 1.8e9)
        journal = Journal.open(path)
        open_state(journal, "default", 1)  # stores the snapshot an engine would have written
        journal.close()
        bulk_write(path, n - tail, tail, 1.9e9)
        setup = time.perf_counter() - t
        if with_full_replay:
            runs = 1 if n >= 1_000_000 else 3
            without = statistics.median(timed_open(path, 0) for _ in range(runs))
            _row(f"open, {n:,} events, snapshots off", f"{without * 1000:,.0f} ms")

        def after_crash() -> float:
            # close() stores a snapshot; drop it so each run replays the worst-case tail.
            db = sqlite3.connect(path)
            with db:
                db.execute("DELETE FROM snapshots WHERE version > ?", (n - tail,))
            db.close()
            return timed_open(path, every)

        crashed = statistics.median(after_crash() for _ in range(5))
        clean = statistics.median(timed_open(path, every) for _ in range(5))
        _row(
            f"open, {n:,} events, snapshot every {every:,}: crash / clean",
            f"{crashed * 1000:.1f} / {clean * 1000:.1f} ms",
            "target <= 20 ms, flat",
        )
        _row(f"  (journal written in bulk in {setup:.1f} s, {tail} events after snapshot)", "")

    for n in sizes:
        measure(n, SNAPSHOT_EVERY, with_full_replay=True)
    # The knob: a shorter interval bounds the replayed tail after a crash.
    measure(sizes[-1], SNAPSHOT_EVERY // 4, with_full_replay=False)


def bench_snapshot_append(folder: Path, n: int) -> None:
    """What a snapshot adds to the append that carries it (once every SNAPSHOT_EVERY events)."""
    from engine.core.snapshot import encode
    from engine.replay import SNAPSHOT_EVERY

    journal = Journal.open(folder / "snap.db")
    event = ev.LoadJoined(at=time.time(), load_id="bench", joined_load_id="other")
    state = replay_state([])
    plain, carrying = [], []
    for version in range(1, 2 * n, 2):
        t = time.perf_counter()
        journal.append("default", version - 1, [event])
        plain.append(time.perf_counter() - t)
        t = time.perf_counter()
        snapshot = (version + 1, event.at, encode(state))
        journal.append("default", version, [event], snapshot)
        carrying.append(time.perf_counter() - t)
    journal.close()
    extra = statistics.median(carrying) - statistics.median(plain)
    _row(
        "append carrying a snapshot, extra (median)",
        f"{extra * 1e6:.0f} µs = {extra / SNAPSHOT_EVERY * 1e6:.2f} µs/event",
        "amortised over the interval",
    )


def bench_settle() -> None:
    from engine.adapters.gpu import NvmlProbe, wait_for_settle

    calls = 0

    def probe() -> list[tuple[int, int]]:
        nonlocal calls
        calls += 1
        return []

    t = time.perf_counter()
    cold = wait_for_settle(probe, 0.0)
    cold_s = time.perf_counter() - t
    cold_calls = calls
    t = time.perf_counter()
    stale = wait_for_settle(probe, time.monotonic() - 60)
    stale_s = time.perf_counter() - t
    _row("settle, cold start", f"{cold.kind}, {cold_calls} probes, {cold_s * 1e6:.1f} µs")
    _row(
        "settle, kill older than 15 s",
        f"{stale.kind}, {calls - cold_calls} probes, {stale_s * 1e6:.1f} µs",
    )
    before = calls
    t = time.perf_counter()
    cpu = wait_for_settle(probe, time.monotonic())
    _row(
        "settle, unknown host, first probe finds no GPU",
        f"{cpu.kind}, {calls - before} probe, {(time.perf_counter() - t) * 1e6:.0f} µs",
    )
    # What the engine does: NVML (initialised once per engine) already says there is no GPU.
    nvml = NvmlProbe()
    gpus = nvml.gpu_count()
    before = calls
    t = time.perf_counter()
    known = wait_for_settle(probe, time.monotonic(), gpus_present=gpus > 0)
    _row(
        f"settle, this host ({gpus} GPUs), recent kill",
        f"{known.kind}, {calls - before} probes, {(time.perf_counter() - t) * 1e6:.1f} µs",
        "target 0 probes on CPU-only",
    )
    nvml.close()


def bench_hub_repeat(folder: Path, rounds: int) -> None:
    """Repeat load of a hub model already in the hub cache: resolve time (load_requested ->
    model_resolved) and the requests a hub on 127.0.0.1 received meanwhile."""
    from tests.hubserver import FakeHub

    hub = FakeHub().start()
    names = ("HF_ENDPOINT", "HF_HOME", "HF_HUB_CACHE")
    saved = {name: os.environ.get(name) for name in names}
    os.environ.update(
        HF_ENDPOINT=hub.url, HF_HOME=str(folder / "hf"), HF_HUB_CACHE=str(folder / "hf" / "hub")
    )
    model = write_tiny_model(folder / "hub" / "Tiny-Q4_K_M.gguf")
    hub.add("bench/Tiny-GGUF", {"Tiny-Q4_K_M.gguf": model.read_bytes()})
    other = LoadRequest(model_path=str(write_tiny_model(folder / "hub" / "other.gguf", seed=5)))
    request = LoadRequest(model_path="bench/tiny-gguf")
    marks: dict[str, float] = {}

    def mark(event: ev.Event, _state: object) -> None:
        if event.type in ("load_requested", "model_resolved"):
            marks[event.type] = time.perf_counter()

    def timed_load(engine: Engine) -> tuple[float, int]:
        before = hub.count()
        assert engine.load(request).status == "loaded"
        return marks["model_resolved"] - marks["load_requested"], hub.count() - before

    journal = folder / "hub.db"
    resolve_s: list[float] = []
    requests = 0
    try:
        with Engine.open(journal, run_dir=folder / "run-hub") as engine:
            engine.observe(mark)
            first_s, first_requests = timed_load(engine)  # probe + download
            for _ in range(rounds):
                assert engine.load(other).status == "loaded"  # so the next one is no duplicate
                seconds, count = timed_load(engine)
                resolve_s.append(seconds)
                requests += count
        with Engine.open(journal, run_dir=folder / "run-hub") as engine:
            engine.observe(mark)
            restart_s, restart_requests = timed_load(engine)
    finally:
        hub.stop()
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
    _row(
        "hub first load: resolve (probe + download)",
        f"{first_s * 1000:.1f} ms, {first_requests} requests",
    )
    _row(
        "hub repeat load of a cached model: resolve",
        f"{statistics.median(resolve_s) * 1000:.2f} / {max(resolve_s) * 1000:.2f} ms",
        "target <= 5 ms (median / max)",
    )
    _row("  requests the hub received (all repeats)", f"{requests}", "target 0")
    _row(
        "  after a restart (probe cache from journal)",
        f"{restart_s * 1000:.2f} ms, {restart_requests} requests",
    )


def bench_node(folder: Path, rounds: int) -> None:
    """Node admission: the decision with 16 slots (pure, and as the node gathers it), and a
    real load that needs one eviction vs one that needs none."""
    from engine.core import eviction
    from engine.node import Node
    from tests.fakes import FakeEffects

    mib = 1 << 20
    residents = [
        eviction.Resident(f"s{i}", (100 + i) * mib, measured=True, last_used=float(i))
        for i in range(15)
    ]
    capacity = eviction.Capacity(64 << 30, limit_bytes=1600 * mib, max_servers=16)
    pure = []
    for _ in range(2000):
        start = time.perf_counter()
        eviction.decide("new", 500 * mib, residents, capacity)  # evicts 4, LRU first
        pure.append(time.perf_counter() - start)
    effects = FakeEffects()
    model = folder / "fake.gguf"
    model.write_bytes(b"GGUF")
    gathered = []
    with Node.open(folder / "node-fake.db", effects=effects, monitor=False) as node:
        for i in range(16):
            node.load(f"s{i}", {"model_path": str(model)})
        for _ in range(2000):
            start = time.perf_counter()
            with node._admission:
                eviction.decide("s0", 500 * mib, node._residents(), capacity)
            gathered.append(time.perf_counter() - start)
    _row(
        "node admission decision, 16 slots (pure)",
        f"{statistics.median(pure) * 1e6:.1f} us (p99 {_pct(pure, 0.99) * 1e6:.1f})",
        "target <= 100 us (median)",
    )
    _row(
        "  as the node gathers it (locks, 16 engines)",
        f"{statistics.median(gathered) * 1e6:.1f} us (p99 {_pct(gathered, 0.99) * 1e6:.1f})",
        "target <= 100 us (median)",
    )

    models = [str(write_tiny_model(folder / f"node-m{i}.gguf", seed=i)) for i in range(3)]
    evicting, fitting = [], []
    with Node.open(folder / "node.db", run_dir=folder / "run-node", max_servers=2) as node:
        node.load("a", {"model_path": models[0]})
        node.load("b", {"model_path": models[1]})
        for _ in range(rounds):
            start = time.perf_counter()  # two servers up: c evicts the least recently used
            assert node.load("c", {"model_path": models[2]}).ok
            evicting.append(time.perf_counter() - start)
            gone = next(n for n in ("a", "b") if node.slot(n).status().state == "idle")
            node.unload("c")
            start = time.perf_counter()  # one server up: fits without evicting
            assert node.load(gone, {"model_path": models[0 if gone == "a" else 1]}).ok
            fitting.append(time.perf_counter() - start)
    need, none = statistics.median(evicting), statistics.median(fitting)
    _row(
        "node load needing one eviction vs none",
        f"{need * 1000:.0f} vs {none * 1000:.0f} ms = {need / none:.2f}x",
        "(median; the eviction is a SIGTERM + wait)",
    )


def bench_security(folder: Path, rounds: int) -> None:
    """The extra-args policy per load, and Engine.open with a binary the journal already knows
    (its capabilities read from `@capabilities`: no `--help` subprocess)."""
    from engine.adapters import capabilities as probe
    from engine.adapters.binary import locate_server
    from engine.adapters.local_models import locate_model_file
    from engine.core.policy import check_extra_args
    from engine.core.request import to_spec

    binary = locate_server()
    env = {**os.environ, **binary.env}
    caps = probe.probe_capabilities(str(binary.path), env, None)
    extras = ["--top-k", "20", "--seed", "-1", "-c", "8192", "--temp=0.7", "-fa", "on"]
    request = LoadRequest(model_path="owner/repo", llama_extra_args=extras)
    bare = LoadRequest(model_path="owner/repo")

    def per_call(fn: Callable[[], object], n: int = 2000) -> float:
        samples = []
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            samples.append((time.perf_counter() - t) / n)
        return statistics.median(samples)

    policy = per_call(lambda: check_extra_args(extras, caps))
    with_extras = per_call(lambda: to_spec(request, locate_model_file, capabilities=caps))
    without = per_call(lambda: to_spec(bare, locate_model_file, capabilities=caps))
    _row(
        f"extra-args policy, {len(extras)} tokens (median)",
        f"{policy * 1e6:.1f} µs",
        "target <= 200 µs per load",
    )
    _row(
        "  to_spec with those extras / without",
        f"{with_extras * 1e6:.1f} / {without * 1e6:.1f} µs",
    )

    journal_path = folder / "security.db"
    t = time.perf_counter()
    help_text = probe.run_help(str(binary.path), env)
    run_help = time.perf_counter() - t
    t = time.perf_counter()
    parse = per_call(lambda: probe.parse_help(help_text), 20)
    journal = Journal.open(journal_path)
    probe.probe_capabilities(str(binary.path), env, journal)  # now known to this journal
    cached = per_call(lambda: probe.probe_capabilities(str(binary.path), env, journal), 20)
    journal.close()
    opens = []
    for _ in range(rounds):
        t = time.perf_counter()
        engine = Engine.open(journal_path, run_dir=folder / "run-sec", monitor=False)
        opens.append(time.perf_counter() - t)
        engine.close()
    _row(
        "capabilities: --help run / parse / journal hit",
        f"{run_help * 1000:.1f} / {parse * 1000:.2f} / {cached * 1000:.2f} ms",
        "an open with a known binary pays the hit",
    )
    _row(
        "Engine.open, known binary (median)",
        f"{statistics.median(opens) * 1000:.1f} ms",
        "target <= 20 ms (includes --version check)",
    )


def bench_plan(rounds: int) -> None:
    """plan_launch on a 128k-context model: CPU-only, one GPU, and 8 mixed GPUs."""
    from engine.core.plan import plan_launch

    gib = 1 << 30
    model = ev.ResolvedModel(
        source="file:/m.gguf",
        model_file="/m.gguf",
        native_ctx=131072,
        size_bytes=int(4.9 * gib),
        block_count=32,
        head_count_kv=8,
        key_length=128,
        value_length=128,
        sliding_window=4096,
        swa_layers=16,
    )
    policy = ev.PlanPolicy(supports_kv_unified=True, supports_fit=True)
    hosts = {
        "CPU-only, 64 GiB": ev.Inventory(ram_total_bytes=64 * gib, ram_available_bytes=60 * gib),
        "1 GPU, 24 GiB": ev.Inventory(
            gpus=(ev.GpuInfo(index=0, total_bytes=24 * gib, free_bytes=23 * gib),),
            ram_total_bytes=64 * gib,
            ram_available_bytes=60 * gib,
        ),
        "8 mixed GPUs": ev.Inventory(
            gpus=tuple(
                ev.GpuInfo(index=i, total_bytes=(8 + 4 * i) * gib, free_bytes=(2 + i) * gib)
                for i in range(8)
            ),
            ram_total_bytes=512 * gib,
            ram_available_bytes=500 * gib,
        ),
    }
    dense = model.model_copy(update={"sliding_window": None, "swa_layers": None})
    cases = [(name, model, inventory) for name, inventory in hosts.items()]
    cases.append(("1 GPU, 16 GiB, dense KV (searched)", dense, ev.Inventory(
        gpus=(ev.GpuInfo(index=0, total_bytes=16 * gib, free_bytes=15 * gib),),
        ram_total_bytes=64 * gib,
        ram_available_bytes=60 * gib,
    )))  # fmt: skip
    for name, shape, inventory in cases:
        samples = []
        for _ in range(rounds):
            t = time.perf_counter()
            plan = plan_launch(shape, inventory, ev.PlanRequest(), policy)
            samples.append(time.perf_counter() - t)
        _row(
            f"plan_launch, {name}",
            f"{statistics.median(samples) * 1e6:.1f} µs median "
            f"(ctx {plan.context}, {plan.offload}, GPUs {','.join(map(str, plan.gpus)) or '-'})",
            "target <= 50 µs",
        )


def main() -> int:
    quick = "--quick" in sys.argv
    with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_DIR")) as tmp:
        folder = Path(tmp)
        print("studio-engine benchmarks (this machine, one run; figures side by side)\n")
        bench_append(folder, 200 if quick else 1000)
        bench_replay(folder, 10_000 if quick else 100_000)
        bench_snapshot_append(folder, 100 if quick else 300)
        bench_open(folder, (1_000, 100_000) if quick else (1_000, 100_000, 1_000_000))
        bench_reload(folder, 3 if quick else 10)
        bench_kill(folder, 3 if quick else 10)
        bench_open_binary(folder, 5 if quick else 20)
        bench_hub_repeat(folder, 3 if quick else 10)
        bench_settle()
        bench_node(folder, 3 if quick else 8)
        bench_security(folder, 3 if quick else 10)
        bench_plan(200 if quick else 2000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
