"""Real clients against a live server (random-weight model), as application developers use them:
LangChain's ChatOpenAI (invoke, stream, batch, structured output in both modes, bound tools, a tool
result sent back) and LiteLLM. Structured output and forced tool calls hold for 20 seeds of 20."""

from __future__ import annotations

import os

import pytest
from pydantic import BaseModel, Field

langchain_openai = pytest.importorskip("langchain_openai")
litellm = pytest.importorskip("litellm")
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402

SEEDS = range(20)


class Weather(BaseModel):
    """A city's forecast request."""
    city: str = Field(max_length=16)
    days: int = Field(ge=1, le=14)


@tool(args_schema=Weather)
def get_weather(city: str, days: int) -> str:
    """The forecast for a city over some days. (Its city is bounded: a random-weight model would
    fill an unbounded string until max_tokens, and a call cut there cannot validate.)"""
    return f"sunny in {city} for {days} days"


@pytest.fixture(scope="module")
def chat_model(server):
    def make(**settings):
        return langchain_openai.ChatOpenAI(base_url=server.url + "/v1", api_key=server.key, model="tiny",
                                           max_retries=0, **{"max_tokens": 60, **settings})
    return make


def test_invoke_stream_and_batch(chat_model):
    model = chat_model(temperature=0)
    reply = model.invoke("Hello")
    assert isinstance(reply, AIMessage) and reply.usage_metadata["output_tokens"] > 0
    streamed = "".join(chunk.content for chunk in model.stream("Hello"))
    assert streamed == reply.content
    assert [r.content for r in model.batch(["Hello", "Hello"])] == [reply.content] * 2


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_structured_output_returns_the_object_for_every_seed(chat_model, method):
    for seed in SEEDS:
        structured = chat_model(seed=seed).with_structured_output(Weather, method=method)
        result = structured.invoke("Weather in Paris for three days?")
        assert isinstance(result, Weather), (method, seed, result)


def test_bound_tools_with_a_named_choice_give_valid_calls_for_every_seed(chat_model):
    for seed in SEEDS:
        model = chat_model(seed=seed).bind_tools([get_weather], tool_choice="get_weather")
        calls = model.invoke("Weather in Paris?").tool_calls
        assert len(calls) == 1 and calls[0]["name"] == "get_weather"
        get_weather.args_schema.model_validate(calls[0]["args"])      # the tool itself would accept them


def test_bound_tools_stream_into_the_same_calls(chat_model):
    for seed in SEEDS:
        model = chat_model(seed=seed).bind_tools([get_weather], tool_choice="get_weather")
        merged = None
        for chunk in model.stream("Weather in Paris?"):
            merged = chunk if merged is None else merged + chunk
        assert len(merged.tool_calls) == 1 and merged.tool_calls[0]["name"] == "get_weather"
        get_weather.args_schema.model_validate(merged.tool_calls[0]["args"])


def test_a_tool_result_goes_back_to_the_model(chat_model):
    model = chat_model(seed=0).bind_tools([get_weather], tool_choice="get_weather")
    question = HumanMessage("Weather in Paris?")
    call = model.invoke([question])
    result = ToolMessage(get_weather.invoke(call.tool_calls[0]["args"]), tool_call_id=call.tool_calls[0]["id"])
    answer = chat_model(seed=0).bind_tools([get_weather]).invoke([question, call, result])
    assert isinstance(answer, AIMessage) and (answer.content or answer.tool_calls)


def test_litellm_completion_and_tools(server, monkeypatch):
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    settings = {"model": "openai/tiny", "api_base": server.url + "/v1", "api_key": server.key, "max_tokens": 60}
    text = litellm.completion(messages=[{"role": "user", "content": "Hello"}], **settings)
    assert text.choices[0].message.content and text.usage.completion_tokens > 0
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": Weather.model_json_schema()}}]
    called = litellm.completion(messages=[{"role": "user", "content": "Weather?"}], tools=tools, seed=3,
                                tool_choice={"type": "function", "function": {"name": "get_weather"}}, **settings)
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls"
    Weather.model_validate_json(call.function.arguments)
    assert os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] == "True"
