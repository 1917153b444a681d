"""The OpenAI-compatible HTTP app: ``create_app(engine, tokenizer, model_name=...)`` -> an ASGI (Starlette) app.

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``stream``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus, see ``metrics``).

Admission: at most ``max_concurrency`` requests are in flight (running or queued in the engine); one more
is answered 429 with ``Retry-After`` at once -- memory never grows with the backlog. A request is checked
completely (body, types, ranges, chat template, context length) before it is admitted; any problem is a 400
with OpenAI's error body and touches nothing else. A client that goes away -- mid-stream or while waiting
for a non-streamed answer -- cancels its request: the engine aborts it and its KV pages return to the pool
at once. On shutdown (lifespan end, after uvicorn has let in-flight responses finish or cancelled them after
its grace period) whatever is still in the engine is aborted and the engine thread stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..engine import AsyncLLM, SamplingParams
from . import protocol as P
from .chat_template import GLM4_CHAT_STOP_TOKENS, ChatTemplate, ChatTemplateError
from .metrics import CONTENT_TYPE, ServerMetrics
from .streaming import SSE_DONE, ChunkTemplate, IncrementalText, SSEResponse, sse
from .tool_calls import ContentDelta, ToolCallParser

DEFAULT_COMPLETION_TOKENS = 16  # OpenAI's default max_tokens for /v1/completions
MAX_BODY_BYTES = 32 << 20       # a larger request body is answered 413 without being read further


def _sse_response(chunks, gen, *, head: dict, prompt_tokens: int, include_usage: bool) -> SSEResponse:
    """A streamed answer: ``chunks(it)`` turns the generation's (piece, output) stream into SSE chunks; then
    the usage chunk if asked for, an error chunk if the engine failed, and ``data: [DONE]``."""
    async def body():
        it = gen.stream()
        try:
            async for c in chunks(it):
                yield c
            if include_usage:
                yield sse({**head, "choices": [], "usage": P.usage(prompt_tokens, gen.num_tokens)})
        except RuntimeError as e:
            yield sse(P.error_body(str(e), type="internal_error"))
        finally:
            await it.aclose()
        yield SSE_DONE
    return SSEResponse(body(), on_close=gen.release)


class _Generation:
    """One admitted request: iterates (text piece, RequestOutput), records metrics, frees its slot once."""

    def __init__(self, server: "OpenAIServer", rid: str, ids: list[int], params: SamplingParams, priority: int,
                 arrival: float):
        self.server, self.rid, self.ids, self.params, self.priority = server, rid, ids, params, priority
        self.arrival, self.num_tokens, self.finish_reason = arrival, 0, None
        self.text = IncrementalText(server.tokenizer, hidden=server.hidden_ids, stop=params.stop)
        self._released = False

    async def stream(self):
        s, m = self.server, self.server.metrics
        last = None
        agen = s.engine.generate(self.ids, self.params, request_id=self.rid, priority=self.priority)
        try:
            async for out in agen:
                now = time.perf_counter()
                if out.new_token_ids:
                    (m.ttft if last is None else m.itl).observe(now - (self.arrival if last is None else last))
                    last = now
                    self.num_tokens += len(out.new_token_ids)
                    m.generation_tokens.inc(len(out.new_token_ids))
                piece = self.text.push(out.new_token_ids)
                if out.finished:
                    self.finish_reason = out.finish_reason
                    piece += self.text.finish()
                yield piece, out
                if out.finished:
                    m.e2e.observe(time.perf_counter() - self.arrival)
                    return
        finally:
            await agen.aclose()  # aborts the request if it has not finished
            if self.finish_reason is None:
                self.finish_reason = "abort"
            m.finished.labels(self.finish_reason).inc()
            self.release()

    def release(self) -> None:
        if not self._released:
            self._released = True
            self.server.release(self.rid)


class OpenAIServer:
    def __init__(self, engine: AsyncLLM, tokenizer, *, model_name: str, chat_template: ChatTemplate | None = None,
                 max_concurrency: int = 256, retry_after_s: int = 1, log=None):
        if not isinstance(max_concurrency, int) or max_concurrency < 1:
            raise ValueError(f"max_concurrency={max_concurrency!r} must be an integer >= 1")
        self.engine, self.tokenizer, self.model_name = engine, tokenizer, model_name
        self.chat_template = chat_template or ChatTemplate(None)
        self.max_concurrency, self.retry_after_s = max_concurrency, retry_after_s
        llm = engine.engine
        self.max_model_len = llm.scheduler.config.max_model_len
        self.vocab_size = llm.cfg.vocab_size
        self.chat_stop_ids = tuple(ids[0] for ids in (tokenizer.encode(t) for t in GLM4_CHAT_STOP_TOKENS)
                                   if len(ids) == 1)
        self.hidden_ids = frozenset((*llm.cfg.eos_token_ids, *tokenizer.eos_token_ids, *self.chat_stop_ids))
        self.metrics = ServerMetrics(engine.stats)
        self.in_flight: set[str] = set()
        self.created = int(time.time())
        self.log = log or (lambda msg: print(f"autoglm serve: {msg}", file=sys.stderr, flush=True))

    # ---- admission ------------------------------------------------------------------------------------
    def admit(self, rid: str, ids, params, priority) -> _Generation:
        if len(self.in_flight) >= self.max_concurrency:
            raise P.APIError(f"The server is at its limit of {self.max_concurrency} concurrent requests; retry "
                             f"after {self.retry_after_s} s", status=429, type="rate_limit_error",
                             code="rate_limit_exceeded", headers={"Retry-After": str(self.retry_after_s)})
        self.in_flight.add(rid)
        self.metrics.in_flight.set(len(self.in_flight))
        self.metrics.prompt_tokens.inc(len(ids))
        return _Generation(self, rid, ids, params, priority, time.perf_counter())

    def release(self, rid: str) -> None:
        self.in_flight.discard(rid)
        self.metrics.in_flight.set(len(self.in_flight))

    # ---- request checks -------------------------------------------------------------------------------
    async def _parse(self, request: Request, cls):
        body = bytearray()
        async for piece in request.stream():
            body += piece
            if len(body) > MAX_BODY_BYTES:
                raise P.APIError(f"The request body is larger than {MAX_BODY_BYTES} bytes", status=413)
        try:
            req = cls.model_validate_json(bytes(body))
        except P.ValidationError as e:
            msg, param = P.validation_message(e)
            raise P.APIError(msg, param=param) from None
        if req.model != self.model_name:
            raise P.APIError(f"The model {req.model!r} does not exist; this server serves {self.model_name!r}",
                             status=404, param="model", code="model_not_found")
        return req

    def _output_limit(self, n_prompt: int, requested: int | None, default: int | None, param: str) -> int:
        room = self.max_model_len - n_prompt
        if room < 1:
            raise P.APIError(f"This model's maximum context length is {self.max_model_len} tokens, but the "
                             f"{param} has {n_prompt} tokens, leaving no room for output. Shorten the {param}.",
                             param=param, code="context_length_exceeded")
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise P.APIError(f"This model's maximum context length is {self.max_model_len} tokens. However, you "
                             f"requested {n_prompt + requested} tokens ({n_prompt} in the {param}, {requested} "
                             "for the output). Reduce the length of the prompt or of max_tokens.",
                             param="max_tokens", code="context_length_exceeded")
        return requested

    def _params(self, req, max_tokens: int, extra_stop_ids=()) -> SamplingParams:
        try:
            return SamplingParams(max_tokens=max_tokens,
                                  temperature=1.0 if req.temperature is None else req.temperature,
                                  top_p=1.0 if req.top_p is None else req.top_p, top_k=req.top_k, seed=req.seed,
                                  stop=tuple(req.stop or ()), ignore_eos=req.ignore_eos,
                                  stop_token_ids=tuple(extra_stop_ids) + tuple(req.stop_token_ids or ()))
        except ValueError as e:
            raise P.APIError(str(e)) from None

    def _prompt_ids(self, prompt) -> list[int]:
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        if not ids:
            raise P.APIError("The prompt is empty (it encodes to no tokens)", param="prompt")
        bad = [t for t in ids if not 0 <= t < self.vocab_size]
        if bad:
            raise P.APIError(f"prompt token ids {bad[:5]} are outside the vocabulary [0, {self.vocab_size})",
                             param="prompt")
        return ids

    # ---- endpoints ------------------------------------------------------------------------------------
    async def completions(self, request: Request):
        req = await self._parse(request, P.CompletionRequest)
        ids = self._prompt_ids(req.prompt)
        limit = self._output_limit(len(ids), req.max_tokens, DEFAULT_COMPLETION_TOKENS, "prompt")
        params = self._params(req, limit)
        rid = P.new_id("cmpl")
        gen = self.admit(rid, ids, params, req.priority)
        head = {"id": rid, "object": "text_completion", "created": P.now(), "model": self.model_name}

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            chunk = ChunkTemplate({**head, "choices": [{
                "index": 0, "text": ChunkTemplate.FIELD, "logprobs": None, "finish_reason": ChunkTemplate.REASON}]})

            async def chunks(it):
                async for piece, out in it:  # one chunk per token (text "" while a character is incomplete)
                    yield chunk(piece, out.finish_reason)
            return _sse_response(chunks, gen, head=head, prompt_tokens=len(ids), include_usage=include_usage)

        pieces = await self._collect(request, gen)
        return JSONResponse({**head, "choices": [{"index": 0, "text": "".join(pieces), "logprobs": None,
                                                  "finish_reason": gen.finish_reason}],
                             "usage": P.usage(len(ids), gen.num_tokens)})

    async def chat(self, request: Request):
        req = await self._parse(request, P.ChatCompletionRequest)
        use_tools = bool(req.tools) and req.tool_choice != "none"
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
        forced = req.tool_choice.function.name if isinstance(req.tool_choice, P.ToolChoiceFunction) else None
        try:
            text = self.chat_template.render([m.model_dump(exclude_none=True) for m in req.messages], tools=tools)
        except ChatTemplateError as e:
            raise P.APIError(str(e), param="messages") from None
        if forced:
            text += forced + "\n"
        ids = self._prompt_ids(text)
        limit = self._output_limit(len(ids), req.output_limit, None, "messages")
        params = self._params(req, limit, self.chat_stop_ids)
        rid = P.new_id("chatcmpl")
        gen = self.admit(rid, ids, params, req.priority)
        names = [t["function"]["name"] for t in tools or []]
        parser = ToolCallParser(names, forced=forced) if use_tools else None
        head = {"id": rid, "object": "chat.completion.chunk", "created": P.now(), "model": self.model_name}

        def deltas(piece: str, final: bool) -> list[dict]:
            if parser is None:
                return [{"content": piece}] if piece else []
            out = []
            for d in parser.feed(piece) + (parser.finish() if final else []):
                if isinstance(d, ContentDelta):
                    out.append({"content": d.text})
                else:
                    out.append({"tool_calls": [P.tool_delta_json(d)]})
            return out

        def finish_reason(reason):
            return "tool_calls" if parser is not None and parser.has_calls and reason in ("stop", "length") \
                else reason

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            def chunk(delta, reason=None):
                return sse({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                 "finish_reason": reason}]})

            content_chunk = ChunkTemplate({**head, "choices": [{
                "index": 0, "delta": {"content": ChunkTemplate.FIELD}, "logprobs": None,
                "finish_reason": ChunkTemplate.REASON}]})

            async def chunks(it):
                yield chunk({"role": "assistant", "content": ""})
                async for piece, out in it:
                    for d in deltas(piece, out.finished):
                        yield content_chunk(d["content"]) if len(d) == 1 and "content" in d else chunk(d)
                    if out.finished:
                        yield chunk({}, finish_reason(out.finish_reason))
            return _sse_response(chunks, gen, head=head, prompt_tokens=len(ids), include_usage=include_usage)

        text = "".join(await self._collect(request, gen))
        message: dict = {"role": "assistant", "content": text}
        if parser is not None:
            ds = deltas(text, True)
            content = "".join(d["content"] for d in ds if "content" in d)
            message["content"] = content if content or not parser.has_calls else None
            if parser.has_calls:
                message["tool_calls"] = [P.tool_call_json(c) for c in parser.calls]
        return JSONResponse({**head, "object": "chat.completion",
                             "choices": [{"index": 0, "message": message, "logprobs": None,
                                          "finish_reason": finish_reason(gen.finish_reason)}],
                             "usage": P.usage(len(ids), gen.num_tokens)})

    async def _collect(self, request: Request, gen: _Generation) -> list[str]:
        """Runs a non-streamed generation; cancels it if the client disconnects first."""
        async def run():
            it = gen.stream()
            try:
                return [piece async for piece, _ in it]
            finally:
                await it.aclose()

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        task, watch = asyncio.ensure_future(run()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
                gen.release()
        if task.cancelled():
            return []  # the client is gone; nobody reads this answer
        try:
            return task.result()
        except RuntimeError as e:
            raise P.APIError(str(e), status=500, type="internal_error") from None

    async def models(self, request: Request):
        return JSONResponse({"object": "list", "data": [{"id": self.model_name, "object": "model",
                                                         "created": self.created, "owned_by": "autoglm",
                                                         "max_model_len": self.max_model_len}]})

    async def health(self, request: Request):
        if self.engine.error is not None:
            return JSONResponse({"status": "error", "error": repr(self.engine.error)}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics_endpoint(self, request: Request):
        return Response(self.metrics.render(), media_type=CONTENT_TYPE)

    # ---- lifecycle ------------------------------------------------------------------------------------
    def close(self) -> None:
        """Aborts whatever is left in the engine and stops its thread; logs the pages still in use (0)."""
        for rid in list(self.in_flight):
            self.engine.abort(rid)
        self.engine.shutdown()
        s = self.engine.stats()
        self.log(f"shut down: {s.pages_in_use} KV pages in use, {s.num_running} running, {s.num_waiting} waiting")


def _endpoint(server: OpenAIServer, name: str, handler):
    async def call(request: Request):
        try:
            response = await handler(request)
        except P.APIError as e:
            server.metrics.requests.labels(name, str(e.status)).inc()
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)
        except Exception as e:  # noqa: BLE001 - answered as OpenAI's error body, the server keeps serving
            server.log(f"internal error on {name}: {e!r}")
            server.metrics.requests.labels(name, "500").inc()
            return JSONResponse(P.error_body(f"internal error: {e!r}", type="internal_error"), status_code=500)
        server.metrics.requests.labels(name, str(response.status_code)).inc()
        return response
    return call


def create_app(engine: AsyncLLM, tokenizer, *, model_name: str, chat_template: ChatTemplate | None = None,
               max_concurrency: int = 256, retry_after_s: int = 1, log=None) -> Starlette:
    """The app; ``app.state.server`` is the ``OpenAIServer`` behind it."""
    server = OpenAIServer(engine, tokenizer, model_name=model_name, chat_template=chat_template,
                          max_concurrency=max_concurrency, retry_after_s=retry_after_s, log=log)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await asyncio.get_running_loop().run_in_executor(None, server.close)

    routes = [Route("/v1/completions", _endpoint(server, "completions", server.completions), methods=["POST"]),
              Route("/v1/chat/completions", _endpoint(server, "chat", server.chat), methods=["POST"]),
              Route("/v1/models", server.models, methods=["GET"]),
              Route("/health", server.health, methods=["GET"]),
              Route("/metrics", server.metrics_endpoint, methods=["GET"])]
    app = Starlette(routes=routes, lifespan=lifespan)
    app.state.server = server
    return app
