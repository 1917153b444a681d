"""Text as tokens arrive, and the server-sent-event response that carries it.

``IncrementalText`` turns token ids into text pieces the way vLLM's incremental detokenizer does: it decodes
a short window (``prefix_offset..``) instead of the whole output each time, waits while the window ends in
an incomplete UTF-8 character, never shows the tokens in ``hidden`` (EOS and chat stop tokens, which the
engine keeps in its output), and holds back any tail that may be the start of a stop string, so a stop string
is never sent before the engine stops on it.

``SSEResponse`` frames chunks exactly as OpenAI does (``data: {json}\\n\\n`` ..., ``data: [DONE]\\n\\n``) and,
however the response ends (finished, client gone, server shutting down), closes the body iterator -- which
aborts the request in the engine, returning its KV pages -- and runs ``on_close`` once.
"""

from __future__ import annotations

import json
from typing import Callable

from starlette.responses import StreamingResponse


def _held_tail(text: str, stops) -> int:
    held = 0
    for s in stops:
        for n in range(min(len(text), len(s) - 1), held, -1):
            if s.startswith(text[-n:]):
                held = n
                break
    return held


class IncrementalText:
    def __init__(self, tokenizer, *, hidden=frozenset(), stop=()):
        self.tok, self.hidden, self.stop = tokenizer, frozenset(hidden), tuple(stop)
        self.ids: list[int] = []
        self.text = ""              # decoded so far (complete characters only)
        self.sent = 0               # characters of ``text`` handed out
        self._prefix = self._read = 0
        self._before = ""

    def push(self, token_ids) -> str:
        self.ids.extend(int(t) for t in token_ids if int(t) not in self.hidden)
        self._decode(final=False)
        end = len(self.text) - _held_tail(self.text, self.stop)
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        end = min([end, *hits])
        piece = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return piece

    def finish(self) -> str:
        """The rest of the text; cut at the first stop string if one is in it (the engine stopped there)."""
        self._decode(final=True)
        hits = [self.text.find(s) for s in self.stop if s in self.text]
        if hits:
            self.text = self.text[:min(hits)]
        piece = self.text[self.sent:]
        self.sent = len(self.text)
        return piece

    def _decode(self, *, final: bool) -> None:
        if self._read == len(self.ids):
            return
        before = self._before  # decode(ids[prefix:read]), kept from the last advance
        after = self.tok.decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            delta = after[len(before):]
            self.text += delta
            # The window ended on a whole character, so (byte-level BPE) the new window's text is the delta.
            self._prefix, self._read, self._before = self._read, len(self.ids), delta


def sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


class ChunkTemplate:
    """``sse(chunk)`` for chunks that differ only in one string field and the finish reason, without building
    and serialising the whole object per token: ``obj`` holds the sentinel ``FIELD`` where the string goes."""

    FIELD, REASON = "\x00field\x00", "\x00reason\x00"

    def __init__(self, obj: dict):
        text = sse(obj)
        field, reason = json.dumps(self.FIELD), json.dumps(self.REASON)
        a, rest = text.split(field)
        b, c = rest.split(reason)
        self._parts = a, b, c

    def __call__(self, value: str, finish_reason: str | None = None) -> str:
        a, b, c = self._parts
        return f"{a}{json.dumps(value, ensure_ascii=False)}{b}{json.dumps(finish_reason)}{c}"


SSE_DONE = "data: [DONE]\n\n"


class SSEResponse(StreamingResponse):
    media_type = "text/event-stream"

    def __init__(self, body, *, on_close: Callable[[], None] | None = None):
        super().__init__(body, headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            if self._on_close is not None:
                self._on_close()
