"""GLM-4.6V tool calls: parsing (whole, multiple, streamed, malformed), the chat template round trip with a tool
result, and the OpenAI ``tool_calls`` of generate.py --json and batch results on a model whose output is forced."""

import io
import itertools
import json
import random
from contextlib import redirect_stdout

import numpy as np
import pytest

from glm4v_ms.apps.tiny import make_tiny_model
from glm4v_ms.processing.processor import Glm4vProcessor, PromptError
from glm4v_ms.runtime.tool_calls import ToolCallStream, parse_call_body, parse_tool_calls

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "code": {"type": "string"}}}}}
CALL = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
        "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n<arg_key>code</arg_key>\n<arg_value>007</arg_value>\n"
        "</tool_call>")


def _ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def test_well_formed_call_typed_by_the_schema():
    r = parse_tool_calls("Let me look.\n" + CALL, [WEATHER], new_id=_ids())
    assert r.content == "Let me look." and r.finish_reason == "tool_calls"
    (call,) = r.tool_calls
    assert call.as_openai() == {"id": "call_0", "type": "function", "function": {
        "name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3, "code": "007"})}}
    # without a schema, "007" is not valid JSON and stays text; 3 becomes a number
    assert parse_tool_calls(CALL).tool_calls[0].arguments == {"city": "Paris", "days": 3, "code": "007"}


def test_value_types_without_schema():
    body = ("f\n<arg_key>o</arg_key><arg_value>{\"a\": [1, 2]}</arg_value><arg_key>b</arg_key><arg_value>true"
            "</arg_value><arg_key>p</arg_key><arg_value>True</arg_value><arg_key>n</arg_key><arg_value>null"
            "</arg_value><arg_key>s</arg_key><arg_value>two words</arg_value><arg_key>m</arg_key>"
            "<arg_value>line 1\nline 2</arg_value>")
    assert parse_call_body(body) == ("f", {"o": {"a": [1, 2]}, "b": True, "p": True, "n": None, "s": "two words",
                                           "m": "line 1\nline 2"})
    assert parse_call_body("noargs") == ("noargs", {})


def test_multiple_calls_in_order():
    text = (CALL + "\n<tool_call>get_time\n<arg_key>zone</arg_key>\n<arg_value>CET</arg_value>\n</tool_call>"
            "<tool_call>ping</tool_call>")
    r = parse_tool_calls(text, [WEATHER])
    assert [c.name for c in r.tool_calls] == ["get_weather", "get_time", "ping"]
    assert r.tool_calls[1].arguments == {"zone": "CET"} and r.tool_calls[2].arguments == {}
    assert len({c.id for c in r.tool_calls}) == 3 and all(c.id.startswith("call_") for c in r.tool_calls)
    assert r.content == ""


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 64])
def test_streamed_equals_whole(chunk):
    text = "Checking <b>now</b> < 3.\n" + CALL + " and " + CALL.replace("Paris", "Rome") + " <tool_call>bad"
    whole = parse_tool_calls(text, [WEATHER], new_id=_ids())
    stream, events = ToolCallStream([WEATHER], new_id=_ids()), []
    close_at = [text.find("</tool_call>") + len("</tool_call>"),
                text.rfind("</tool_call>") + len("</tool_call>")]
    for start in range(0, len(text), chunk):
        got = stream.feed(text[start:start + chunk])
        end = start + chunk
        for kind, value in got:
            if kind == "tool_call":  # emitted by the very piece that closes it, not before
                k = len([e for e in events if e[0] == "tool_call"])
                assert start < close_at[k] <= end
            events.append((kind, value))
    events += stream.finish()
    assert "".join(v for k, v in events if k == "text") == "Checking <b>now</b> < 3.\n and  <tool_call>bad"
    calls = [v for k, v in events if k == "tool_call"]
    assert [(c.name, c.arguments, c.id) for c in calls] == [(c.name, c.arguments, c.id) for c in whole.tool_calls]
    assert [c.arguments["city"] for c in calls] == ["Paris", "Rome"]
    assert calls[1].as_delta(1) == dict(calls[1].as_openai(), index=1)


@pytest.mark.parametrize("text", [
    "<tool_call>\n<arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",        # no name
    "<tool_call>f\n<arg_key>a</arg_key></tool_call>",                                # key without value
    "<tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value>junk</tool_call>",    # trailing text
    "<tool_call>f\nhello <arg_key>a</arg_key><arg_value>1</arg_value></tool_call>",  # text before the pairs
    "<tool_call>two words</tool_call>",                                              # not a name
    "<tool_call>f\n<arg_key>a</arg_key><arg_value>1</arg_value>",                    # never closed
    "<tool_call>f<tool_call>g</tool_call>",                                          # nested opening
    "</tool_call> stray close",
])
def test_malformed_call_is_returned_as_text(text):
    r = parse_tool_calls("before " + text, [WEATHER])
    assert r.tool_calls == [] and r.content == "before " + text and r.finish_reason is None


def test_random_markup_never_crashes():
    rng = random.Random(0)
    parts = ["<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "f", "\n",
             " ", "x", "{", "}", "1", "<", ">", "<tool_", "call>", "\"", "[", "True"]
    for _ in range(400):
        text = "".join(rng.choice(parts) for _ in range(rng.randint(0, 30)))
        r = parse_tool_calls(text)
        if not r.tool_calls:
            assert r.content == text
        for c in r.tool_calls:
            json.loads(c.as_openai()["function"]["arguments"])


# ------------------------------------------------------------------------------------------- template and apps
@pytest.fixture(scope="module")
def folder46(tmp_path_factory):
    return make_tiny_model(str(tmp_path_factory.mktemp("tiny46tools") / "m"), variant="4.6v")


def test_round_trip_through_the_chat_template(folder46):
    proc = Glm4vProcessor.from_pretrained(folder46)
    openai_call = {"id": "call_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris", "days": 3})}}
    messages = [{"role": "user", "content": "Weather in Paris for 3 days?"},
                {"role": "assistant", "content": None, "tool_calls": [openai_call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp\": 21}"}]
    text = proc.apply_chat_template(messages, add_generation_prompt=True, tools=[WEATHER])
    assert text.startswith("[gMASK]<sop><|system|>\n# Tools") and json.dumps(WEATHER) in text
    call_markup = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
                   "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>")
    assert text.endswith("<|assistant|>\n</think>\n" + call_markup
                         + "<|observation|>\n<tool_response>\n{\"temp\": 21}\n</tool_response><|assistant|>\n")
    # the markup the template writes parses back into the same call
    (back,) = parse_tool_calls(call_markup, [WEATHER]).tool_calls
    assert (back.name, back.arguments) == ("get_weather", {"city": "Paris", "days": 3})
    # tokenised: the markup tokens are single tokens of the vocabulary
    ids = proc.apply_chat_template(messages, add_generation_prompt=True, tools=[WEATHER], tokenize=True)
    vocab = proc.tokenizer.get_vocab()
    for tag in ("<tool_call>", "</tool_call>", "<tool_response>", "<|observation|>"):
        assert vocab[tag] in ids[0]
    bad = [messages[0], {"role": "assistant", "content": None, "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": "{not json"}}]}]
    with pytest.raises(PromptError, match="not valid JSON"):
        proc.apply_chat_template(bad, tools=[WEATHER])


def _force_output(monkeypatch, tokenizer, text, eos):
    """Make generation emit ``text`` (tokenised) and then ``eos``, whatever the model computes."""
    import glm4v_ms.runtime.generation as generation

    forced = tokenizer.encode(text, add_special_tokens=False) + [eos]

    def fake_iter_tokens(model, inputs, gen, thinking=None, stats=None, mode="graph", **session_options):
        batch = np.asarray(inputs["input_ids"]).shape[0]
        for t in forced:
            yield np.full((batch,), t, dtype=np.int64)

    monkeypatch.setattr(generation, "iter_tokens", fake_iter_tokens)


REPLY = "<think>I need the weather.</think>Let me check.\n" + CALL


def test_generate_json_prints_openai_tool_calls(folder46, tmp_path, monkeypatch):
    import generate as cli

    proc = Glm4vProcessor.from_pretrained(folder46)
    _force_output(monkeypatch, proc.tokenizer, REPLY, proc.tokenizer.convert_tokens_to_ids("<|observation|>"))
    tools_file = tmp_path / "tools.json"
    tools_file.write_text(json.dumps([WEATHER]))
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli.main(["--model_name", folder46, "--prompt", "Weather in Paris?", "--tools", str(tools_file),
                       "--json", "--mode", "eager", "--max_new_tokens", "200"])
    assert rc == 0
    record = json.loads(out.getvalue().strip().splitlines()[-1])
    assert record["thinking"] == "I need the weather." and record["answer"] == "Let me check."
    (call,) = record["tool_calls"]
    assert call["type"] == "function" and call["id"].startswith("call_")
    assert call["function"] == {"name": "get_weather",
                                "arguments": json.dumps({"city": "Paris", "days": 3, "code": "007"})}


def test_generate_tools_file_errors(folder46, tmp_path, capsys):
    import generate as cli

    bad = tmp_path / "bad.json"
    bad.write_text("[{\"type\": \"function\"}]")
    assert cli.main(["--model_name", folder46, "--prompt", "x", "--tools", str(bad)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: --tools") and "no function name" in err[-1]


def test_batch_results_carry_tool_calls(folder46, monkeypatch):
    from glm4v_ms.apps.batch import RequestError, encode_request, generate_batch, parse_request
    from glm4v_ms.apps.pipeline import Glm4vPipeline

    pipe = Glm4vPipeline.from_pretrained(folder46, mode="eager")
    tok = pipe.processor.tokenizer
    _force_output(monkeypatch, tok, REPLY, tok.convert_tokens_to_ids("<|observation|>"))
    with_tools = parse_request({"id": "a", "prompt": "Weather?", "tools": [WEATHER], "max_new_tokens": 200}, 0)
    plain = parse_request({"id": "b", "prompt": "Weather?", "max_new_tokens": 200}, 1)
    records = [generate_batch(pipe, [encode_request(pipe, r, {})])[0] for r in (with_tools, plain)]
    assert records[0]["answer"] == "Let me check." and records[0]["tool_calls"][0]["function"]["name"] == \
        "get_weather"
    # without tools nothing is parsed: the markup stays in the answer
    assert records[1]["tool_calls"] == [] and "<tool_call>get_weather" in records[1]["answer"]
    with pytest.raises(RequestError, match="'tools' must be a list"):
        parse_request({"prompt": "x", "tools": {"name": "f"}}, 2)


def test_a_template_without_tools_refuses_them(tmp_path):
    from glm4v_ms.processing.tiny_tokenizer import build_tiny_tokenizer

    build_tiny_tokenizer(str(tmp_path))  # GLM-4.1V's template: no tool calling
    proc = Glm4vProcessor.from_pretrained(str(tmp_path))
    with pytest.raises(PromptError, match="takes no tools"):
        proc.apply_chat_template([{"role": "user", "content": "hi"}], tools=[WEATHER])
