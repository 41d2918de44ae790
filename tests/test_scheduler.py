"""Scheduler and KV manager alone, with hand-made runner outputs (no torch in either)."""

import random
import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from logquant.kv_manager import KVManager
from logquant.layout import KVLayout
from logquant.policy import make_policy
from server.engine.outputs import PromptLogprobs, SampleResult, StepResult
from server.engine.request import SamplingParams, SequenceState, SequenceStatus
from server.engine.scheduler import Scheduler, SchedulerConfig

LAYOUT = KVLayout(num_layers=2, num_kv_heads=2, head_dim=32, policy=make_policy("fp16"), dtype_bytes=2)
PAGE = LAYOUT.page_bytes_all_layers  # 16 tokens per page


def make(num_pages: int, max_seqs: int = 8, budget: int = 64) -> Scheduler:
    return Scheduler(SchedulerConfig(max_seqs, budget, 4096), KVManager(LAYOUT, num_pages))


def seq(name: str, prompt_len: int, max_tokens: int = 100) -> SequenceState:
    return SequenceState(name, name, 0, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens, temperature=0))


def run_step(s: Scheduler, token: int = 7):
    """One step with a hand-made runner result: every sampled chunk gets `token`."""
    out = s.schedule()
    assert (out.plan is None) == (not out.chunks)
    if out.plan is not None:  # the output carries the plan of exactly its chunks, in order
        assert out.plan.num_seqs == len(out.chunks) and out.plan.num_tokens == out.num_batched_tokens
    s.update(out, StepResult(sampled={c.seq_id: SampleResult(token) for c in out.chunks if c.sample}))
    return out


def test_scheduler_imports_no_torch() -> None:
    code = "import sys, server.engine.scheduler, logquant.kv_manager; print('torch' in sys.modules)"
    assert subprocess.check_output([sys.executable, "-c", code], text=True).strip() == "False"


def test_chunked_prefill_at_fixed_cut_points() -> None:
    s = make(num_pages=100, max_seqs=8, budget=32)  # prefill chunks of 32 - 8 = 24 tokens
    s.add(seq("a", 10))
    out = run_step(s)
    assert [(c.seq_id, len(c.token_ids), c.sample) for c in out.chunks] == [("a", 10, True)]
    s.add(seq("b", 70))
    out = run_step(s)  # a decodes 1 token; b's first chunk is a full 24 (fits in the 31 left)
    assert [(c.seq_id, len(c.token_ids), c.sample) for c in out.chunks] == [("a", 1, True), ("b", 24, False)]
    s.add(seq("c", 20))
    out = run_step(s)  # b's next 24 leave 7: c's 20-token prompt waits rather than being cut at 7
    assert [(c.seq_id, len(c.token_ids)) for c in out.chunks] == [("a", 1), ("b", 24)]
    out = run_step(s)
    assert [(c.seq_id, len(c.token_ids), c.sample) for c in out.chunks] == [("a", 1, True), ("b", 22, True)]
    assert out.chunks[1].start_position == 48
    out = run_step(s)
    assert [(c.seq_id, len(c.token_ids)) for c in out.chunks] == [("a", 1), ("b", 1), ("c", 20)]


def test_admission_waits_for_prompt_pages_fcfs() -> None:
    s = make(num_pages=4)
    s.add(seq("a", 40, max_tokens=8))  # 3 pages
    s.add(seq("b", 30, max_tokens=8))  # 2 pages: does not fit next to a
    s.add(seq("c", 5, max_tokens=8))  # would fit, but FCFS keeps it behind b
    out = run_step(s)
    assert [c.seq_id for c in out.chunks] == ["a"]
    assert [q.seq_id for q in s.waiting] == ["b", "c"]
    s.abort("a")
    out = run_step(s)
    assert [c.seq_id for c in out.chunks] == ["b", "c"] and "a" not in s.kv_manager.sequences


def test_preempts_newest_and_recomputes() -> None:
    s = make(num_pages=2)
    s.add(seq("old", 15, max_tokens=17))
    s.add(seq("new", 15, max_tokens=17))
    run_step(s)
    run_step(s)  # both have 16 tokens cached in one page each; 17 tokens known
    assert s.kv_manager.num_free_pages == 0
    out = run_step(s)  # old needs a second page for token 17 -> new is preempted
    assert "new" not in s.kv_manager.sequences and [c.seq_id for c in out.chunks] == ["old"]
    assert s.num_preemptions == 1 and s.waiting[0].seq_id == "new"
    preempted = s.waiting[0]
    assert preempted.num_computed_tokens == 0 and preempted.output_token_ids == [7, 7]
    s.abort("old")
    out = run_step(s)  # new is recomputed: prompt + its generated token
    assert out.chunks[0].token_ids == list(range(15)) + [7, 7] and out.chunks[0].sample


def test_max_num_seqs() -> None:
    s = make(num_pages=100, max_seqs=2)
    for name in "abc":
        s.add(seq(name, 4))
    out = run_step(s)
    assert [c.seq_id for c in out.chunks] == ["a", "b"]


def test_finishes_on_length_and_stop() -> None:
    s = make(num_pages=10)
    s.add(seq("a", 4, max_tokens=2))
    stop = seq("b", 4)
    stop.params.stop_token_ids = [9]
    s.add(stop)
    run_step(s)
    run_step(s, token=9)
    assert not s.has_work() and s.kv_manager.num_free_pages == 10


def test_rejects_sequence_larger_than_cache() -> None:
    s = make(num_pages=2)
    with pytest.raises(ValueError, match="KV pages"):
        s.add(seq("a", 40, max_tokens=1))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["add", "abort", "step", "step", "step"]), st.integers(1, 90)), max_size=60))
def test_no_page_leaks_and_budget_never_exceeded(actions) -> None:
    s = make(num_pages=12, max_seqs=4, budget=40)
    rng = random.Random(0)
    live: list[str] = []
    for i, (action, n) in enumerate(actions):
        if action == "add":
            s.add(seq(f"r{i}", n, max_tokens=rng.randint(1, 30)))
            live.append(f"r{i}")
        elif action == "abort" and live:
            s.abort(live.pop(rng.randrange(len(live))))
        else:
            out = run_step(s)
            assert out.num_batched_tokens <= 40
        held = sum(len(t.pages) for t in s.kv_manager.sequences.values())
        assert held + s.kv_manager.num_free_pages == 12
        assert set(s.kv_manager.sequences) <= {q.seq_id for q in s.running}
        for q in s.running:
            assert s.kv_manager.num_tokens(q.seq_id) == q.num_computed_tokens
        s.kv_manager.check_integrity()
    for name in live:
        s.abort(name)
    while s.has_work():
        run_step(s)
    assert s.kv_manager.num_free_pages == 12 and not s.kv_manager.sequences


@pytest.mark.parametrize("policy", ["kivi", "logquant"])
def test_kv_manager_pages_follow_cost_model(policy: str) -> None:
    layout = KVLayout(2, 2, 32, make_policy(policy, 48, group_size=16), dtype_bytes=2, group_size=16)
    alloc = KVManager(layout, 1000)
    for n in [1, 50, 51, 200, 1000]:
        alloc.allocate("x", n)
        table = alloc.sequences["x"]
        (group,), (table,) = layout.groups, table.groups
        assert len(table.fp_pages) == group.fp_pages_for(n)
        assert len(table.packed_pages) + len(table.spare_packed_pages) == group.packed_pages_for(n)
    assert alloc.bytes_by_tier()["fp"] + alloc.bytes_by_tier()["2bit"] == layout.bytes_for(1000)
    assert SequenceStatus.WAITING.value == "waiting"


def test_exact_recompute_replays_outputs_one_per_step() -> None:
    s = Scheduler(SchedulerConfig(8, 64, 4096, exact_recompute=True), KVManager(LAYOUT, 100))
    victim = seq("v", 40)
    victim.output_token_ids = [5, 6, 7]  # as if preempted after generating three tokens
    s.add(victim)
    sizes = []
    while not victim.output_token_ids[3:]:
        out = run_step(s)
        sizes.append([(len(c.token_ids), c.sample) for c in out.chunks])
    # the prompt as first computed (one chunk: chunks are 64 - 8 = 56), then the three known tokens one by one
    assert sizes == [[(40, False)], [(1, False)], [(1, False)], [(1, True)]]


def test_update_applies_tokens_logprobs_failures_and_prompt_logprobs() -> None:
    ended: list[str] = []
    s = Scheduler(SchedulerConfig(8, 64, 4096), KVManager(LAYOUT, 100), on_finish=ended.append)
    for name in ("ok", "bad"):
        s.add(seq(name, 5))
    out = s.schedule()
    assert [c.seq for c in out.chunks] == [s.sequences["ok"], s.sequences["bad"]]
    result = StepResult(
        sampled={"ok": SampleResult(3, -0.5, [(3, -0.5)]), "bad": SampleResult(4)},
        failed={"bad": ValueError("nan logits")},
    )
    ok, bad = s.sequences["ok"], s.sequences["bad"]
    outcome = s.update(out, result)
    assert outcome.sampled == [ok] and outcome.failed == [bad] and outcome.progressed
    assert ok.output_token_ids == [3] and ok.output_logprobs == [{"logprob": -0.5, "top": [(3, -0.5)]}]
    assert ok.num_computed_tokens == 5 and ok.timings.first_token == ok.timings.last_token is not None
    assert bad.finish_reason == "error" and bad.error == "ValueError: nan logits" and bad.output_token_ids == []
    assert ended == ["bad"] and "bad" not in s.kv_manager.sequences and s.running == [ok]
    out = s.schedule()
    outcome = s.update(out, StepResult(sampled={"ok": SampleResult(9)}))
    assert outcome.inter_token_latencies[0] >= 0 and ok.output_token_ids == [3, 9]
    s.abort("ok")
    assert ended == ["bad", "ok"]


def test_prompt_logprobs_are_recorded_in_order() -> None:
    s = make(num_pages=100)
    s.add(seq("a", 4))
    out = s.schedule()
    entries = [{"logprob": -1.0, "top": []}, {"logprob": -2.0, "top": []}, {"logprob": -3.0, "top": []}]
    s.update(out, StepResult(sampled={"a": SampleResult(1)}, prompt_logprobs={"a": PromptLogprobs(1, entries)}))
    assert s.sequences["a"].prompt_logprobs == entries


def test_a_step_with_nothing_to_run_reports_no_progress() -> None:
    s = make(num_pages=100)
    out = s.schedule()
    assert out.chunks == [] and out.plan is None and not s.update(out, StepResult()).progressed
