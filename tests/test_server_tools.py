"""Tool calling and backpressure over HTTP (uvicorn on 127.0.0.1 in a thread, the official ``openai`` client).

The model's text is a test double: ``ScriptedAsyncLLM`` runs the real engine (tiny model: real steps, pages,
cancellation) but replaces each sampled token with the next token of a fixed script, ending with EOS -- so
the server's detokenizer, GLM-4 function-call parser and stream framing see exactly that text.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import threading
import time
import urllib.request

import pytest

import openai  # noqa: E402
import uvicorn  # noqa: E402

from autoglm_jax.engine import LLM, AsyncLLM, RequestOutput  # noqa: E402
from autoglm_jax.loading import EMBEDDED_DIR, from_pretrained  # noqa: E402
from autoglm_jax.server import create_app  # noqa: E402
from autoglm_jax.server.metrics import parse_metrics  # noqa: E402
from autoglm_jax.tokenizer import load_tokenizer  # noqa: E402

TOOLS = [{"type": "function", "function": {
             "name": "get_weather", "description": "Weather of a city",
             "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}},
         {"type": "function", "function": {"name": "search", "parameters": {"type": "object"}}}]
MESSAGES = [{"role": "user", "content": "What is the weather in Beijing?"}]
MAX_CONCURRENCY = 2


class ScriptedAsyncLLM(AsyncLLM):
    script_text = ""

    async def generate(self, prompt, params=None, request_id=None, *, priority=2):
        tok = self.engine.tokenizer
        script = tok.encode(self.script_text) + [tok.eos_token_ids[0]]
        real = super().generate(prompt, dataclasses.replace(params, max_tokens=len(script), ignore_eos=True,
                                                            temperature=0.0), request_id, priority=priority)
        try:
            n = 0
            async for out in real:
                n += 1
                last = n == len(script)
                yield RequestOutput(request_id=out.request_id, new_token_ids=(script[n - 1],), num_output_tokens=n,
                                    finished=last, finish_reason="stop" if last else None,
                                    stop_reason=script[-1] if last else None)
                if last:
                    return
        finally:
            await real.aclose()


@pytest.fixture(scope="module")
def served():
    tok = load_tokenizer(EMBEDDED_DIR)
    llm = LLM(from_pretrained("tiny"), tokenizer=tok, max_num_seqs=4, max_num_batched_tokens=64, max_model_len=512,
              seq_buckets=(4,), token_buckets=(64,))
    engine = ScriptedAsyncLLM(llm)
    app = create_app(engine, tok, model_name="tiny", max_concurrency=MAX_CONCURRENCY, log=lambda m: None)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0, timeout=120)
    yield engine, client, f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def metrics(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())


def collect_stream(stream):
    content, calls, ids, reasons = "", {}, [], []
    for c in stream:
        d = c.choices[0].delta
        content += d.content or ""
        for tc in d.tool_calls or []:
            if tc.id is not None:
                ids.append(tc.id)
                calls[tc.index] = [tc.id, tc.function.name, tc.function.arguments or ""]
            else:
                calls[tc.index][2] += tc.function.arguments or ""
        reasons.append(c.choices[0].finish_reason)
    return content, [tuple(calls[i]) for i in sorted(calls)], ids, reasons


@pytest.mark.parametrize("stream", [False, True])
def test_glm4_bare_function_call_becomes_tool_calls(served, stream):
    engine, client, _ = served
    engine.script_text = 'get_weather\n{"city": "Beijing"}'
    kw = dict(model="tiny", messages=MESSAGES, tools=TOOLS, tool_choice="auto")
    if not stream:
        r = client.chat.completions.create(**kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls"
        assert msg.content is None and len(msg.tool_calls) == 1
        call = msg.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Beijing"}
        return
    content, calls, ids, reasons = collect_stream(client.chat.completions.create(**kw, stream=True))
    assert content == ""  # never left in content
    assert len(ids) == 1 and [(c[0], c[1]) for c in calls] == [(ids[0], "get_weather")]
    assert json.loads(calls[0][2]) == {"city": "Beijing"}
    assert reasons[-1] == "tool_calls" and reasons[:-1] == [None] * (len(reasons) - 1)


def test_tagged_calls_with_content_streamed_and_not(served):
    engine, client, _ = served
    engine.script_text = ("Checking.<tool_call>search\n<arg_key>q</arg_key>\n<arg_value>jax</arg_value>\n"
                          "</tool_call><tool_call>get_weather\n{\"city\": \"Paris\"}</tool_call>")
    kw = dict(model="tiny", messages=MESSAGES, tools=TOOLS)
    msg = client.chat.completions.create(**kw).choices[0].message
    assert msg.content == "Checking."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in msg.tool_calls] == \
        [("search", {"q": "jax"}), ("get_weather", {"city": "Paris"})]
    content, calls, ids, reasons = collect_stream(client.chat.completions.create(**kw, stream=True))
    assert content == "Checking." and len(set(ids)) == 2 and reasons[-1] == "tool_calls"
    assert [(n, json.loads(a)) for _, n, a in calls] == [("search", {"q": "jax"}), ("get_weather", {"city": "Paris"})]


def test_without_tools_the_text_stays_content(served):
    engine, client, _ = served
    engine.script_text = 'get_weather\n{"city": "Beijing"}'
    for tools in ({}, {"tools": TOOLS, "tool_choice": "none"}):
        r = client.chat.completions.create(model="tiny", messages=MESSAGES, **tools)
        assert r.choices[0].message.content == engine.script_text and not r.choices[0].message.tool_calls
        assert r.choices[0].finish_reason == "stop"


def test_named_tool_choice_prefills_the_name(served):
    engine, client, _ = served
    engine.script_text = '{"q": "weather"}'
    r = client.chat.completions.create(model="tiny", messages=MESSAGES, tools=TOOLS,
                                       tool_choice={"type": "function", "function": {"name": "search"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "search" and json.loads(call.function.arguments) == {"q": "weather"}


def test_queue_full_answers_429_with_retry_after_and_pages_return(served):
    engine, client, url = served
    engine.script_text = "x = 1\n" * 60
    streams = [client.completions.create(model="tiny", prompt="a", stream=True) for _ in range(MAX_CONCURRENCY)]
    try:
        for s in streams:
            next(iter(s))  # admitted and producing
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model="tiny", prompt="b", max_tokens=2)
        assert e.value.status_code == 429 and int(e.value.response.headers["Retry-After"]) >= 1
        assert e.value.body["code"] == "rate_limit_exceeded" and "limit of 2" in e.value.body["message"]
    finally:
        for s in streams:
            s.close()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metrics(url)
        if m["autoglm_requests_in_flight"] == 0 and m["autoglm_kv_pages_in_use"] == 0:
            break
        time.sleep(0.1)
    assert m["autoglm_requests_in_flight"] == 0 and m["autoglm_kv_pages_in_use"] == 0
    assert m['autoglm_requests_total{endpoint="completions",status="429"}'] == 1
    engine.script_text = "ok"
    assert client.completions.create(model="tiny", prompt="c").choices[0].text == "ok"  # serving again


def test_client_gone_before_a_non_streamed_answer_aborts_it(served):
    engine, _, url = served
    engine.script_text = "y = 2\n" * 80
    before = metrics(url).get('autoglm_request_finished_total{finish_reason="abort"}', 0)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"model": "tiny", "prompt": "z", "max_tokens": 400}).encode()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n" % len(body) + body)
        deadline = time.monotonic() + 30
        while metrics(url)["autoglm_kv_pages_in_use"] == 0 and time.monotonic() < deadline:
            time.sleep(0.02)  # until the request holds pages
        assert metrics(url)["autoglm_requests_in_flight"] == 1
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        m = metrics(url)
        if m["autoglm_requests_in_flight"] == 0 and m["autoglm_kv_pages_in_use"] == 0:
            break
        time.sleep(0.05)
    assert m["autoglm_requests_in_flight"] == 0 and m["autoglm_kv_pages_in_use"] == 0
    assert m['autoglm_request_finished_total{finish_reason="abort"}'] == before + 1
