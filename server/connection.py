"""uvicorn's configuration from the settings, with the per-connection limit uvicorn lacks.

uvicorn bounds the connections and tasks it serves (`--limit-concurrency`, a plain 503 beyond)
and the idle time between requests (`--timeout-keep-alive`), but not the time a client takes
to send a request's headers: a client that connects and sends nothing, or one header byte now
and then, would hold its socket for good. `--timeout-request-header` closes such connections.
(The body has its own deadline, `--timeout-request-body`, in BodyLimitMiddleware.)
"""

from __future__ import annotations

import asyncio
import math

import uvicorn
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from server.config import ServerSettings

DRAIN_MARGIN_SECONDS = 5  # uvicorn's own cut-off comes this long after ours


def uvicorn_config(app: object, settings: ServerSettings) -> uvicorn.Config:
    return uvicorn.Config(
        app,  # type: ignore[arg-type]
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=math.ceil(settings.shutdown_grace_seconds) + DRAIN_MARGIN_SECONDS,
        limit_concurrency=settings.limit_concurrency,
        timeout_keep_alive=settings.timeout_keep_alive,
        http=header_timeout_protocol(settings.timeout_request_header),
    )


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """uvicorn's HTTP protocol, closing a connection that has not sent a request's headers
    within `seconds` of connecting, or of the first byte after its previous response."""

    class HeaderTimeoutProtocol(AutoHTTPProtocol):  # type: ignore[misc, valid-type]
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def data_received(self, data: bytes) -> None:
            if self.header_timer is None and (self.cycle is None or self.cycle.response_complete):
                self._arm_header_timer()  # the first bytes of the next request on this connection
            super().data_received(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self) -> None:
            self.header_timer = self.loop.call_later(seconds, self._header_deadline, self.cycle)

        def _header_deadline(self, cycle_when_armed: object) -> None:
            """No new request (cycle) since the timer was armed: the headers did not arrive."""
            self.header_timer = None
            if self.cycle is cycle_when_armed and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
