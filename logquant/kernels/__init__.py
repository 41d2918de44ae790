"""GPU fast path: Triton kernels over the paged 2-bit store, and which backend runs a step.

`select_decode_backend` picks the decode attention of a store: `triton` (the fused kernel in
`triton_decode.py`, launched by `decode.py`) on CUDA when Triton is installed and the layout
is one the kernel reads, `torch` (the batched path of `logquant.attention`) otherwise.
Nothing here imports Triton until a kernel runs.
"""

from logquant.kernels.dispatch import DECODE_BACKENDS, kernel_supports, select_decode_backend, triton_available

__all__ = ["DECODE_BACKENDS", "kernel_supports", "select_decode_backend", "triton_available"]
