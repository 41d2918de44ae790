"""The inference engine: scheduler, model runner, sampler (the KV manager is `logquant.kv_manager`).

`from server.engine import LLM, SamplingParams`. Attributes load lazily so the scheduler and
KV manager import without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "LLM": "server.engine.llm",
    "CompletionOutput": "server.engine.llm",
    "RequestOutput": "server.engine.llm",
    "EngineConfig": "server.engine.config",
    "SamplingParams": "server.engine.request",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'server.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
