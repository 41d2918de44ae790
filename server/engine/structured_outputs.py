"""The engine core's structured-outputs manager (vLLM's `StructuredOutputManager`).

It holds one grammar matcher (`GrammarState`) per constrained sequence: created when the
request is added (or built by the API off the engine thread and handed over), freed when the
sequence finishes. Each step it brings the matchers of the rows to sample up to date with their
sequences' output tokens and fills all their masks with one batched llguidance call; the
sampler receives the masks as a tensor (`GrammarMasks`) and keeps no grammar state.
"""

from __future__ import annotations

import llguidance
import llguidance.torch
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from server.engine.request import SamplingParams, SequenceState
from server.engine.sampler import GrammarMasks
from server.engine.structured import GrammarState, compile_structured, compiler_for


class StructuredOutputManager:
    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.matchers: dict[str, GrammarState] = {}  # seq_id -> its matcher

    def new_matchers(
        self, params: SamplingParams, count: int, prebuilt: list[GrammarState] | None = None
    ) -> list[GrammarState]:
        """The matchers of a request's `count` samples: `prebuilt` (made off the engine thread
        from the same spec) or new ones; none without a constraint. Raises StructuredSpecError
        (a ValueError) for an invalid spec, so a bad request fails here, never inside a step."""
        if params.structured is None:
            return []
        compiled = compile_structured(params.structured, self.tokenizer)
        return list(prebuilt) if prebuilt else [GrammarState(compiled) for _ in range(count)]

    def add(self, seqs: list[SequenceState], matchers: list[GrammarState]) -> None:
        """Track the request's sequences' matchers (`new_matchers`), one per sequence in order."""
        for seq, matcher in zip(seqs, matchers):
            self.matchers[seq.seq_id] = matcher

    def free(self, seq_id: str) -> None:
        self.matchers.pop(seq_id, None)

    def grammar_masks(self, seqs: list[SequenceState], vocab: int) -> GrammarMasks | None:
        """The allowed tokens of the constrained rows of `seqs` (None when no row is), each
        matcher first following its sequence's new output tokens. Once a grammar is complete
        (or broken), only the sequence's stop tokens (EOS and stop_token_ids) are allowed."""
        rows = [i for i, seq in enumerate(seqs) if seq.params.structured is not None]
        if not rows:
            return None
        states = [self._followed(seqs[i], vocab) for i in rows]
        compiler = compiler_for(self.tokenizer)
        bitmask = torch.zeros(llguidance.torch.get_bitmask_shape(len(rows), compiler.vocab_size), dtype=torch.int32)
        live = [(state.matcher, row) for row, state in enumerate(states) if not state.finished]
        if live:
            llguidance.torch.fill_next_token_bitmask_par(mask_executor(), live, bitmask)
        allowed = _unpack(bitmask, vocab)
        for row, state in enumerate(states):
            if state.finished or state.matcher.is_accepting():
                allowed[row, state.stop_ids] = True
        return GrammarMasks(rows, allowed)

    def _followed(self, seq: SequenceState, vocab: int) -> GrammarState:
        state = self.matchers.get(seq.seq_id)
        if state is None:
            raise RuntimeError(f"{seq.seq_id}: a structured-output sequence has no grammar matcher")
        state.follow(seq, vocab)
        return state


_executor: llguidance.LLExecutor | None = None


def mask_executor() -> llguidance.LLExecutor:
    """llguidance's thread pool for batched masks, one per process, made on first use."""
    global _executor
    if _executor is None:
        _executor = llguidance.LLExecutor()
    return _executor


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, words] int32 bitmask (bit j of word w: token 32 w + j) -> [rows, vocab] bool."""
    as_bytes = bitmask.numpy().astype("<i4", copy=False).view(np.uint8)
    bits = torch.from_numpy(np.unpackbits(as_bytes, axis=1, bitorder="little")).bool()
    allowed = torch.zeros(bitmask.shape[0], vocab, dtype=torch.bool)
    width = min(vocab, bits.shape[1])
    allowed[:, :width] = bits[:, :width]
    return allowed
