"""llama-server health: GET /health on 127.0.0.1 (200 = ready, 503 = still loading)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx
from pydantic import SecretStr

from engine.core.events import ServerProps
from engine.core.request import Status
from engine.effects import CancelToken, Exited, Health

REQUEST_TIMEOUT_S = 2.0
# Poll fast while a small model would be ready, back off towards the field's 0.5 s for large
# ones: a fixed 0.5 s poll adds 250 ms on average to every reload.
FIRST_POLL_S = 0.005
MAX_POLL_S = 0.5


class HealthClient:
    def __init__(self, timeout: float = REQUEST_TIMEOUT_S) -> None:
        # trust_env=False: a proxy from the environment must never sit between us and 127.0.0.1.
        self._timeout = timeout
        # Connection: close: a kept-alive connection makes llama-server wait ~110 ms for it
        # before it exits on SIGTERM, so every unload and reload would pay for it. A new
        # loopback connection per poll costs tens of microseconds.
        # verify=False: the client only ever speaks plain HTTP to 127.0.0.1, so no certificate
        # is involved, and loading the system CA bundle would cost ~50 ms of every open.
        self._client = httpx.Client(
            timeout=timeout, trust_env=False, headers={"Connection": "close"}, verify=False
        )
        self._unix: dict[str, httpx.Client] = {}  # one client per Unix socket

    def __call__(self, port: int, socket_path: str | None = None) -> Health:
        try:
            if socket_path is None:
                response = self._client.get(f"http://127.0.0.1:{port}/health")
            else:
                response = self._unix_client(socket_path).get("http://localhost/health")
        except httpx.HTTPError:
            return "down"  # not listening yet, or a timeout: "not yet"
        if response.status_code == 200:
            return "ok"
        return "loading" if response.status_code == 503 else "down"

    def _unix_client(self, socket_path: str) -> httpx.Client:
        client = self._unix.get(socket_path)
        if client is None:
            for stale in self._unix.values():  # one server per slot: the old socket is gone
                stale.close()
            self._unix.clear()
            client = self._unix[socket_path] = httpx.Client(
                transport=http_transport(socket_path),
                timeout=self._timeout,
                trust_env=False,
                headers={"Connection": "close"},
            )
        return client

    def props(
        self, port: int, socket_path: str | None = None, api_key: SecretStr | None = None
    ) -> ServerProps:
        """The server's own account of what it got: context per slot, slots, alias, build."""
        headers = {"Authorization": f"Bearer {api_key.get_secret_value()}"} if api_key else {}
        try:
            if socket_path is None:
                response = self._client.get(f"http://127.0.0.1:{port}/props", headers=headers)
            else:
                client = self._unix_client(socket_path)
                response = client.get("http://localhost/props", headers=headers)
            response.raise_for_status()
            data = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            return ServerProps(error=f"GET /props failed: {type(exc).__name__}: {exc}"[:300])
        if not isinstance(data, dict):
            return ServerProps(error="GET /props did not answer a JSON object")
        settings = data.get("default_generation_settings")
        n_ctx = settings.get("n_ctx") if isinstance(settings, dict) else None
        return ServerProps(
            n_ctx=n_ctx if isinstance(n_ctx, int) else None,
            total_slots=data["total_slots"] if isinstance(data.get("total_slots"), int) else None,
            model_alias=str(data["model_alias"]) if data.get("model_alias") else None,
            build_info=str(data["build_info"]) if data.get("build_info") else None,
        )

    def close(self) -> None:
        self._client.close()
        for client in self._unix.values():
            client.close()


@dataclass(frozen=True, slots=True)
class ServerStatus(Status):
    """`Engine.status()`: a Status that can also hand out a transport to reach the server."""

    def http_transport(self) -> httpx.HTTPTransport:
        """For `httpx.Client(base_url=status.base_url, transport=status.http_transport())`;
        send `status.api_key` as `Authorization: Bearer ...`."""
        return http_transport(self.socket_path)


def http_transport(socket_path: str | None) -> httpx.HTTPTransport:
    """An httpx transport that reaches a server: over its Unix socket, or plain TCP."""
    return (
        httpx.HTTPTransport(uds=socket_path, verify=False) if socket_path else httpx.HTTPTransport()
    )


def await_health(
    check: Callable[[], Health],
    exited: Callable[[], Exited | None],
    cancel: CancelToken,
    timeout: float,
    clock: Callable[[], float],
) -> Exited | None:
    """Poll until healthy (returns None) or the process exits (returns how).

    Raises Cancelled between polls and TimeoutError past `timeout`.
    """
    start = clock()
    pause = FIRST_POLL_S
    while True:
        cancel.check()
        if check() == "ok":
            return None
        status = exited()
        if status is not None:
            return status
        if clock() - start >= timeout:
            raise TimeoutError(f"llama-server not healthy after {timeout:.0f} s")
        cancel.sleep(pause)
        pause = min(pause * 2, MAX_POLL_S)
