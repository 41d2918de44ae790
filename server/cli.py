"""`logquant-serve`: parse settings (CLI flags, LOGQUANT_* env vars) and run uvicorn.

A setting that cannot work stops the process with a non-zero exit and one line on stderr:
at parse time when no model is needed to tell, else as soon as the model load fails.
"""

from __future__ import annotations

import signal
import sys
from types import FrameType

import uvicorn
from pydantic import ValidationError
from pydantic_settings import CliApp

from server import logs
from server.api.app import AppState, create_app
from server.config import ServerSettings
from server.connection import uvicorn_config


def parse_settings(argv: list[str] | None = None) -> ServerSettings:
    return CliApp.run(ServerSettings, cli_args=sys.argv[1:] if argv is None else argv)


def settings_error(exc: ValidationError) -> str:
    """One line: each invalid flag with what is wrong with it."""
    problems = []
    for error in exc.errors():
        flag = "--" + "-".join(str(p) for p in error["loc"]).replace("_", "-") if error["loc"] else "settings"
        problems.append(f"{flag}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(problems)


class DrainingServer(uvicorn.Server):
    """uvicorn, telling the app when a shutdown signal arrives so it can end requests that
    outlive the grace period in OpenAI's shape before uvicorn cuts them."""

    def __init__(self, config: uvicorn.Config, state: AppState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.state.start_draining()
        super().handle_exit(sig, frame)


def build_server(settings: ServerSettings, **app_args: object) -> DrainingServer:
    """The app under uvicorn; a failed model load stops the server (see `main`)."""
    server: DrainingServer | None = None

    def stop(reason: str) -> None:
        assert server is not None, "the model loads after the server starts"
        server.should_exit = True

    app = create_app(settings, on_fatal=stop, **app_args)  # type: ignore[arg-type]
    server = DrainingServer(uvicorn_config(app, settings), app.state.logquant)
    return server


def main(argv: list[str] | None = None) -> None:
    try:
        settings = parse_settings(argv)
    except ValidationError as exc:
        sys.exit(f"logquant-serve: error: {settings_error(exc)}")
    logs.configure(settings.log_level)
    server = build_server(settings)
    # uvicorn drains in-flight requests on SIGTERM, then re-raises the signal: exit 0 on it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.run()
    if server.state.fatal_error is not None:
        sys.exit(f"logquant-serve: error: {server.state.fatal_error}")


if __name__ == "__main__":
    main()
