"""``autoglm serve`` as a real process on 127.0.0.1 with the embedded tiny model, driven by the official
``openai`` client (and raw HTTP where the client cannot send the bad input). Loopback only; every loop is
bounded in count and time."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pytest

import openai  # noqa: E402

from autoglm_jax.server.metrics import parse_metrics  # noqa: E402

SERVER_ARGS = ["--max-model-len", "256", "--max-num-seqs", "32", "--max-num-batched-tokens", "64",
               "--seq-buckets", "32", "--token-buckets", "64", "--warmup", "greedy", "--max-concurrency", "64"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, cache_dir, extra=()):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "JAX_PLATFORMS": "cpu"}
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "autoglm_jax.server", "--port", str(self.port), "--compilation-cache",
             str(cache_dir), *SERVER_ARGS, *extra], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
            env=env)
        self.log: list[str] = []
        self._reader = threading.Thread(target=lambda: self.log.extend(iter(self.proc.stderr.readline, "")),
                                        daemon=True)
        self._reader.start()
        deadline = time.monotonic() + 180
        while not any("ready in" in line for line in self.log):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("server did not start:\n" + "".join(self.log))
            time.sleep(0.2)

    def stop(self, sig=signal.SIGTERM, timeout=60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
            self._reader.join(5)

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(self.url + "/metrics", timeout=10) as r:
            return parse_metrics(r.read().decode())

    def wait_idle(self, timeout=30) -> dict[str, float]:
        """Metrics once nothing is in flight and no KV page is referenced (fails after ``timeout``)."""
        deadline = time.monotonic() + timeout
        while True:
            m = self.metrics()
            if (m["autoglm_requests_in_flight"], m["autoglm_kv_pages_in_use"], m["autoglm_num_requests_running"],
                    m["autoglm_num_requests_waiting"]) == (0, 0, 0, 0) or time.monotonic() > deadline:
                return m
            time.sleep(0.2)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module")
def server(compile_cache):
    s = ServerProcess(compile_cache)
    yield s
    s.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def post(server, path, body: bytes | dict, headers=None):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=120) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# ---- API ---------------------------------------------------------------------------------------------------
def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    with urllib.request.urlopen(server.url + "/health", timeout=10) as r:
        assert json.loads(r.read()) == {"status": "ok"}


def test_completion_streamed_equals_unstreamed_greedy(client):
    kw = dict(model="tiny", prompt="def parse_args(argv):\n", max_tokens=24, temperature=0)
    whole = client.completions.create(**kw)
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == 24
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == whole.choices[0].text and len(text) > 0
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 24 and chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert len({c.id for c in chunks}) == 1


def test_chat_streamed_equals_unstreamed_greedy(client):
    kw = dict(model="tiny", messages=[{"role": "system", "content": "You write Python."},
                                      {"role": "user", "content": "import os"}], max_tokens=20, temperature=0)
    whole = client.chat.completions.create(**kw)
    msg = whole.choices[0].message
    assert msg.role == "assistant" and not msg.tool_calls and whole.usage.completion_tokens <= 20
    chunks = list(client.chat.completions.create(**kw, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == msg.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_sse_framing_is_openai_exact(server):
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "x = ", "max_tokens": 4,
                                                        "temperature": 0, "stream": True}),
                 {"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    raw = r.read().decode()
    conn.close()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    for e in events[:-2]:
        assert e.startswith("data: {") and "\n" not in e
        assert json.loads(e[len("data: "):])["object"] == "text_completion"


# ---- bad input ------------------------------------------------------------------------------------------------
BAD = [
    (b'{"model": "tiny", "prompt": "x", ', 400, None, "not valid JSON"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 4, "best_friend": 1}, 400, "best_friend", "Unrecognized"),
    ({"model": "tiny", "prompt": "x", "max_tokens": "four"}, 400, "max_tokens", "valid integer"),
    ({"model": "tiny", "prompt": 42}, 400, "prompt", "prompt"),
    ({"model": "tiny", "prompt": "x", "max_tokens": 0}, 400, "max_tokens", ">= 1"),
    ({"model": "tiny", "prompt": "x", "temperature": 2.5}, 400, "temperature", "<= 2"),
    ({"model": "tiny", "prompt": "x", "temperature": -1}, 400, "temperature", ">= 0"),
    ({"model": "tiny", "prompt": "x", "top_p": 0}, 400, "top_p", "> 0"),
    ({"model": "tiny", "prompt": [5] * 300}, 400, "prompt", "maximum context length is 256"),
    ({"model": "tiny", "prompt": [5] * 200, "max_tokens": 100}, 400, "max_tokens", "300 tokens"),
    ({"model": "tiny", "prompt": [99999]}, 400, "prompt", "outside the vocabulary"),
    ({"model": "gpt-9", "prompt": "x"}, 404, "model", "does not exist"),
]


@pytest.mark.parametrize("body,status,param,words", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_completion_requests_get_openai_errors(server, body, status, param, words):
    code, _, raw = post(server, "/v1/completions", body)
    err = json.loads(raw)["error"]
    assert code == status and set(err) == {"message", "type", "param", "code"}
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert words.replace(">= ", "greater than or equal to ").replace("<= ", "less than or equal to ") \
        .replace("> ", "greater than ") in err["message"], err["message"]


def test_bad_chat_requests_and_the_server_keeps_serving(server, client):
    long_chat = [{"role": "user", "content": "word " * 400}]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="tiny", messages=long_chat, max_tokens=4)
    assert e.value.status_code == 400 and e.value.body["code"] == "context_length_exceeded"
    for bad in ({"messages": [{"role": "wizard", "content": "x"}]}, {"messages": []},
                {"max_completion_tokens": -3}, {"tool_choice": "required"}):
        code, _, raw = post(server, "/v1/chat/completions",
                            {"model": "tiny", "messages": [{"role": "user", "content": "x"}], **bad})
        assert code == 400 and json.loads(raw)["error"]["message"], bad
    ok = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "x"}], max_tokens=3,
                                        temperature=0)
    assert ok.usage.completion_tokens <= 3
    assert not any('status="500"' in k for k in server.metrics())


# ---- load with disconnects --------------------------------------------------------------------------------------
def test_load_with_disconnects_all_others_complete_and_pages_return(server):
    n_requests, concurrency, max_tokens = 200, 32, 8

    async def main():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
        sem = asyncio.Semaphore(concurrency)
        results = {}

        async def one(i):
            async with sem:
                disconnect = i % 3 == 0
                stream = await aclient.completions.create(
                    model="tiny", prompt=f"def function_{i}(", max_tokens=max_tokens, temperature=0, stream=True,
                    stream_options={"include_usage": True})
                text, usage, reason = "", None, None
                async for c in stream:
                    if c.choices:
                        text += c.choices[0].text
                        reason = c.choices[0].finish_reason or reason
                    usage = c.usage or usage
                    if disconnect and text:
                        await stream.close()
                        break
                results[i] = ("gone" if disconnect else reason, usage)

        try:
            await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n_requests))), timeout=240)
        finally:
            await aclient.close()
        return results

    t0 = time.monotonic()
    results = asyncio.run(main())
    elapsed = time.monotonic() - t0
    kept = [r for i, r in results.items() if i % 3]
    assert len(results) == n_requests
    assert all(reason == "length" and usage.completion_tokens == max_tokens for reason, usage in kept), kept[:3]
    m = server.wait_idle()
    assert m["autoglm_kv_pages_in_use"] == 0 and m["autoglm_requests_in_flight"] == 0
    assert m['autoglm_request_finished_total{finish_reason="abort"}'] >= 1  # some cancels landed before the end
    assert not any('status="500"' in k or 'status="429"' in k for k in m)
    assert m["autoglm_time_to_first_token_seconds_count"] >= n_requests - n_requests // 3
    print(f"\n{n_requests} requests ({concurrency} concurrent, 1/3 disconnecting) in {elapsed:.1f} s")


# ---- graceful shutdown ------------------------------------------------------------------------------------------
def test_graceful_shutdown_finishes_short_streams_cuts_long_ones_frees_everything(compile_cache):
    s = ServerProcess(compile_cache, extra=["--shutdown-timeout", "3"])
    bodies = {}

    def stream(name, max_tokens):
        conn = http.client.HTTPConnection("127.0.0.1", s.port, timeout=120)
        conn.request("POST", "/v1/completions", json.dumps({"model": "tiny", "prompt": "class A:", "stream": True,
                                                            "max_tokens": max_tokens, "temperature": 0,
                                                            "ignore_eos": True}),
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        data = b""
        try:
            while chunk := r.read1(65536):
                data += chunk
                bodies[name] = data
        except (http.client.IncompleteRead, ConnectionError):
            pass
        bodies[name] = data
        conn.close()

    threads = [threading.Thread(target=stream, args=("short", 6)), threading.Thread(target=stream, args=("long", 200))]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 60
    while not all(b"data: {" in bodies.get(k, b"") for k in ("short", "long")) and time.monotonic() < deadline:
        time.sleep(0.05)
    code = s.stop(signal.SIGTERM)
    for t in threads:
        t.join(30)
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its clean shutdown
    assert bodies["short"].endswith(b"data: [DONE]\n\n")
    assert b"[DONE]" not in bodies["long"] and bodies["long"].count(b"data: {") < 200
    assert any("shut down: 0 KV pages in use, 0 running, 0 waiting" in line for line in s.log), "".join(s.log)
