"""langchain-openai's ChatOpenAI against a live server: bind_tools and with_structured_output."""

from typing import Literal

import pytest
from langchain_core.messages import AIMessageChunk
from langchain_openai import ChatOpenAI
from pydantic import BaseModel, ConfigDict, Field
from server_util import MODEL, RunningServer, tiny_core_factory


class GetWeather(BaseModel):
    """The weather in a city now."""

    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, so the call ends

    city: str = Field(max_length=8)
    unit: Literal["c", "f"]


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(max_length=10)
    kind: Literal["cat", "dog"]
    legs: int = Field(ge=0, le=4)


@pytest.fixture(scope="module")
def llm():
    with RunningServer(tiny_core_factory()) as server:
        url = f"{server.wait_ready().url}/v1"
        yield ChatOpenAI(model=MODEL, base_url=url, api_key="unused", temperature=0, max_tokens=200, max_retries=0)


@pytest.mark.parametrize("tool_choice", ["GetWeather", "any"])
def test_bind_tools(llm, tool_choice: str) -> None:
    message = llm.bind_tools([GetWeather], tool_choice=tool_choice, parallel_tool_calls=False).invoke("Paris?")
    (call,) = message.tool_calls
    assert call["name"] == "GetWeather" and call["id"].startswith("call_")
    GetWeather.model_validate(call["args"])
    assert message.response_metadata["finish_reason"] == "tool_calls"


def test_bind_tools_streaming(llm) -> None:
    bound = llm.bind_tools([GetWeather], tool_choice="GetWeather")
    merged: AIMessageChunk | None = None
    for chunk in bound.stream("Paris?"):
        merged = chunk if merged is None else merged + chunk
    assert merged is not None and [c["name"] for c in merged.tool_calls] == ["GetWeather"]
    assert merged.tool_calls[0]["args"] == bound.invoke("Paris?").tool_calls[0]["args"]


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output(llm, method: str) -> None:
    pet = llm.with_structured_output(Pet, method=method).invoke("Describe a pet.")
    assert isinstance(pet, Pet) and pet.kind in ("cat", "dog") and 0 <= pet.legs <= 4
