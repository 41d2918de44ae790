"""OpenAI protocol models (the fields we support; anything else is rejected with a 400), with
vLLM's extras (`structured_outputs`, `guided_*`, sampling and detokenization fields)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    ValidatorFunctionWrapHandler,
    field_validator,
)
from pydantic import Strict as StrictType
from pydantic_core import PydanticCustomError

from server.api.errors import CONTEXT_LENGTH_EXCEEDED

MAX_INT = 2**31 - 1
# List caps of the schema (see README, Reliability): OpenAI's where it has one.
MAX_STOP_STRINGS = 4  # OpenAI's limit, and vLLM's default (VLLM_MAX_STOP_STRINGS)
MAX_TOOLS = 128  # OpenAI's limit on tools (and functions)
MAX_LOGIT_BIAS_ENTRIES = 1024  # OpenAI's limit ("at most 1024 properties")
MAX_STOP_TOKEN_IDS = MAX_LOGIT_BIAS_ENTRIES  # vLLM's extra has none: the same bound as the other token-id map
# Strict scalars: JSON numbers and booleans only ("4" or true is not an int, 1 is not a bool).
# A float field takes a JSON integer (1 is 1.0), as JSON has one number type.
Int = Annotated[int, StrictType()]
Float = Annotated[float, StrictType()]
Bool = Annotated[bool, StrictType()]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class RequestLimits:
    """What one request may ask of the loaded model, given to validation as pydantic's context:
    token-id lists longer than the context and more prompts than sequences per request fail
    before their elements are validated."""

    max_model_len: int
    max_sequences: int  # prompts x n


def limits_of(info: ValidationInfo) -> RequestLimits | None:
    return info.context if isinstance(info.context, RequestLimits) else None


def check_token_count(count: int, limits: RequestLimits | None) -> None:
    if limits is not None and count > limits.max_model_len:
        raise PydanticCustomError(
            CONTEXT_LENGTH_EXCEEDED,
            "This model's maximum context length is {limit} tokens; the request has {count} token ids.",
            {"limit": limits.max_model_len, "count": count},
        )


def check_sequence_count(count: int, limits: RequestLimits | None) -> None:
    if limits is not None and count > limits.max_sequences:
        raise ValueError(sequence_cap_message(count, limits.max_sequences))


def sequence_cap_message(count: int, cap: int) -> str:
    return (
        f"This request asks for {count} sequences (prompts x n); the server runs at most {cap} sequences per request."
    )


Name = Annotated[str, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
JsonSchema = dict[str, Any] | bool
TokenIdKey = Annotated[str, Field(pattern=r"^[0-9]{1,10}$")]  # logit_bias keys: token ids as JSON strings


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    """A call in an assistant message of the history."""

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class FunctionDefinition(Strict):
    name: Name
    description: str | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; none: no arguments
    strict: Bool | None = None


class Tool(Strict):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(Strict):
    name: str


class NamedToolChoice(Strict):
    type: Literal["function"]
    function: NamedFunction


ToolChoice = Literal["none", "auto", "required"] | NamedToolChoice


class JsonSchemaFormat(Strict):
    name: Name
    description: str | None = None
    schema_: JsonSchema | None = Field(None, alias="schema")
    strict: Bool | None = None


class ResponseFormat(Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(Strict):
    """vLLM's `structured_outputs`: exactly one of these."""

    json_: JsonSchema | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: Annotated[list[str], Field(min_length=1)] | None = None
    grammar: str | None = None
    json_object: Bool | None = None


class StructuredFields(Strict):
    """Structured-output fields of both endpoints."""

    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    guided_json: JsonSchema | str | None = None
    guided_regex: str | None = None
    guided_choice: Annotated[list[str], Field(min_length=1)] | None = None
    guided_grammar: str | None = None


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant messages only
    tool_call_id: str | None = Field(None, validate_default=True)  # tool messages only (required there)
    content: str | list[TextPart] | None = Field(None, validate_default=True)  # none: an assistant's calls

    @field_validator("tool_calls")
    @classmethod
    def _calls_from_assistant(cls, value: list[ToolCall] | None, info: ValidationInfo) -> list[ToolCall] | None:
        if value is not None and info.data.get("role", "assistant") != "assistant":
            raise ValueError("only assistant messages have tool_calls")
        return value

    @field_validator("tool_call_id")
    @classmethod
    def _id_on_tool_results(cls, value: str | None, info: ValidationInfo) -> str | None:
        role = info.data.get("role")
        if role == "tool" and value is None:
            raise ValueError("a tool message needs the tool_call_id it answers")
        if role not in ("tool", None) and value is not None:
            raise ValueError("only tool messages have a tool_call_id")
        return value

    @field_validator("content", mode="wrap")
    @classmethod
    def _check_content(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        if value is None and not (info.data.get("role") == "assistant" and info.data.get("tool_calls")):
            raise ValueError("content is required (it may be null only in an assistant message with tool_calls)")
        try:
            return handler(value)
        except ValidationError:
            raise ValueError("content must be a string or a list of text parts") from None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        return "".join(part.text for part in self.content)


class StreamOptions(Strict):
    include_usage: Bool = False
    continuous_usage_stats: Bool = False  # usage on every chunk (needs include_usage)


class SamplingFields(StructuredFields):
    """Fields shared by chat and completions (OpenAI names plus vLLM's extras)."""

    model: str
    max_tokens: Annotated[Int, Field(ge=1, le=MAX_INT)] | None = None
    temperature: Annotated[Float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Float, Field(gt=0, le=1)] | None = None
    n: Annotated[Int, Field(ge=1, le=16)] = 1
    stop: str | list[str] | None = None
    seed: Annotated[Int, Field(ge=-(2**63), lt=2**63)] | None = None
    presence_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    frequency_penalty: Annotated[Float, Field(ge=-2, le=2)] | None = None
    stream: Bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    top_k: Annotated[Int, Field(ge=-1, le=MAX_INT)] | None = None
    min_p: Annotated[Float, Field(ge=0, le=1)] | None = None
    repetition_penalty: Annotated[Float, Field(gt=0, le=10)] | None = None
    ignore_eos: Bool = False
    stop_token_ids: Annotated[list[Int], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    include_stop_str_in_output: Bool = False
    skip_special_tokens: Bool = True
    spaces_between_special_tokens: Bool = True
    logit_bias: (
        Annotated[dict[TokenIdKey, Annotated[Float, Field(ge=-100, le=100)]], Field(max_length=MAX_LOGIT_BIAS_ENTRIES)]
        | None
    ) = None
    min_tokens: Annotated[Int, Field(ge=0, le=MAX_INT)] = 0

    @field_validator("stop", mode="wrap")
    @classmethod
    def _check_stop(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> list[str] | None:
        message = f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings"
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(message)  # before its elements are validated
        try:
            value = handler(value)
        except ValidationError:
            raise ValueError(message) from None
        stops = [value] if isinstance(value, str) else value
        if stops is not None and (len(stops) > MAX_STOP_STRINGS or any(not s for s in stops)):
            raise ValueError(message)
        return stops


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    max_completion_tokens: Annotated[Int, Field(ge=1, le=MAX_INT)] | None = None
    logprobs: Bool = False
    top_logprobs: Annotated[Int, Field(ge=0, le=20)] | None = None
    tools: Annotated[list[Tool], Field(max_length=MAX_TOOLS)] | None = None
    tool_choice: ToolChoice | None = None  # default: "auto" with tools, else "none"
    parallel_tool_calls: Bool | None = None


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    echo: Bool = False
    logprobs: Annotated[Int, Field(ge=0, le=5)] | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _check_prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler, info: ValidationInfo) -> Any:
        """The union by its shape (pydantic's smart union of long id lists holds the GIL for
        seconds), with the list lengths checked before the elements."""
        if isinstance(value, str):
            return value
        if not isinstance(value, list):
            raise ValueError(PROMPT_SHAPE)
        limits = limits_of(info)
        if value and isinstance(value[0], (str, list)):  # several prompts
            check_sequence_count(len(value), limits)
        else:  # one prompt of token ids
            check_token_count(len(value), limits)
        if not value or any(item == [] for item in value):
            raise ValueError("prompt must not be empty")
        if isinstance(value[0], str):
            return _validated(_TEXTS, value)
        if isinstance(value[0], list):
            for ids in value:
                check_token_count(len(ids) if isinstance(ids, list) else 1, limits)
            return _validated(_TOKEN_ID_LISTS, value)
        return _validated(_TOKEN_IDS, value)


PROMPT_SHAPE = "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
_TEXTS, _TOKEN_IDS, _TOKEN_ID_LISTS = TypeAdapter(list[str]), TypeAdapter(list[Int]), TypeAdapter(list[list[Int]])


def _validated(adapter: TypeAdapter, value: list) -> list:
    try:
        return adapter.validate_python(value)
    except ValidationError:  # one message for the union, reported on `prompt` itself
        raise ValueError(PROMPT_SHAPE) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
