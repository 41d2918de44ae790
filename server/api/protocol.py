"""OpenAI protocol models (the fields we support; anything else is rejected with a 400)."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidatorFunctionWrapHandler, field_validator
from pydantic import Strict as StrictType

MAX_INT = 2**31 - 1
MAX_STOP_STRINGS = 4  # OpenAI's limit, and vLLM's default (VLLM_MAX_STOP_STRINGS)
# Strict scalars: JSON numbers and booleans only ("4" or true is not an int, 1 is not a bool).
# A float field takes a JSON integer (1 is 1.0), as JSON has one number type.
Int = Annotated[int, StrictType()]
Float = Annotated[float, StrictType()]
Bool = Annotated[bool, StrictType()]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TextPart(Strict):
    type: Literal["text"]
    text: str


class ChatMessage(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(Strict):
    include_usage: Bool = False
    continuous_usage_stats: Bool = False  # usage on every chunk (needs include_usage)


class SamplingFields(Strict):
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
    stop_token_ids: list[Int] | None = None
    include_stop_str_in_output: Bool = False
    skip_special_tokens: Bool = True
    spaces_between_special_tokens: Bool = True

    @field_validator("stop", mode="wrap")
    @classmethod
    def _check_stop(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> list[str] | None:
        message = f"stop must be a string or a list of at most {MAX_STOP_STRINGS} non-empty strings"
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


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[Int] | list[list[Int]]
    echo: Bool = False
    logprobs: Annotated[Int, Field(ge=0, le=5)] | None = None

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _check_prompt(cls, value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        if isinstance(value, list) and (len(value) == 0 or any(item == [] for item in value)):
            raise ValueError("prompt must not be empty")
        try:
            return handler(value)
        except ValidationError:  # one message for the union, reported on `prompt` itself
            raise ValueError(
                "prompt must be a string, a list of strings, a list of token ids or a list of token-id lists"
            ) from None


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())
