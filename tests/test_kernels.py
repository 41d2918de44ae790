"""The fused decode kernel (logquant/kernels/) against the per-sequence reference.

Without CUDA the kernels run in Triton's interpreter (TRITON_INTERPRET=1, set here before
they are defined), on shapes small enough that every grid has at most ~100 programs; with
CUDA the same tests run compiled, and the `gpu` tests add realistic shapes. Triton's own
library is defined for the interpreter only if triton is first imported after the variable is
set; when another test module imported it earlier (torch._dynamo does), the kernel tests run
in a fresh process instead (`test_kernel_tests_in_a_fresh_process`).
"""

import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before logquant.kernels.decode defines the kernels

import kernel_util  # noqa: E402
from kernel_util import GQA, GROUP_SIZE, LAYERS, STEPS, Case, D  # noqa: E402

from logquant.kernels import select_decode_backend  # noqa: E402
from logquant.kv_manager import KVManager  # noqa: E402
from logquant.layout import KVLayout  # noqa: E402
from logquant.store import PagedKVStore  # noqa: E402

HAS_TRITON = importlib.util.find_spec("triton") is not None
NO_TRITON = "triton is not installed (pip install -e '.[gpu]')"
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason=NO_TRITON)


def kernels_run_here() -> bool:
    """Whether this process can run the kernels: compiled on CUDA, or interpreted when both
    Triton's library and ours were defined with TRITON_INTERPRET=1."""
    if CUDA:
        return True
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    from logquant.kernels.triton_decode import decode_partial_kernel

    return isinstance(tl.zeros, InterpretedFunction) and isinstance(decode_partial_kernel, InterpretedFunction)


RUN_HERE = HAS_TRITON and kernels_run_here()
runs_kernels = pytest.mark.skipif(
    not RUN_HERE,
    reason=NO_TRITON if not HAS_TRITON else "triton was imported before TRITON_INTERPRET=1: run in a fresh process",
)
DEVICE = torch.device("cuda" if CUDA else "cpu")
ROOT = Path(__file__).resolve().parents[1]


def run_steps(
    case: Case, steps: list[dict[str, int]], seed: int, backend: str | None = "triton", num_pages: int = 300
) -> int:
    return kernel_util.run_steps(case, steps, seed, backend, num_pages, DEVICE)


def make_store(case: Case, backend: str | None, seed: int = 0) -> tuple[PagedKVStore, KVManager]:
    return kernel_util.make_store(case, backend, seed, device=DEVICE)


def decode_bucket(case: Case, lengths: dict[str, int], seed: int = 0):
    return kernel_util.decode_bucket(case, lengths, "triton", seed, DEVICE)


KERNEL_CASES = [(p, b, r) for p, b in [("kivi", 16), ("logquant", 12)] for r in (1, 4, 8)] + [
    ("logquant", 30, 4),  # blocks of 10 tokens: not a power of 2
    ("fp16", 0, 8),  # no 2-bit tier: the kernel is a paged fp16 decode
]


@runs_kernels
@pytest.mark.parametrize("policy,budget", [("logquant", 12), ("fp16", 0)])
def test_kernel_reads_a_window_group(policy: str, budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Layers 0 and 2 in a 9-token sliding window, 1 and 3 full attention (two KV groups of two
    layers, pages a page id apart): decodes on the kernel with each group's index; prefills on
    the torch path with the window's band mask."""
    import logquant.kernels.decode as decode

    monkeypatch.setattr(decode, "choose_splits", lambda *args: 2)
    assert run_steps(Case(policy, budget, 4, 2, windows=(9, None, 9, None)), STEPS, seed=3) > 0 or policy == "fp16"


@runs_kernels
@pytest.mark.parametrize("policy,budget,ratio", KERNEL_CASES)
def test_kernel_steps_match_reference(policy: str, budget: int, ratio: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decodes on the kernel (3 splits, fp tiles of 16 tokens) beside prefill chunks on the
    torch path; demotions inside decode steps; block sizes 8, 4 and 10 (not a power of 2)."""
    import logquant.kernels.decode as decode

    monkeypatch.setattr(decode, "choose_splits", lambda *args: 3)
    monkeypatch.setattr(decode, "BLOCK_N", 16)
    heads, kv_heads = GQA[ratio]
    demoted = run_steps(Case(policy, budget, heads, kv_heads), STEPS, seed=ratio)
    assert demoted > 0 or policy == "fp16"


@runs_kernels
@pytest.mark.parametrize("policy,budget", [("kivi", 16), ("logquant", 12)])
def test_kernel_reads_16_bit_key_outlier_channels(policy: str, budget: int, monkeypatch: pytest.MonkeyPatch) -> None:
    import logquant.kernels.decode as decode

    monkeypatch.setattr(decode, "choose_splits", lambda *args: 2)
    demoted = run_steps(Case(policy, budget, 8, 2, key_fp_channels=3), STEPS, seed=5)
    assert demoted > 0


@runs_kernels
def test_kernel_float16_cache() -> None:
    """A float16 store: fp16 dot operands, fp32 softmax and accumulation."""
    assert run_steps(Case("logquant", 12, 8, 2, dtype=torch.float16), STEPS, seed=5) > 0


@runs_kernels
def test_splits_without_work_write_minus_infinity_and_reduce_exactly() -> None:
    """8 splits over a 2-token sequence and one with 2-bit pages: empty splits give lse -inf and
    weigh nothing; the result equals the single-split one."""
    from logquant.kernels.decode import StoreLayer, decode_attention, decode_partials

    case = Case("logquant", 12, 4, 1)
    store, bucket, (q, k, v) = decode_bucket(case, {"short": 1, "long": 50})
    view = StoreLayer.of(store.layer_bytes(0), store.dtype, store.layout.groups[0])
    _, lse = decode_partials(view, bucket, q, k, v, D**-0.5, num_splits=8, block_n=16)
    pages = (bucket.packed_ptr[1:] - bucket.packed_ptr[:-1]).tolist()
    fp = (bucket.fp_ptr[1:] - bucket.fp_ptr[:-1]).tolist()
    assert pages[0] == 0 and fp[0] == 1 and 8 < pages[1] < 16 and 0 < fp[1] <= 16  # fp: all in split 0
    busy = [[True] + [False] * 7, [k * 2 < pages[1] for k in range(8)]]  # 2 pages per split
    assert ((lse.cpu() > float("-inf")) == torch.tensor(busy).unsqueeze(1)).all()
    assert not all(busy[1])
    one, eight = torch.zeros_like(q), torch.zeros_like(q)
    decode_attention(view, bucket, q, k, v, D**-0.5, one, num_splits=1)
    decode_attention(view, bucket, q, k, v, D**-0.5, eight, num_splits=8, block_n=16)
    torch.testing.assert_close(eight, one, atol=2e-6, rtol=2e-6)


@runs_kernels
def test_kernel_reads_strided_query_and_writes_only_its_rows() -> None:
    """q/k/v as the runner passes them (transposed views); rows outside the bucket untouched."""
    from logquant.kernels.decode import StoreLayer, decode_attention

    case = Case("kivi", 16, 4, 2)
    store, bucket, (q, k, v) = decode_bucket(case, {"a": 20, "b": 3}, seed=1)
    view = StoreLayer.of(store.layer_bytes(1), store.dtype, store.layout.groups[0])
    dense = torch.zeros(2, 3, 4, D, device=DEVICE)
    decode_attention(view, bucket, q, k, v, D**-0.5, dense[:, 1])
    strided = [t.transpose(0, 1).contiguous().transpose(0, 1) for t in (q, k, v)]
    out = torch.full((4, 3, D), 7.0, device=DEVICE).transpose(0, 1)  # [3 tokens, 4 heads, d], strided
    decode_attention(view, bucket, *strided, D**-0.5, out)
    torch.testing.assert_close(out[:2], dense[:, 1])
    assert (out[2] == 7.0).all() and (dense[:, 0] == 0).all() and (dense[:, 2] == 0).all()


@needs_triton
def test_split_count_fills_the_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """132 SMs (H100): about 264 programs, at least 256 keys per split, at most 32 splits."""
    import logquant.kernels.decode as decode

    monkeypatch.setattr(decode, "_sm_count", lambda index: 132)
    cuda = torch.device("cuda", 0)
    assert decode.choose_splits(1, 8, 32768, cuda) == 32  # 33 by occupancy, capped
    assert decode.choose_splits(8, 8, 1000, cuda) == 4  # 4 by work (1000 / 256)
    assert decode.choose_splits(32, 8, 32768, cuda) == 2
    assert decode.choose_splits(256, 8, 32768, cuda) == 1
    assert decode.choose_splits(1, 8, 32768, torch.device("cpu")) == 1


def test_backend_selection() -> None:
    layout = Case("logquant", 12, 4, 2).layout()
    cuda = torch.device("cuda")
    assert select_decode_backend(torch.device("cpu"), layout, torch.float16, "torch") == "torch"
    assert select_decode_backend(cuda, layout, torch.float16) == ("triton" if HAS_TRITON else "torch")
    four_bit = KVLayout(2, 2, D, layout.policy, group_size=GROUP_SIZE, bits=4)
    assert select_decode_backend(cuda, four_bit, torch.float16) == "torch"
    with pytest.raises(ValueError, match="one of"):
        select_decode_backend(cuda, layout, torch.float16, "cuda-graphs")
    with pytest.raises(ValueError, match="2-bit|triton package"):
        select_decode_backend(cuda, four_bit, torch.float16, "triton")


@runs_kernels
def test_store_on_cuda_dispatches_decodes_to_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """The device is mocked as CUDA: the store picks `triton` by itself, decode buckets run
    the kernel (once per layer), prefill buckets keep the torch path."""
    import logquant.kernels.decode as decode
    import logquant.store

    real_select, calls = logquant.store.select_decode_backend, []
    monkeypatch.setattr(
        logquant.store, "select_decode_backend", lambda device, *args: real_select(torch.device("cuda"), *args)
    )
    real_kernel = decode.decode_attention
    monkeypatch.setattr(decode, "decode_attention", lambda *args, **kw: calls.append(1) or real_kernel(*args, **kw))
    case = Case("logquant", 12, 4, 2)
    store, _ = make_store(case, backend=None)
    assert store.decode_backend == "triton"
    run_steps(case, [{"a": 9, "b": 5}, {"a": 1, "b": 1}, {"a": 1, "c": 3}], seed=3, backend=None)
    assert len(calls) == 2 * LAYERS


@pytest.mark.gpu
def test_gpu_store_selects_kernel() -> None:
    store = PagedKVStore(Case("logquant", 192, 32, 8, torch.float16, 128, 32).layout(), 8, torch.float16, "cuda")
    assert store.decode_backend == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("policy,budget", [("logquant", 192), ("kivi", 128)])
def test_gpu_kernel_at_model_shape(policy: str, budget: int, dtype: torch.dtype) -> None:
    """Llama-8B layer shape (32 heads, 8 kv heads, head_dim 128, groups of 32), real splits."""
    case = Case(policy, budget, 32, 8, dtype, head_dim=128, group_size=32)
    lengths = {f"s{i}": n for i, n in enumerate([1, 150, 700, 1500, 2900])}
    decodes = {seq: 1 for seq in lengths}
    steps = [{seq: n} for seq, n in lengths.items()] + [decodes] * 3
    run_steps(case, steps, seed=11, num_pages=4000)


def test_gpu_smoke_dry_run(tmp_path: Path) -> None:
    """bench/gpu_smoke.sh --dry-run: the GPU tests (skipped without CUDA), bench/kernel.py in
    its tiny mode (the kernel in the interpreter), the serve comparison printed, not run."""
    env = {**os.environ, "RESULTS_DIR": str(tmp_path), "PYTHON": sys.executable}
    command = ["bash", "bench/gpu_smoke.sh", "--dry-run"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    record = json.loads((tmp_path / "kernel.json").read_text())
    assert record["provenance"]["command"].startswith("python bench/kernel.py")
    row = record["rows"][0]
    assert row["batch"] == 2 and row["context"] == 96
    assert {f"{path}_ms" for path in ("dense", "fp16_torch", "fp16_fused", "2bit_torch", "2bit_fused")} <= set(row)
    assert row["2bit_bytes"] < row["fp16_bytes"] and row["2bit_fused_max_abs_diff"] < 1e-4
    assert "bench/serve.py" in done.stdout


@pytest.mark.skipif(RUN_HERE or not HAS_TRITON, reason="the kernel tests ran in this process")
def test_kernel_tests_in_a_fresh_process() -> None:
    """The interpreter tests above, in a process where TRITON_INTERPRET=1 precedes triton."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k", "not fresh_process"]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:]
    passed = re.search(r"(\d+) passed", done.stdout)
    assert passed and int(passed.group(1)) >= 15 and " skipped" in done.stdout, done.stdout[-2000:]
