"""logquant: a 2-bit KV cache library (LogQuant, KIVI and fp16 token policies).

Attributes load lazily, so pure-Python parts (`logquant.policy`, `logquant.layout`) import
without torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "POLICY_NAMES": "logquant.policy",
    "TokenPolicy": "logquant.policy",
    "make_policy": "logquant.policy",
    "KVLayout": "logquant.layout",
    "PagePool": "logquant.layout",
    "QuantizedTensor": "logquant.quant",
    "quantize": "logquant.quant",
    "dequantize": "logquant.quant",
    "PagedKVStore": "logquant.store",
    "LogQuantCache": "logquant.hf",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'logquant' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
