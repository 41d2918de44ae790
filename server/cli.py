"""`logquant-serve`: parse settings (CLI flags, LOGQUANT_* env vars) and run uvicorn."""

from __future__ import annotations

import logging
import sys

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp

from server.api.app import create_app
from server.config import ServerSettings


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    return CliApp.run(ServerSettings, cli_args=sys.argv[1:] if argv is None else argv)


def main(argv: list[str] | None = None) -> None:
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        sys.exit(f"logquant-serve: invalid settings:\n{exc}")
    logging.basicConfig(
        level=settings.log_level.upper(), format='{"time": "%(asctime)s", "level": "%(levelname)s", '
        '"logger": "%(name)s", "message": %(message)r}'
    )  # fmt: skip
    app = create_app(settings)
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )


if __name__ == "__main__":
    main()
