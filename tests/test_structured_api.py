"""Structured outputs and tool calling over HTTP, against one real `reft-serve serve` process: OpenAI's
response_format and vLLM's structured_outputs on both OpenAI endpoints and /generate, the unmodified
openai client's parse() and a tool-call round trip (streaming and not), and the refusals.

The engine-level suite (tests/test_structured_engine.py) runs every schema of
tests/data/structured_schemas.json through the base model and two adapters; here a handful of them go
through the HTTP layer, concurrently, mixed with free requests and compositions.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import jsonschema
import openai
import pydantic
import pytest

from server import adapter_file
from server.api.protocol import ChatDelta, Tool
from server.api.tools import StreamedAnswer
from tests.conftest import error_of
from tests.test_api import emoji_bytes, sse_data
from tests.test_registry import emoji, variant

SCHEMAS = json.loads((Path(__file__).parent / "data" / "structured_schemas.json").read_text())
MAX_GRAMMAR_BYTES = 8192
MODELS = ("base", "emoji", "shifted", "emoji+shifted")
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 30},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "description": "The current time in a timezone.",
    "parameters": {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 30}},
                   "required": ["timezone"]}}}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


@pytest.fixture(scope="module")
def server(tmp_path_factory, reft_server_factory):
    root = tmp_path_factory.mktemp("structured")
    registry = root / "adapters"
    registry.mkdir()
    (registry / "emoji.safetensors").write_bytes(emoji_bytes())
    (registry / "shifted.safetensors").write_bytes(adapter_file.to_bytes(variant(emoji(), 0.5)))
    env = {"REFT_MAX_NEW_TOKENS": "128", "REFT_MAX_BATCH_SIZE": "16", "REFT_MAX_GRAMMAR_BYTES": str(MAX_GRAMMAR_BYTES)}
    srv = reft_server_factory(registry, root / "server.log", env)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=900) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="sk-anything", max_retries=0, timeout=900)


def valid(text: str, schema: dict) -> object:
    value = json.loads(text)
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(value)
    return value


def messages(ask: str) -> list[dict]:
    return [{"role": "system", "content": "Answer with JSON only."}, {"role": "user", "content": ask}]


def test_response_format_json_schema_on_both_endpoints_with_adapters_compositions_and_free_rows(client):
    """Four schemas x four models x two endpoints at once, with free requests in the same batches."""
    jobs = []
    for i, s in enumerate(SCHEMAS[:4]):
        fmt = {"type": "json_schema", "json_schema": {"name": s["name"], "schema": s["schema"], "strict": True}}
        model = MODELS[i % len(MODELS)]
        sampling = {"temperature": 0.8, "seed": i} if i % 2 else {"temperature": 0}
        jobs.append(("chat", s, {"model": model, "messages": messages(s["ask"]), "max_tokens": 64,
                                 "response_format": fmt, **sampling}))
        jobs.append(("completions", s, {"model": MODELS[(i + 1) % len(MODELS)], "prompt": f"{s['ask']} JSON:",
                                        "max_tokens": 64, "response_format": fmt, **sampling}))
        jobs.append(("free", None, {"model": model, "prompt": s["ask"], "max_tokens": 12}))

    def run(job):
        kind, s, body = job
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        r = client.post(path, json=body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return kind, s, choice.get("message", {}).get("content") if kind == "chat" else choice["text"], choice

    with ThreadPoolExecutor(len(jobs)) as pool:
        done = list(pool.map(run, jobs))
    finished = 0
    for _, s, text, choice in done:
        if s is None or choice["finish_reason"] == "length":
            continue
        assert choice["finish_reason"] == "stop", choice
        valid(text, s["schema"])
        finished += 1
    assert finished >= 6  # of 8 constrained answers; stopping at max_tokens is the one tolerated exception


def test_json_object_on_both_endpoints_and_text_is_free(client):
    for path, body in (("/v1/chat/completions", {"messages": messages("Describe a cat.")}),
                       ("/v1/completions", {"prompt": "A cat, as JSON:"})):
        r = client.post(path, json={"model": "emoji", "max_tokens": 96, "response_format": {"type": "json_object"},
                                    **body})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] if "message" in choice else choice["text"]
        if choice["finish_reason"] == "stop":
            assert isinstance(json.loads(text), dict)
        else:
            assert choice["finish_reason"] == "length" and text.startswith("{")
    r = client.post("/v1/completions", json={"model": "base", "prompt": "Hello", "max_tokens": 4,
                                             "response_format": {"type": "text"}})
    assert r.status_code == 200


class Sentiment(pydantic.BaseModel):
    label: str = pydantic.Field(json_schema_extra={"enum": ["positive", "negative", "neutral"]})
    confidence: float = pydantic.Field(ge=0, le=1)
    keywords: list[str] = pydantic.Field(max_length=3)


@pytest.mark.parametrize("model", ["emoji", "emoji+shifted"])
def test_the_openai_client_s_parse_with_a_pydantic_model(oai, model):
    completion = oai.chat.completions.parse(
        model=model, messages=messages("Classify: 'What a wonderful day, I love it!'"),
        response_format=Sentiment, max_tokens=96, temperature=0)
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice
    parsed = choice.message.parsed
    assert isinstance(parsed, Sentiment) and parsed.label in ("positive", "negative", "neutral")


def test_structured_outputs_choice_regex_json_and_grammar_on_every_endpoint(client):
    choice = {"choice": ["yes", "no", "maybe"]}
    regex = {"regex": r"[A-Z]{3}-[0-9]{3}"}
    grammar = {"grammar": 'root ::= "(" [0-9] [0-9]? ("+" [0-9] [0-9]?)? ")"'}
    schema = SCHEMAS[1]["schema"]
    checks = [(choice, lambda t: t in ("yes", "no", "maybe")), (regex, lambda t: re.fullmatch(r"[A-Z]{3}-[0-9]{3}", t)),
              (grammar, lambda t: re.fullmatch(r"\([0-9]{1,2}(\+[0-9]{1,2})?\)", t)),
              ({"json": schema}, lambda t: valid(t, schema) is not None),
              ({"json": json.dumps(schema)}, lambda t: valid(t, schema) is not None)]
    def ask(so: dict) -> list[tuple[dict, str, httpx.Response]]:
        chat = client.post("/v1/chat/completions", json={"model": "shifted", "messages": messages("Answer."),
                                                         "max_tokens": 48, "structured_outputs": so})
        comp = client.post("/v1/completions", json={"model": "base", "prompt": "Answer:", "max_tokens": 48,
                                                    "structured_outputs": so, "temperature": 1.0, "seed": 5})
        gen = client.post("/generate", json={"adapter": "emoji", "prompt": "Answer:", "max_new_tokens": 48,
                                             "structured_outputs": so})
        return [(so, "chat", chat), (so, "completions", comp), (so, "generate", gen)]

    with ThreadPoolExecutor(len(checks)) as pool:  # one batch: fifteen rows, five constraints, three endpoints
        answers = dict(zip([json.dumps(so) for so, _ in checks], pool.map(ask, [so for so, _ in checks]),
                           strict=True))
    stopped = 0
    for so, ok in checks:
        for _, kind, r in answers[json.dumps(so)]:
            assert r.status_code == 200, (so, r.text)
            body = r.json()
            out = body["choices"][0] if "choices" in body else body
            text = out["message"]["content"] if kind == "chat" else out["text"]
            if out["finish_reason"] == "length":  # the one tolerated exception (a long number, say)
                continue
            assert out["finish_reason"] == "stop" and ok(text), (so, kind, body)
            stopped += 1
    assert stopped >= 12  # of 15
    with client.stream("POST", "/generate", json={"prompt": "Answer:", "max_new_tokens": 16, "stream": True,
                                                  "structured_outputs": choice}) as r:
        assert r.status_code == 200, r.read()
        events = [json.loads(d) for d in sse_data(r) if d != "[DONE]"]
    assert events, "the stream sent no event"
    assert "".join(e["text"] for e in events) in ("yes", "no", "maybe") and events[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize(("path", "body", "status", "words"), [
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "foo"}}}}, 400, 'invalid JSON schema: Unsupported type "foo"'),
    ("/v1/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, 400,
     "needs json_schema.schema"),
    ("/v1/completions", {"response_format": {"type": "yaml"}}, 422, "response_format.type"),
    ("/v1/completions", {"structured_outputs": {"regex": "a(b"}}, 400, "invalid regex: Regex parsing error"),
    ("/generate", {"structured_outputs": {"grammar": "root ::= nothing"}}, 400,
     'invalid grammar: EBNF parser error at line 1, column 10: Rule "nothing" is not defined'),
    ("/v1/completions", {"structured_outputs": {"regex": "a", "choice": ["b"]}}, 400, "exactly one of"),
    ("/v1/completions", {"structured_outputs": {"json": "{not json"}}, 400, "not valid JSON"),
    ("/v1/completions", {"structured_outputs": {"choice": ["a"]}, "response_format": {"type": "json_object"}}, 400,
     "not both"),
    ("/v1/completions", {"response_format": {"type": "json_object"}, "ignore_eos": True}, 400, "ignore_eos"),
    ("/v1/completions", {"structured_outputs": {"json": {"type": "object", "description": "x" * MAX_GRAMMAR_BYTES}}},
     413, f"accepts at most {MAX_GRAMMAR_BYTES}"),
    ("/v1/chat/completions", {"tool_choice": "required"}, 400, "tool_choice needs tools"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     400, "'nope', which is not among the tools (get_weather)"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required",
                              "response_format": {"type": "json_object"}}, 400, "cannot be combined"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "object", "properties": {"a": {"allOf": [{"type": "integer"}, {"minimum": 2}]}}}}}}, 400,
     "invalid JSON schema: allOf is not supported (at #/properties/a)"),
    ("/v1/completions", {"response_format": {"type": "json_object"}, "stop": ["}"]}, 400,
     "stop cannot be combined with a structured output"),
    ("/generate", {"structured_outputs": {"choice": ["a", "b"]}, "stop_token_ids": [5]}, 400,
     "stop_token_ids cannot be combined with a structured output"),
    ("/v1/chat/completions", {"tools": [WEATHER], "tool_choice": "required", "stop": "\n"}, 400,
     "stop cannot be combined with a structured output"),
])
def test_refusals_say_what_is_wrong_before_queueing(client, path, body, status, words):
    base = ({"model": "emoji", "messages": messages("x")} if "chat" in path else
            {"adapter": "emoji", "prompt": "x"} if path == "/generate" else {"model": "emoji", "prompt": "x"})
    message = error_of(client.post(path, json={**base, **body}), status)
    assert words in message, message


def _weather_round_trip(oai, stream: bool, tool_choice) -> None:
    history = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]
    kwargs = {"model": "emoji", "messages": history, "tools": [WEATHER, TIME], "tool_choice": tool_choice,
              "max_tokens": 64, "temperature": 0}
    if stream:
        calls: dict[int, dict] = {}
        finish = None
        for chunk in oai.chat.completions.create(stream=True, **kwargs):
            for c in chunk.choices:
                finish = c.finish_reason or finish
                for d in c.delta.tool_calls or []:
                    entry = calls.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                    entry["id"] = d.id or entry["id"]
                    entry["name"] += (d.function.name or "") if d.function else ""
                    entry["arguments"] += (d.function.arguments or "") if d.function else ""
        assert finish == "tool_calls" and len(calls) == 1
        call = calls[0]
        call_id, name, arguments = call["id"], call["name"], call["arguments"]
    else:
        answer = oai.chat.completions.create(**kwargs).choices[0]
        assert answer.finish_reason == "tool_calls" and answer.message.content is None
        (tc,) = answer.message.tool_calls
        call_id, name, arguments = tc.id, tc.function.name, tc.function.arguments
    assert call_id.startswith("call_")
    assert name in ("get_weather", "get_time") if tool_choice == "required" else name == "get_weather"
    schema = WEATHER if name == "get_weather" else TIME
    args = valid(arguments, schema["function"]["parameters"])
    history += [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}]},
        {"role": "tool", "tool_call_id": call_id, "content": json.dumps({"temperature": 18, **args})},
    ]
    final = oai.chat.completions.create(model="emoji", messages=history, tools=[WEATHER, TIME], tool_choice="none",
                                        max_tokens=24, temperature=0)
    assert final.choices[0].finish_reason in ("stop", "length") and final.choices[0].message.content


def test_a_tool_call_round_trip_through_the_openai_client(oai):
    """required and a named function, streaming and not: four round trips at once."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    with ThreadPoolExecutor(4) as pool:
        for future in [pool.submit(_weather_round_trip, oai, stream, choice)
                       for stream in (False, True) for choice in ("required", named)]:
            future.result()


def test_tool_choice_auto_answers_in_text_or_a_call_and_says_which(oai):
    answer = oai.chat.completions.create(model="base", messages=[{"role": "user", "content": "Say hello."}],
                                         tools=[WEATHER], max_tokens=24, temperature=0).choices[0]
    if answer.finish_reason == "tool_calls":
        assert answer.message.tool_calls[0].function.name == "get_weather"
    else:
        assert answer.message.content and not answer.message.tool_calls


def test_a_streamed_call_comes_as_it_is_written_with_every_token_s_logprob(oai):
    """The first delta names the call, the arguments follow in fragments, they add up to the non-streamed answer's
    arguments, and each generated token's logprob is sent once; `auto` (held to the end) keeps its logprobs too."""
    named = {"type": "function", "function": {"name": "get_weather"}}
    kwargs = {"model": "emoji", "messages": [{"role": "user", "content": "Weather in Paris, in celsius?"}],
              "tools": [WEATHER, TIME], "max_tokens": 64, "temperature": 0, "logprobs": True, "top_logprobs": 2}
    whole = oai.chat.completions.create(tool_choice=named, **kwargs).choices[0]
    assert whole.finish_reason == "tool_calls", whole
    for choice in (named, "auto"):
        chunks = list(oai.chat.completions.create(tool_choice=choice, stream=True,
                                                  stream_options={"include_usage": True}, **kwargs))
        deltas = [d for c in chunks for ch in c.choices for d in ch.delta.tool_calls or []]
        logprobs = [e for c in chunks for ch in c.choices if ch.logprobs for e in ch.logprobs.content or []]
        assert len(logprobs) == chunks[-1].usage.completion_tokens and all(len(e.top_logprobs) == 2 for e in logprobs)
        if choice == "auto":
            continue
        assert deltas[0].id.startswith("call_") and deltas[0].type == "function"
        assert deltas[0].function.name == "get_weather" and deltas[0].function.arguments == ""
        fragments = [d.function.arguments for d in deltas[1:]]
        assert len(fragments) >= 3 and all(d.id is None and d.function.name is None for d in deltas[1:])
        assert "".join(fragments) == whole.message.tool_calls[0].function.arguments
        assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["tool_calls"]
        assert [e.token for e in logprobs] == [e.token for e in whole.logprobs.content]


def test_streamed_call_deltas_add_up_to_the_arguments_however_the_text_is_cut():
    """Every way of cutting a constrained call into pieces gives the same deltas' sum; a `}` inside a string or
    closing the arguments is held back only until the next piece shows it is not the call's own."""
    arguments = '{"city":"Pa}ris \\"x\\"}","unit":"celsius"}'
    text = '{"name":"get_weather","arguments":' + arguments + "}"
    tools = [Tool(**WEATHER), Tool(**TIME)]
    for size in range(1, len(text) + 1):
        stream, deltas, finish = StreamedAnswer(tools, constrained=True), [], None
        pieces = [text[i:i + size] for i in range(0, len(text), size)] + [""]
        for k, piece in enumerate(pieces):
            out, finish = stream.feed(piece, "stop" if k == len(pieces) - 1 else None)
            deltas += [d.tool_calls[0] for d in out]
        assert finish == "tool_calls" and deltas[0].function.name == "get_weather" and deltas[0].id
        assert "".join(d.function.arguments for d in deltas) == arguments, size
    cut = StreamedAnswer(tools, constrained=True)
    assert cut.feed(text[:12], "length") == ([ChatDelta(content=text[:12])], "length")
    cut = StreamedAnswer(tools, constrained=True)
    out, finish = cut.feed(text[:50], "length")
    assert finish == "length" and out[0].tool_calls[0].function.name == "get_weather"
    assert "".join(d.tool_calls[0].function.arguments for d in out) == text[34:50]
