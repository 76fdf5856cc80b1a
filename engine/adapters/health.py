"""llama-server health: GET /health on 127.0.0.1 (200 = ready, 503 = still loading)."""

from __future__ import annotations

from collections.abc import Callable

import httpx

from engine.effects import CancelToken, Exited, Health

REQUEST_TIMEOUT_S = 2.0
# Poll fast while a small model would be ready, back off towards the field's 0.5 s for large
# ones: a fixed 0.5 s poll adds 250 ms on average to every reload.
FIRST_POLL_S = 0.005
MAX_POLL_S = 0.5


class HealthClient:
    def __init__(self, timeout: float = REQUEST_TIMEOUT_S) -> None:
        # trust_env=False: a proxy from the environment must never sit between us and 127.0.0.1.
        # Connection: close: a kept-alive connection makes llama-server wait ~110 ms for it
        # before it exits on SIGTERM, so every unload and reload would pay for it. A new
        # loopback connection per poll costs tens of microseconds.
        # verify=False: the client only ever speaks plain HTTP to 127.0.0.1, so no certificate
        # is involved, and loading the system CA bundle would cost ~50 ms of every open.
        self._client = httpx.Client(
            timeout=timeout, trust_env=False, headers={"Connection": "close"}, verify=False
        )

    def __call__(self, port: int) -> Health:
        try:
            response = self._client.get(f"http://127.0.0.1:{port}/health")
        except httpx.HTTPError:
            return "down"  # not listening yet, or a timeout: "not yet"
        if response.status_code == 200:
            return "ok"
        return "loading" if response.status_code == 503 else "down"

    def close(self) -> None:
        self._client.close()


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
