"""The fused C++ decode kernel (logquant/kernels/csrc) against the per-sequence oracle, the
torch path, itself at other thread counts, and how the store and server select it.

The first test to run builds the kernel (about 25 s on 2 cores; later runs load the cache)."""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_util import DECODE, GQA, STEPS, Case, decode_bucket, make_store, run_steps

import logquant.step
from logquant.kernels import cpu_build, cpu_check, cpu_decode, select_decode_backend
from logquant.kernels.cpu_build import KernelBuildError
from logquant.layout import KVLayout
from logquant.step import DecodeIndex

ROOT = Path(__file__).resolve().parents[1]
# e: a new sequence whose one prompt token is decoded in a bucket (no cached token at all);
# five decodes at once: more sequences than threads
CPU_STEPS = STEPS + [{**DECODE, "e": 1}, {**DECODE, "e": 1, "d": 1}]
POLICIES = [("fp16", 0), ("kivi", 16), ("logquant", 12), ("logquant", 30)]  # logquant 30: blocks of 10


@pytest.fixture
def small_splits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Splits of 16 keys: the longer sequences take several work items per kv head."""
    monkeypatch.setattr(logquant.step, "SPLIT_KEYS", 16)


@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("ratio", [1, 3, 4])
@pytest.mark.parametrize("policy,budget", POLICIES)
def test_kernel_matches_oracle(policy: str, budget: int, ratio: int, head_dim: int, small_splits: None) -> None:
    """Every policy, GQA 1/3/4, head dims 64 and 128; shuffled pages, unwritten bytes NaN,
    lengths ending mid-page, demotions inside decode steps, prefill chunks beside decodes."""
    heads, kv_heads = GQA[ratio]
    demoted = run_steps(Case(policy, budget, heads, kv_heads, head_dim=head_dim), CPU_STEPS, seed=ratio, backend="cpu")
    assert demoted > 0 or policy == "fp16"


@pytest.mark.parametrize("policy,budget", [("logquant", 12), ("fp16", 0)])
def test_kernel_reads_a_window_group(policy: str, budget: int, small_splits: None) -> None:
    """Layers 0 and 2 in a 9-token sliding window, 1 and 3 full attention: two KV groups of two
    layers (a layer's pages are a page id apart, twice its page); each layer's kernel reads its
    group's index."""
    case = Case(policy, budget, 8, 2, head_dim=64, windows=(9, None, 9, None))
    assert run_steps(case, CPU_STEPS, seed=2, backend="cpu") > 0 or policy == "fp16"


@pytest.mark.parametrize("policy,budget", [("kivi", 16), ("logquant", 12)])
def test_kernel_reads_16_bit_key_outlier_channels(policy: str, budget: int, small_splits: None) -> None:
    case = Case(policy, budget, 8, 2, head_dim=64, key_fp_channels=3)
    assert run_steps(case, CPU_STEPS, seed=5, backend="cpu") > 0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_kernel_16_bit_caches(dtype: torch.dtype) -> None:
    assert run_steps(Case("logquant", 12, 6, 2, dtype=dtype, head_dim=64), CPU_STEPS, seed=7, backend="cpu") > 0


def test_gqa_group_wider_than_one_pass() -> None:
    """12 query heads per kv head: two passes of at most 8 rows over the same K/V."""
    assert run_steps(Case("logquant", 12, 12, 1, head_dim=64), CPU_STEPS, seed=8, backend="cpu") > 0


def long_bucket() -> tuple:
    """One sequence far longer than the others (many splits), one with no 2-bit page."""
    return decode_bucket(Case("logquant", 12, 8, 2, head_dim=64), {"long": 900, "short": 3, "mid": 40}, "cpu")


def test_output_is_bitwise_the_same_with_one_and_two_threads(small_splits: None) -> None:
    store, index, (q, k, v) = long_bucket()
    outputs, threads = [], torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            out = torch.zeros_like(q)
            store._cpu_decode[0](store.layer_bytes(0), index, q, k, v, 0.125, out)
            outputs.append(out)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outputs[0], outputs[1]) and outputs[0].abs().sum() > 0


def test_splits_change_the_work_not_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """900 keys: one work item at 1024 keys a split, 57 at 16 (capped at 32)."""
    results = []
    for split_keys in (1024, 16):
        monkeypatch.setattr(logquant.step, "SPLIT_KEYS", split_keys)
        store, index, (q, k, v) = long_bucket()
        items = torch.diff(index.item_ptr).tolist()
        out = torch.zeros_like(q)
        store._cpu_decode[0](store.layer_bytes(0), index, q, k, v, 0.125, out)
        results.append((items, out))
    assert results[0][0] == [1, 1, 1] and results[1][0] == [32, 1, 3]
    torch.testing.assert_close(results[0][1], results[1][1], atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("policy,budget", POLICIES)
def test_store_forward_cpu_equals_torch_over_steps(policy: str, budget: int) -> None:
    """The same steps on two stores: outputs agree and the stores hold the same bytes."""
    case = Case(policy, budget, 6, 2, head_dim=64)
    stores = {backend: make_store(case, backend, seed=3) for backend in ("torch", "cpu")}
    gen = torch.Generator().manual_seed(3)
    for chunks in CPU_STEPS:
        outs = {}
        tokens = [torch.randn(sum(chunks.values()), h, 64, generator=gen) for h in case.head_counts]
        for backend, (store, manager) in stores.items():
            for seq, n in chunks.items():
                manager.allocate(seq, (manager.num_tokens(seq) if seq in manager.sequences else 0) + n)
            step = store.prepare(manager.plan_step(list(chunks.items())))
            assert any(isinstance(b, DecodeIndex) for b in step.groups[0].buckets) == (
                backend == "cpu" and 1 in chunks.values()
            )
            outs[backend] = [store.forward(layer, step, *tokens, scaling=0.125) for layer in range(2)]
        for cpu_out, torch_out in zip(outs["cpu"], outs["torch"]):
            torch.testing.assert_close(cpu_out, torch_out, atol=1e-5, rtol=1e-5)
    assert torch.equal(stores["cpu"][0].buffer.nan_to_num(), stores["torch"][0].buffer.nan_to_num())


@pytest.fixture
def broken_build(monkeypatch: pytest.MonkeyPatch):
    """The kernel cannot be built (no compiler here): every cached result forgotten."""

    def fail() -> None:
        raise KernelBuildError("no C++ compiler (c++) on PATH")

    monkeypatch.setattr(cpu_decode, "load_cpu_kernel", fail)
    cpu_check._check.cache_clear()
    yield
    cpu_check._check.cache_clear()


def test_failed_build_falls_back_to_torch_with_one_line(broken_build, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="logquant.kernels.dispatch")
    store, _ = make_store(Case("logquant", 12, 4, 2, head_dim=64), backend=None)
    assert store.decode_backend == "torch"
    (record,) = caplog.records
    assert (
        record.getMessage() == "decode backend: torch (the fused CPU kernel cannot run: no C++ compiler (c++) on PATH)"
    )


def test_explicit_cpu_backend_that_cannot_build_is_an_error(broken_build) -> None:
    layout = Case("logquant", 12, 4, 2, head_dim=64).layout()
    with pytest.raises(ValueError, match=r"^decode backend 'cpu': no C\+\+ compiler"):
        select_decode_backend(torch.device("cpu"), layout, torch.float32, "cpu")


def test_unsupported_layouts_keep_the_torch_path() -> None:
    layout = Case("logquant", 12, 4, 2, head_dim=64).layout()
    wide = KVLayout(2, 2, 64, layout.policy, dtype_bytes=4, group_size=8, bits=4)
    assert select_decode_backend(torch.device("cpu"), wide, torch.float32) == "torch"
    with pytest.raises(ValueError, match="4-bit codes"):
        select_decode_backend(torch.device("cpu"), wide, torch.float32, "cpu")
    assert select_decode_backend(torch.device("cpu"), layout, torch.float32) == "cpu"


def test_build_key_changes_with_the_instruction_set(monkeypatch: pytest.MonkeyPatch) -> None:
    key = cpu_build.build_key()
    monkeypatch.setattr(cpu_build, "isa_flags", lambda: "sse2")
    assert cpu_build.build_key() != key


def test_kernel_shares_torchs_openmp_runtime() -> None:
    """One libgomp in the process after the kernel is loaded (no second OpenMP runtime)."""
    cpu_build.load_cpu_kernel()
    maps = Path(f"/proc/{os.getpid()}/maps").read_text()
    runtimes = {line.split()[-1] for line in maps.splitlines() if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


def test_server_with_cpu_backend_and_no_compiler_stops_with_one_line(tmp_path: Path) -> None:
    """A fresh process (no cached kernel handle) where the compiler is missing."""
    from tiny import save_tiny

    model_dir = save_tiny(tmp_path / "model")
    env = {
        **os.environ,
        "LOGQUANT_PORT": "0",
        "LOGQUANT_DEVICE": "cpu",
        "LOGQUANT_MODEL": str(model_dir),
        "CXX": "/nonexistent/c++",
        "LOGQUANT_DECODE_BACKEND": "cpu",
    }
    done = subprocess.run([sys.executable, "-m", "server.cli"], env=env, capture_output=True, text=True, timeout=180)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode != 0
    assert last == "logquant-serve: error: decode backend 'cpu': no C++ compiler (/nonexistent/c++) on PATH"


@pytest.mark.real_model
@pytest.mark.parametrize("policy", ["fp16", "logquant"])
def test_engine_greedy_outputs_identical_on_default_model(policy: str, model_and_tokenizer) -> None:
    """Two ~400-token real-text prompts, 48 greedy tokens: the same ids on both backends
    (logquant demotes blocks in the prompt and during decoding)."""
    from logquant.data import essays_text
    from server.engine import LLM, SamplingParams

    model, tokenizer = model_and_tokenizer
    text = essays_text()
    prompts = [tokenizer.encode(text[start : start + 1800])[:400] for start in (0, 50_000)]
    params = SamplingParams(max_tokens=48, temperature=0, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "cpu"):
        llm = LLM(
            model_object=model,
            tokenizer=tokenizer,
            policy=policy,
            decode_backend=backend,
            kv_cache_memory="256MiB",
            fp_budget=96,
        )
        assert llm.engine.store.decode_backend == backend
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
    assert outputs["cpu"] == outputs["torch"] and all(len(ids) == 48 for ids in outputs["cpu"])
