"""Structured outputs with llguidance: compile a `StructuredSpec` (cached) and follow one
sequence's output with a matcher (`GrammarState`). The engine core's `StructuredOutputManager`
(`structured_outputs.py`) holds the matchers and hands the sampler a batch of masks.

- `compile_structured(spec, tokenizer)` validates and compiles a spec (cached by tokenizer and
  spec, the cache bounded by the size of the texts it holds); it raises `StructuredSpecError` (a
  ValueError) for an invalid one. The API calls it off the event loop before submitting, and
  builds each sequence's matcher there too (`grammar_states`): the engine thread only hits the
  cache and fills the masks of all constrained rows in one batched llguidance call.
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

import json
import logging
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import llguidance
import llguidance.hf
from transformers import PreTrainedTokenizerBase

from server.engine.request import SequenceState, StructuredSpec

logger = logging.getLogger(__name__)

# JSON without free whitespace (a model could otherwise emit newlines forever), with the
# separators of `json.dumps`.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
CACHE_CHARS = 64 * 2**20  # compiled specs kept, by the characters of their spec and grammar text


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

    @property
    def chars(self) -> int:
        return len(self.spec.spec) + len(self.grammar)


class CompileCache:
    """Least recently used compiled specs, at most `max_chars` characters of text in all (one
    schema can be megabytes, so a count of entries bounds nothing). Thread-safe."""

    def __init__(self, max_chars: int) -> None:
        self.max_chars, self.chars = max_chars, 0
        self._entries: OrderedDict[StructuredSpec, CompiledGrammar] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, spec: StructuredSpec) -> CompiledGrammar | None:
        with self._lock:
            compiled = self._entries.get(spec)
            if compiled is not None:
                self._entries.move_to_end(spec)
            return compiled

    def put(self, compiled: CompiledGrammar) -> None:
        """Keep `compiled` (unless it alone is over the bound), dropping the oldest entries."""
        with self._lock:
            if compiled.chars > self.max_chars or compiled.spec in self._entries:
                return
            self._entries[compiled.spec] = compiled
            self.chars += compiled.chars
            while self.chars > self.max_chars:
                _, dropped = self._entries.popitem(last=False)
                self.chars -= dropped.chars


class GrammarCompiler:
    """One tokenizer's llguidance tokenizer and its cache of compiled specs."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cache_chars: int = CACHE_CHARS) -> None:
        if not tokenizer.is_fast:
            raise StructuredSpecError("structured outputs need a fast (Rust) tokenizer", "tokenizer")
        self.vocab_size = len(tokenizer)
        self.ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size)  # ~0.5 s, once
        self.cache = CompileCache(cache_chars)

    def compile(self, spec: StructuredSpec) -> CompiledGrammar:
        compiled = self.cache.get(spec)
        if compiled is None:
            grammar = _llguidance_grammar(spec)
            is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, self.ll_tokenizer)
            if is_error:
                raise StructuredSpecError(f"invalid {spec.kind}: {messages[0].strip()}", spec.kind)
            compiled = CompiledGrammar(spec, grammar, self)
            self.cache.put(compiled)
        return compiled


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


def grammar_states(spec: StructuredSpec, tokenizer: PreTrainedTokenizerBase, count: int) -> list[GrammarState]:
    """`count` fresh matchers for `spec`, one per sequence (blocking: call it off the event loop
    and off the engine thread). Raises StructuredSpecError for an invalid spec."""
    compiled = compile_structured(spec, tokenizer)
    return [GrammarState(compiled) for _ in range(count)]


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
        self.stop_ids: list[int] = []  # the sequence's EOS and stop tokens inside the logits
        self._stop_set: frozenset[int] | None = None  # the same, set on the first `follow`

    def follow(self, seq: SequenceState, vocab: int) -> None:
        """Consume the output tokens appended since the last call."""
        if self._stop_set is None:
            self._stop_set = frozenset(t for t in seq.params.stop_token_set.union(seq.eos_token_ids) if t < vocab)
            self.stop_ids = sorted(self._stop_set)
        for token in seq.output_token_ids[self.num_followed :]:
            if self.finished:
                break
            if token in self._stop_set and self.matcher.is_accepting():
                self.finished = True  # a stop token ends the output; it is no part of the grammar
            elif not self.matcher.consume_token(token):
                logger.warning("grammar matcher rejected token %d: %s", token, self.matcher.get_error())
                self.finished = True
        self.num_followed = len(seq.output_token_ids)
        self.finished = self.finished or self.matcher.is_stopped()
