"""Structured outputs with llguidance: compile a `StructuredSpec` (cached), keep one matcher per
sequence, and mask the logits of constrained rows inside the batched sampler.

- `compile_structured(spec, tokenizer)` validates and compiles a spec (cached by tokenizer and
  spec); it raises `StructuredSpecError` (a ValueError) for an invalid one. The API calls it off
  the event loop before submitting, so the engine loop only ever hits the cache.
- A sequence's `GrammarState` follows the sequence's *output tokens* rather than the sampler's
  picks: before each mask it consumes the tokens appended since the last one. Recompute after
  preemption does not re-sample output tokens, and a step whose results are dropped (abort,
  retry) appends nothing, so the matcher can never run ahead of or behind the sequence.
- When the grammar is complete, only the sequence's stop tokens (EOS and stop_token_ids) remain.

llguidance was chosen over xgrammar by measurement (JSON schema, SmolLM2 tokenizer, 2 CPU cores):
compile ~3 ms against ~180-370 ms, mask ~40 us a token against ~20 us, a 3 MB wheel with no
dependencies against xgrammar's, which pulls triton (286 MB) on Linux.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
import weakref
from dataclasses import dataclass

import llguidance
import llguidance.hf
import llguidance.torch
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from server.engine.request import Sequence, StructuredSpec

logger = logging.getLogger(__name__)

# JSON without free whitespace (a model could otherwise emit newlines forever), with the
# separators of `json.dumps`.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_SIZE = 512


class StructuredSpecError(ValueError):
    """An invalid structured-output spec; `kind` says which (json_schema, regex, ...)."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class CompiledGrammar:
    spec: StructuredSpec
    grammar: str  # llguidance's grammar text
    compiler: GrammarCompiler


class GrammarCompiler:
    """One tokenizer's llguidance tokenizer and its cache of compiled specs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.is_fast:
            raise StructuredSpecError("structured outputs need a fast (Rust) tokenizer", "tokenizer")
        self.vocab_size = len(tokenizer)
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size)  # ~0.5 s, once
        self.compile = functools.lru_cache(maxsize=CACHE_SIZE)(self._compile)

    def _compile(self, spec: StructuredSpec) -> CompiledGrammar:
        grammar = _llguidance_grammar(spec)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
        if is_error:
            raise StructuredSpecError(f"invalid {spec.kind}: {messages[0].strip()}", spec.kind)
        return CompiledGrammar(spec, grammar, self)


_compilers: weakref.WeakKeyDictionary[PreTrainedTokenizerBase, GrammarCompiler] = weakref.WeakKeyDictionary()
_compilers_lock = threading.Lock()


def compiler_for(tokenizer: PreTrainedTokenizerBase) -> GrammarCompiler:
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = GrammarCompiler(tokenizer)
        return compiler


def compile_structured(spec: StructuredSpec, tokenizer: PreTrainedTokenizerBase) -> CompiledGrammar:
    """Validate and compile `spec` for `tokenizer` (cached). Blocking: call it off the event loop.
    Raises StructuredSpecError for an invalid spec."""
    return compiler_for(tokenizer).compile(spec)


def _llguidance_grammar(spec: StructuredSpec) -> str:
    try:
        if spec.kind == "json_object":
            return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=JSON_OPTIONS)
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(_schema_object(spec.spec), defaults=JSON_OPTIONS)
        if spec.kind == "regex":
            return llguidance.LLMatcher.grammar_from_regex(spec.spec)
        if spec.kind == "choice":
            return llguidance.grammar_from("choice", _choices(spec.spec))
        if spec.kind == "grammar":
            return llguidance.grammar_from("grammar", spec.spec)  # Lark or GBNF
    except ValueError as exc:  # malformed JSON, GBNF that does not convert, ...
        raise StructuredSpecError(f"invalid {spec.kind}: {exc}", spec.kind) from exc
    raise StructuredSpecError(f"unknown structured output kind {spec.kind!r}", spec.kind)


def _schema_object(text: str) -> dict:
    schema = json.loads(text)
    if schema is True:
        return {}  # the schema `true` allows any JSON value
    if not isinstance(schema, dict):
        raise StructuredSpecError("a JSON schema must be a JSON object (or true)", "json_schema")
    return schema


def _choices(text: str) -> list[str]:
    choices = json.loads(text)
    if not (isinstance(choices, list) and choices and all(isinstance(c, str) for c in choices)):
        raise StructuredSpecError("choice must be a non-empty list of strings", "choice")
    return choices


class GrammarState:
    """One sequence's matcher, fed with the sequence's output tokens."""

    def __init__(self, compiled: CompiledGrammar) -> None:
        self.matcher = llguidance.LLMatcher(compiled.compiler.ll_tokenizer, compiled.grammar, log_level=0)
        self.num_followed = 0
        self.finished = False  # complete (or broken): only stop tokens from now on

    def follow(self, output_token_ids: list[int], stop_ids: set[int]) -> None:
        for token in output_token_ids[self.num_followed :]:
            if self.finished:
                break
            if token in stop_ids and self.matcher.is_accepting():
                self.finished = True  # a stop token ends the output; it is no part of the grammar
            elif not self.matcher.consume_token(token):
                logger.warning("grammar matcher rejected token %d: %s", token, self.matcher.get_error())
                self.finished = True
        self.num_followed = len(output_token_ids)
        self.finished = self.finished or self.matcher.is_stopped()

    def fill_bitmask(self, bitmask: torch.Tensor, row: int) -> None:
        llguidance.torch.fill_next_token_bitmask(self.matcher, bitmask, row)


def apply_grammar_masks(
    logits: torch.Tensor, seqs: list[Sequence], tokenizer: PreTrainedTokenizerBase | None
) -> None:
    """Set the logits of tokens the grammar forbids to -inf, in place, for rows with a spec."""
    rows = [i for i, seq in enumerate(seqs) if seq.params.structured is not None]
    if tokenizer is None:
        raise RuntimeError("a structured-output sequence reached the sampler without the tokenizer")
    compiler = compiler_for(tokenizer)
    vocab = logits.shape[1]
    bitmask = torch.zeros(llguidance.torch.get_bitmask_shape(len(rows), compiler.vocab_size), dtype=torch.int32)
    states, stops = [], []
    for row, i in enumerate(rows):
        seq = seqs[i]
        if seq.grammar is None:
            seq.grammar = GrammarState(compiler.compile(seq.params.structured))
        stop_ids = {t for t in (*seq.eos_token_ids, *seq.params.stop_token_ids) if t < vocab}
        seq.grammar.follow(seq.output_token_ids, stop_ids)
        if not seq.grammar.finished:
            seq.grammar.fill_bitmask(bitmask, row)
        states.append(seq.grammar)
        stops.append(sorted(stop_ids))
    allowed = _unpack(bitmask, vocab)
    for row, (state, stop_ids) in enumerate(zip(states, stops)):
        if state.finished or state.matcher.is_accepting():
            allowed[row, stop_ids] = True
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))


def _unpack(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """[rows, words] int32 bitmask (bit j of word w: token 32 w + j) -> [rows, vocab] bool."""
    as_bytes = bitmask.numpy().astype("<i4", copy=False).view(np.uint8)
    bits = torch.from_numpy(np.unpackbits(as_bytes, axis=1, bitorder="little")).bool()
    allowed = torch.zeros(bitmask.shape[0], vocab, dtype=torch.bool)
    width = min(vocab, bits.shape[1])
    allowed[:, :width] = bits[:, :width]
    return allowed
