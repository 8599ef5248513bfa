"""Tool calls through the server with the real openai SDK (issue 17's server part), on the tiny GLM-4.6V-Flash model.

A random model does not call tools, so its output is forced: the real engine runs every step (prefill into a slot,
shared decode steps), and only the tokens handed to the text layer are replaced by the tokens of a reply that calls
a tool. The app runs in-process (FastAPI's TestClient as the SDK's HTTP client: no port), so the forcing can be
installed with monkeypatch."""

import json

import numpy as np
import pytest

openai = pytest.importorskip("openai")
testclient = pytest.importorskip("fastapi.testclient")

from glm4v_ms.apps.preflight import TINY_RANDOM_46V, resolve_model  # noqa: E402

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}
CALL = "<tool_call>get_weather\n<arg_key>city</arg_key><arg_value>Paris</arg_value>\n" \
       "<arg_key>days</arg_key><arg_value>3</arg_value></tool_call>"
REPLY = "<think>I need the weather.</think>Let me check.\n" + CALL


@pytest.fixture(scope="module")
def app_client():
    from glm4v_ms.apps.pipeline import Glm4vPipeline
    from glm4v_ms.apps.serve.app import build_app
    from glm4v_ms.apps.serve.engine import ServeEngine
    from glm4v_ms.apps.serve.metrics import Metrics

    pipe = Glm4vPipeline.from_pretrained(resolve_model(TINY_RANDOM_46V), mode="eager")
    engine = ServeEngine(pipe, 2, 4, 1024, Metrics())
    engine.start()
    with testclient.TestClient(build_app(engine, ["tiny-4.6v"])) as http:
        yield pipe, openai.OpenAI(base_url="http://testserver/v1", api_key="none", http_client=http, max_retries=0)
    engine.shutdown()


@pytest.fixture
def forced(app_client, monkeypatch):
    """Replace the tokens the decode loop yields by REPLY's (the real steps still run underneath)."""
    import glm4v_ms.runtime.generation as generation

    pipe, _ = app_client
    tokens = pipe.processor.tokenizer.encode(REPLY, add_special_tokens=False)
    real = generation.iter_tokens

    def forced_iter_tokens(model, inputs, gen, thinking=None, stats=None, mode="graph", **options):
        steps = real(model, inputs, gen, thinking, stats, mode, **options)
        try:
            for t in tokens:
                got = next(steps)
                yield np.full_like(got, t)
        finally:
            steps.close()

    monkeypatch.setattr(generation, "iter_tokens", forced_iter_tokens)
    return len(tokens)


def _ask(client, n, **kw):
    # ignore_eos: the real loop runs as long as the forced reply; it ends when the forced tokens do
    return client.chat.completions.create(model="tiny-4.6v", messages=[{"role": "user", "content": "Weather in Paris?"}],
                                          tools=[WEATHER], max_tokens=n + 4, temperature=0,
                                          extra_body={"ignore_eos": True}, **kw)


def test_tool_call_non_streaming(app_client, forced):
    _, client = app_client
    r = _ask(client, forced)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    assert choice.message.model_extra["reasoning_content"] == "I need the weather."
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}


def test_tool_call_streamed_as_one_delta(app_client, forced):
    _, client = app_client
    chunks = list(_ask(client, forced, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    calls = [d.tool_calls for d in deltas if d.tool_calls]
    assert len(calls) == 1 and len(calls[0]) == 1  # the whole call in one delta, once it closed
    call = calls[0][0]
    assert call.index == 0 and call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    text = "".join(d.content or "" for d in deltas)
    assert "<tool_call>" not in text and text.strip() == "Let me check."
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


def test_tool_result_goes_back_into_the_template(app_client):
    """A second turn with the assistant's call and the tool's result is accepted and answered (real model)."""
    _, client = app_client
    call = {"id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}}
    r = client.chat.completions.create(model="tiny-4.6v", tools=[WEATHER], max_tokens=3, temperature=0, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": json.dumps({"forecast": "sunny"})}])
    assert r.usage.completion_tokens >= 1
    pipe, _ = app_client
    # the template rendered the observation: the prompt is longer than without the tool turn
    short = client.chat.completions.create(model="tiny-4.6v", tools=[WEATHER], max_tokens=1, temperature=0,
                                           messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + 10


@pytest.mark.parametrize("body, words", [
    ({"tools": "nope"}, ["'tools' must be a list"]),
    ({"tools": [{"type": "function"}]}, ["tools[0]"]),
    ({"tools": [WEATHER], "tool_choice": "required"}, ["tool_choice", "not supported"]),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": "bad"}, {"role": "user", "content": "hi"}]},
     ["tool_calls"]),
])
def test_tool_request_errors(app_client, body, words):
    _, client = app_client
    kw = {"model": "tiny-4.6v", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]}
    kw.update(body)
    messages = kw.pop("messages")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(messages=messages, extra_body={k: kw.pop(k) for k in list(kw)
                                                                      if k not in ("model", "max_tokens")}, **kw)
    msg = e.value.body["message"] if isinstance(e.value.body, dict) else str(e.value)
    assert all(w in msg for w in words), msg
