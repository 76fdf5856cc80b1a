"""`studio-engine serve`: an HTTP service over the engine.

* Control, compatible with llama.cpp's router mode (its clients work unchanged):
  `GET /models`, `POST /models/load {"model"}`, `POST /models/unload {"model"}`,
  `GET /models/sse` (status changes as server-sent events).
* OpenAI-compatible routing: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
  `/v1/embeddings` go to the server of the request's `model`, loaded on demand; responses,
  streamed ones included, pass through without buffering, and the model is held in use for
  the whole request (no idle unload, no swap under it).
* `GET /metrics` (Prometheus), `GET /events` (every journal event, server-sent), `GET /health`.

Every model runs on its own slot of a `Node`, so several stay loaded and idle ones are evicted
by measured memory when a load needs the room. The service holds no state of its own beyond
the node: statuses come from its engines, events and metrics from the journal.
A control key (`Authorization: Bearer KEY`) is required for everything but `/health` when one
is set, and must be set to bind anything but loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from engine.adapters.feed import Feed
from engine.adapters.journal import Journal
from engine.catalog import Preset
from engine.core.errors import EngineError
from engine.core.events import Event, is_slot_stream
from engine.core.evolve import evolve
from engine.core.request import LoadResult, Status
from engine.core.rules import InvalidRequest
from engine.core.state import SlotState
from engine.metrics import JournalMetrics
from engine.node import Node
from engine.replay import replay_state

log = logging.getLogger("studio-engine.service")

RESPAWN_TIMEOUT_S = 600.0  # a crashed model's respawn, before the request gets a 503

PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
_HOP_HEADERS = frozenset({"connection", "content-length", "transfer-encoding", "keep-alive"})


class ModelUnavailable(RuntimeError):
    """The model could not be loaded for a request (the load's own error)."""


@dataclass(frozen=True, slots=True)
class ModelInfo:
    value: str  # llama.cpp router's status.value: loaded / loading / unloaded / failed
    status: Status | None = None  # the slot serving (or failing) this model, if any
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a loaded model's server answers, and the key it wants."""

    base_url: str
    headers: dict[str, str]
    socket_path: str | None = None


class Backend(Protocol):
    """What the service needs from whatever runs the servers (NodeBackend; tests may fake it)."""

    journal: Journal

    def models(self) -> dict[str, ModelInfo]: ...

    def load(self, name: str) -> LoadResult: ...

    def unload(self, name: str) -> None: ...

    def acquire(self, name: str) -> tuple[Upstream, Callable[[], None]]:
        """Load `name` if it is not serving, hold it in use; returns where it answers and
        the release function. Raises ModelUnavailable."""
        ...

    def servers(self) -> dict[str, Any]: ...

    def close(self) -> None: ...


_ROUTER_VALUES = {"ready": "loaded", "failed": "failed", "crashed": "failed"}


def router_value(state: str) -> str:
    """llama.cpp router's status.value for a slot state: loaded / loading / unloaded / failed
    (a reload in progress is "loading"; an unload in progress is already "unloaded")."""
    if state in ("idle", "unloading"):
        return "unloaded"
    return _ROUTER_VALUES.get(state, "loading")


def upstream_of(status: Status) -> Upstream:
    assert status.base_url is not None
    key = status.api_key.get_secret_value() if status.api_key is not None else None
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return Upstream(status.base_url, headers, status.socket_path)


class NodeBackend:
    """Each model on its own slot of a `Node`: several servers at once, idle ones evicted
    least recently used first when a load needs the room (by measured memory)."""

    def __init__(self, node: Node, catalog: dict[str, Preset]) -> None:
        self.node = node
        self.journal = node.journal
        self.catalog = catalog
        self._refused: dict[str, str] = {}  # name -> why its preset was refused

    def models(self) -> dict[str, ModelInfo]:
        open_slots = set(self.node.names())
        models = {}
        for name in self.catalog:
            if name in self._refused:
                models[name] = ModelInfo("failed", None, self._refused[name])
            elif name in open_slots:
                status = self.node.slot(name).status()
                value = router_value(status.state)
                models[name] = ModelInfo(
                    value, status, status.last_error if value == "failed" else None
                )
            else:
                models[name] = ModelInfo("unloaded")
        return models

    def load(self, name: str) -> LoadResult:
        preset = self.catalog[name]
        try:
            result = self.node.load(name, preset.request, ttl=preset.ttl)
        except InvalidRequest as refused:
            self._refused[name] = str(refused)
            raise
        self._refused.pop(name, None)
        if result.ok and preset.pin:
            self.node.pin(name)
        return result

    def unload(self, name: str) -> None:
        if name in self.node.names():
            self.node.unload(name)

    def acquire(self, name: str) -> tuple[Upstream, Callable[[], None]]:
        for _ in range(3):  # the node may evict an idle server between the load and the hold
            if name in self.node.names() and self.node.slot(name).status().state == "crashed":
                try:  # the same server back, journaled as a respawn; a crash loop stops here
                    self.node.slot(name).ensure_ready(timeout=RESPAWN_TIMEOUT_S)
                except (EngineError, TimeoutError) as exc:
                    raise ModelUnavailable(str(exc)) from None
            if name not in self.node.names() or self.node.slot(name).status().state != "ready":
                try:
                    result = self.load(name)
                except InvalidRequest as refused:
                    raise ModelUnavailable(str(refused)) from None
                if not result.ok:
                    raise ModelUnavailable(result.error or result.status)
            held = contextlib.ExitStack()
            try:
                engine = held.enter_context(self.node.in_use(name))
            except EngineError:
                continue  # being evicted right now: load it again
            status = engine.status()
            if status.state == "ready" and status.base_url is not None:
                return upstream_of(status), held.close
            held.close()
        raise ModelUnavailable(
            "it was evicted three times while being loaded; the host is short of memory"
        )

    def servers(self) -> dict[str, Any]:
        return {name: self.node.slot(name).state.process for name in self.node.names()}

    def close(self) -> None:
        self.node.close()


def _load_quietly(backend: Backend, name: str) -> None:
    """A background load: its outcome is journaled and shown by GET /models, not raised."""
    try:
        backend.load(name)
    except InvalidRequest as refused:
        log.warning("model %r refused: %s", name, refused)


def _model_entry(name: str, value: str, args: list[str], error: str | None) -> dict[str, Any]:
    """One model as llama.cpp's router lists it."""
    status: dict[str, Any] = {"value": value, "args": args, "failed": value == "failed"}
    if error:
        status["error"] = error
    return {"id": name, "object": "model", "owned_by": "studio-engine", "created": 0,
            "status": status}  # fmt: skip


def _error(status: int, message: str, kind: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"code": status, "message": message, "type": kind}}, status)


def _sse(event: str, data: Any, event_id: int | None = None) -> bytes:
    head = f"id: {event_id}\n" if event_id is not None else ""
    return f"{head}event: {event}\ndata: {json.dumps(data)}\n\n".encode()


def create_app(
    backend: Backend, *, control_key: str | None = None, poll_s: float = 0.1
) -> Starlette:
    metrics = JournalMetrics(backend.journal, servers=backend.servers)
    timeout = httpx.Timeout(600.0, connect=10.0)
    clients: dict[str | None, httpx.AsyncClient] = {}  # one per Unix socket, one for TCP

    def client_for(socket_path: str | None) -> httpx.AsyncClient:
        client = clients.get(socket_path)
        if client is None:
            transport = httpx.AsyncHTTPTransport(uds=socket_path) if socket_path else None
            client = httpx.AsyncClient(timeout=timeout, trust_env=False, transport=transport)
            clients[socket_path] = client
        return client

    def model_list() -> list[dict[str, Any]]:
        entries = []
        for name, info in backend.models().items():
            args = list(info.status.extra_args) if info.status is not None else []
            entries.append(_model_entry(name, info.value, args, info.error))
        return entries

    async def health(_: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": await asyncio.to_thread(model_list)})

    async def named_model(request: Request) -> str | Response:
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "the body must be JSON with a 'model' field")
        name = body.get("model") if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return _error(400, "'model' (a model name from GET /models) is required")
        if name not in backend.models():
            return _error(404, f"model {name!r} is not offered here (see GET /models)")
        return name

    async def load(request: Request) -> Response:
        name = await named_model(request)
        if isinstance(name, Response):
            return name
        # Like llama.cpp's router: answer at once, load in the background; watch GET /models.
        asyncio.get_running_loop().run_in_executor(None, _load_quietly, backend, name)
        return JSONResponse({"success": True})

    async def unload(request: Request) -> Response:
        name = await named_model(request)
        if isinstance(name, Response):
            return name
        await asyncio.to_thread(backend.unload, name)
        return JSONResponse({"success": True})

    async def metrics_endpoint(_: Request) -> Response:
        body = await asyncio.to_thread(metrics.render)
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    async def follow(since: int) -> AsyncIterator[Any]:
        feed = Feed(backend.journal, since=since, poll_s=poll_s)
        async for item in feed.afollow():
            yield item

    async def events(request: Request) -> Response:
        since = request.query_params.get("since", "0")
        if not since.isascii() or not since.isdigit():
            return _error(400, f"since must be a journal sequence number, not {since!r}")

        async def stream() -> AsyncIterator[bytes]:
            async for item in follow(int(since)):
                data = {"stream": item.stream, "event": item.event.model_dump(mode="json")}
                yield _sse(item.event.type, data, item.seq)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def models_sse(_: Request) -> Response:
        # Statuses are folded from the journal, event by event (each model's slot is named
        # after it), so no change is skipped however fast it comes and goes.
        journal = backend.journal

        def replayed_until(start: int) -> dict[str, SlotState]:
            return {
                stream: replay_state(journal.read_rows(stream, until_seq=start))
                for stream in journal.streams()
                if is_slot_stream(stream)
            }

        async def stream() -> AsyncIterator[bytes]:
            start = await asyncio.to_thread(journal.seq_before_last, 0)
            states = await asyncio.to_thread(replayed_until, start)
            last: dict[str, str] = {}
            for entry in await asyncio.to_thread(model_list):
                if entry["id"] in states:
                    entry["status"]["value"] = router_value(states[entry["id"]].state)
                last[entry["id"]] = entry["status"]["value"]
                yield _sse("model", entry)
            async for item in follow(start):
                if item.stream not in last:
                    continue  # not a model's slot
                state = evolve(states.get(item.stream, SlotState()), cast(Event, item.event))
                states[item.stream] = state
                value = router_value(state.state)
                if last[item.stream] != value:
                    last[item.stream] = value
                    args = list(state.extra_args) if value == "loaded" else []
                    error = state.last_error if value == "failed" else None
                    yield _sse("model", _model_entry(item.stream, value, args, error), item.seq)

        return StreamingResponse(stream(), media_type="text/event-stream")

    async def proxy(request: Request) -> Response:
        body = await request.body()
        try:
            name = json.loads(body).get("model")
        except (ValueError, AttributeError):
            return _error(400, "the body must be a JSON object with a 'model' field")
        if not isinstance(name, str) or name not in backend.models():
            return _error(404, f"model {name!r} is not offered here (see GET /v1/models)")
        try:
            upstream, release = await asyncio.to_thread(backend.acquire, name)
        except ModelUnavailable as exc:
            return _error(503, f"model {name!r} could not be loaded: {exc}", "server_error")
        client = client_for(upstream.socket_path)
        try:
            outgoing = client.build_request(
                "POST",
                upstream.base_url + request.url.path,
                content=body,
                headers={"content-type": "application/json", **upstream.headers},
            )
            answer = await client.send(outgoing, stream=True)
        except BaseException:
            release()
            raise

        async def done() -> None:
            await answer.aclose()
            release()

        headers = {k: v for k, v in answer.headers.items() if k.lower() not in _HOP_HEADERS}
        return StreamingResponse(
            answer.aiter_raw(), answer.status_code, headers, background=BackgroundTask(done)
        )

    async def v1_models(_: Request) -> Response:
        return JSONResponse({"object": "list", "data": await asyncio.to_thread(model_list)})

    routes = [
        Route("/health", health),
        Route("/models", models),
        Route("/models/load", load, methods=["POST"]),
        Route("/models/unload", unload, methods=["POST"]),
        Route("/models/sse", models_sse),
        Route("/metrics", metrics_endpoint),
        Route("/events", events),
        Route("/v1/models", v1_models),
        *(Route(path, proxy, methods=["POST"]) for path in PROXIED),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(_: Starlette) -> AsyncIterator[None]:
        yield
        for client in clients.values():
            await client.aclose()

    app = Starlette(routes=routes, lifespan=lifespan)
    if control_key is not None:
        app.add_middleware(_ControlKey, key=control_key)
    return app


class _ControlKey:
    """Every request but /health carries `Authorization: Bearer <control key>`."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                await _error(401, "missing or wrong control key (Authorization: Bearer ...)")(
                    scope, receive, send
                )
                return
        await self.app(scope, receive, send)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
