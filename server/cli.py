"""`logquant-serve`: parse settings (CLI flags, LOGQUANT_* env vars) and run uvicorn."""

from __future__ import annotations

import signal
import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp

from server.api.app import create_app
from server import logs
from server.config import ServerSettings


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    return CliApp.run(ServerSettings, cli_args=sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        sys.exit(f"logquant-serve: invalid settings:\n{exc}")
    logs.configure(settings.log_level)
    app = create_app(settings)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal: exit 0 on it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )


if __name__ == "__main__":
    main()
