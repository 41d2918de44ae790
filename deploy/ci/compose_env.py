"""The environment compose gives a service: its `environment:` merged over the compose files
(later files win), interpolated with an env file's values as Compose does (${VAR:-default},
${VAR-default}, ${VAR}, $VAR, $$). tests/test_deploy.py starts the server with it and compares
it with `docker compose config` where a compose tool is installed.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import yaml

VARIABLE = re.compile(
    r"\$(?:\$|\{(?P<braced>[A-Za-z_][A-Za-z0-9_]*)(?P<op>:-|-)?(?P<default>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))"
)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; blank lines and # comments skipped; an empty value stays "" (set, empty)."""
    values = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            values[key.strip()] = value.strip()
    return values


def interpolate(text: str, values: dict[str, str]) -> str:
    def substitute(match: re.Match) -> str:
        if match.group(0) == "$$":
            return "$"
        name = match.group("braced") or match.group("plain")
        value, op = values.get(name), match.group("op")
        if op == ":-" and not value:
            return match.group("default")
        if op == "-" and value is None:
            return match.group("default")
        return value or ""

    return VARIABLE.sub(substitute, text)


def service_environment(service: str, env_file: Path, *compose_files: Path) -> dict[str, str]:
    environment: dict[str, str] = {}
    for path in compose_files:
        declared = yaml.safe_load(path.read_text())["services"].get(service, {}).get("environment", {})
        environment.update({key: str(value) for key, value in declared.items()})
    values = read_env_file(env_file)
    return {key: interpolate(value, values) for key, value in environment.items()}


def compose_tool() -> list[str] | None:
    """The compose plugin, or Debian's docker-compose; None where neither is installed."""
    if (
        shutil.which("docker")
        and subprocess.run(["docker", "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None
