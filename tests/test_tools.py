"""Tool calling on /v1/chat/completions through the official openai client, on a live server with a
random-weight model: calls that must be made parse and validate for every seed; auto lets the
model choose; conversations carrying calls and results are accepted; bad tool input is a 400."""

from __future__ import annotations

import json

import httpx
import pytest

from gptstack.chat import DEFAULT_CHAT_TEMPLATE, chat_segments, template_messages, tools_text

openai = pytest.importorskip("openai")
jsonschema = pytest.importorskip("jsonschema")

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                             "unit": {"enum": ["celsius", "fahrenheit"]},
                                             "days": {"type": "integer", "minimum": 1, "maximum": 14}},
           "required": ["city", "unit", "days"]}
TIME = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 12}}, "required": ["timezone"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "The forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": TIME}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)


def tokenize(server, prompt: str) -> list[int]:
    return httpx.post(server.url + "/tokenize", headers=server.headers, json={"prompt": prompt}).json()["tokens"]


def assert_valid_calls(calls, names=("get_weather", "get_time")):
    assert calls, "no tool call"
    for call in calls:
        assert call.type == "function" and call.id.startswith("call_") and call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_named_tool_choice_validates_for_every_seed(client):
    for seed in range(20):
        out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, seed=seed, max_tokens=90,
                                             tool_choice={"type": "function", "function": {"name": "get_weather"}})
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        assert len(choice.message.tool_calls) == 1
        assert_valid_calls(choice.message.tool_calls, names=("get_weather",))


def test_a_streamed_call_assembles_into_the_same_shape(client):
    for seed in range(20):
        chunks = list(client.chat.completions.create(
            model="tiny", messages=MESSAGES, tools=TOOLS, seed=seed, max_tokens=90, stream=True,
            tool_choice={"type": "function", "function": {"name": "get_time"}}))
        deltas = [c.choices[0].delta for c in chunks if c.choices]
        assert deltas[0].role == "assistant" and chunks[-1].choices[0].finish_reason == "tool_calls"
        calls = [call for d in deltas for call in (d.tool_calls or [])]
        assert len(calls) == 1 and calls[0].index == 0 and calls[0].function.name == "get_time"
        jsonschema.validate(json.loads(calls[0].function.arguments), TIME)
        assert not any(d.content for d in deltas)


def test_required_calls_one_of_the_tools_and_parallel_false_means_one(client):
    for seed in range(5):
        out = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, seed=seed, max_tokens=90,
                                             tool_choice="required", parallel_tool_calls=False)
        assert out.choices[0].finish_reason == "tool_calls" and len(out.choices[0].message.tool_calls) == 1
        assert_valid_calls(out.choices[0].message.tool_calls)


def test_auto_lets_the_model_choose_and_reads_back_what_it_chose(client, server):
    """A model that prefers "<" chooses the call branch; either way the reply is well-formed."""
    lt = tokenize(server, " <")[0]
    called = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, seed=1, max_tokens=90,
                                            logit_bias={str(lt): 100})
    assert called.choices[0].finish_reason == "tool_calls"
    assert_valid_calls(called.choices[0].message.tool_calls)
    texted = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, seed=1, max_tokens=8,
                                            logit_bias={str(lt): -100})
    assert texted.choices[0].message.tool_calls is None and texted.choices[0].message.content
    none = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="none", seed=1,
                                          max_tokens=8)
    assert none.choices[0].message.tool_calls is None


def test_a_conversation_with_calls_and_results_is_rendered_as_fine_tuning_writes_it(client, server):
    """The call and its result go back to the model in the chat format, the same text chat_segments
    gives fine-tuning (so a model trained here reads what the server sends)."""
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": json.dumps({"city": "Paris", "unit": "celsius", "days": 1})}}
    messages = MESSAGES + [{"role": "assistant", "content": None, "tool_calls": [call]},
                           {"role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21}"}]
    out = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, tool_choice="none", max_tokens=4)
    segments = chat_segments(messages + [{"role": "assistant", "content": "It is 21."}], TOOLS)
    prompt = "".join(text for text, _ in segments[:-1])
    assert prompt.startswith(tools_text(TOOLS)) and 'Assistant: <tool_call>[{"name": "get_weather"' in prompt
    assert "Tool: {\"temperature\": 21}\n" in prompt
    from jinja2.sandbox import ImmutableSandboxedEnvironment
    rendered = ImmutableSandboxedEnvironment().from_string(DEFAULT_CHAT_TEMPLATE).render(
        messages=template_messages(messages), tools=TOOLS, tools_text=tools_text(TOOLS))
    assert rendered == prompt
    assert out.usage.prompt_tokens == len(tokenize(server, prompt))


@pytest.mark.parametrize("extra, message", [
    ({"tool_choice": "required"}, "tool_choice needs tools"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
                                                                             {"a": {"type": "strin"}}}}}],
      "tool_choice": "required"}, "Invalid type"),
    ({"tools": TOOLS + TOOLS[:1]}, "distinct names"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "not both"),
])
def test_bad_tool_input_is_a_400(client, extra, message):
    body = {"messages": MESSAGES, "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError, match=message):
        client.chat.completions.create(model="tiny", **body)
