"""logquant: a 2-bit KV cache library (LogQuant, KIVI and fp16 token policies)."""

from logquant.hf import LogQuantCache
from logquant.layout import KVLayout, PagePool
from logquant.policy import POLICY_NAMES, TokenPolicy, make_policy
from logquant.quant import QuantizedTensor, dequantize, quantize
from logquant.store import PagedKVStore

__all__ = [
    "POLICY_NAMES",
    "KVLayout",
    "LogQuantCache",
    "PagePool",
    "PagedKVStore",
    "QuantizedTensor",
    "TokenPolicy",
    "dequantize",
    "make_policy",
    "quantize",
]
