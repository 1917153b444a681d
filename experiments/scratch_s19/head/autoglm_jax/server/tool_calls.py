"""GLM-4 function calls in generated text -> OpenAI ``tool_calls``, incrementally (one parser for both the
streamed and the whole-text case, so the two always agree).

Formats recognised (the GLM-4 family writes calls in two ways):

* **bare** (GLM-4-9B-chat, GLM-4-0414): the function name alone on the first line, then its arguments as a
  JSON object::

      get_weather
      {"city": "Beijing"}

  Only recognised at the start of the reply, and only when the name is one of the request's tools and the
  first non-blank character after the newline is ``{`` -- so ordinary text that happens to start with a word
  on its own line stays content. The arguments are the rest of the reply with surrounding blanks removed.
* **tagged** (GLM-4.5 and later, some GLM-4-0414 fine-tunes): ``<tool_call>NAME ... </tool_call>`` blocks
  anywhere in the reply, the body either ``<arg_key>k</arg_key><arg_value>v</arg_value>`` pairs (values
  decoded as JSON when they parse, else kept as strings) or a JSON object. Text outside blocks is content.

A call never stays in ``content``. Each call gets one id (``call_...``) at its first chunk; OpenAI's stream
framing sends the id, type and name in that first chunk and only argument pieces afterwards.
"""

from __future__ import annotations

import dataclasses
import json
import uuid
from typing import Iterable

TOOL_OPEN, TOOL_CLOSE = "<tool_call>", "</tool_call>"
ARG_KEY, ARG_KEY_END, ARG_VALUE, ARG_VALUE_END = "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclasses.dataclass(frozen=True)
class ContentDelta:
    text: str


@dataclasses.dataclass(frozen=True)
class ToolCallDelta:
    """One chunk of call ``index``: the first has ``id`` and ``name`` set, later ones only ``arguments``."""

    index: int
    arguments: str = ""
    id: str | None = None
    name: str | None = None


@dataclasses.dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the model wrote it (bare) or built from its key/value pairs (tagged)


def _prefix_overlap(text: str, marker: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``marker``."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


def _arg_value(raw: str):
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def _tagged_call(body: str) -> tuple[str, str]:
    """(name, arguments JSON) of one ``<tool_call>`` body."""
    cut = [i for i in (body.find("\n"), body.find(ARG_KEY), body.find("{")) if i >= 0]
    end = min(cut) if cut else len(body)
    name, rest = body[:end].strip(), body[end:]
    if ARG_KEY in rest:
        args, pos = {}, 0
        while True:
            k0 = rest.find(ARG_KEY, pos)
            if k0 < 0:
                break
            k1 = rest.find(ARG_KEY_END, k0)
            v0 = rest.find(ARG_VALUE, k1) if k1 >= 0 else -1
            v1 = rest.find(ARG_VALUE_END, v0) if v0 >= 0 else -1
            if min(k1, v0, v1) < 0:
                break
            args[rest[k0 + len(ARG_KEY):k1].strip()] = _arg_value(rest[v0 + len(ARG_VALUE):v1].strip())
            pos = v1 + len(ARG_VALUE_END)
        return name, json.dumps(args, ensure_ascii=False)
    rest = rest.strip()
    return name, (rest if rest.startswith("{") else "{}")


class ToolCallParser:
    """Feed the reply's text as it grows; get content and tool-call deltas back.

    ``tool_names``: the request's functions (bare calls must name one). ``forced``: a name the prompt already
    started (``tool_choice`` naming a function puts ``NAME\\n`` after the assistant tag); the parser starts
    inside that call.
    """

    def __init__(self, tool_names: Iterable[str], *, forced: str | None = None):
        self.names = tuple(tool_names)
        self.mode = "detect"   # detect | content | bare | tagged | between
        self.buf = ""          # text not yet classified (detect, content hold-back, tagged block)
        self.calls: list[ToolCall] = []
        self._args_raw = ""    # bare: arguments text so far
        self._args_sent = 0
        if forced is not None:
            self.buf = forced + "\n"

    # ---- public -----------------------------------------------------------------------------------------
    def feed(self, text: str) -> list:
        self.buf += text
        return self._advance(final=False)

    def finish(self) -> list:
        """Flushes what is held back at the end of the reply."""
        return self._advance(final=True)

    @property
    def has_calls(self) -> bool:
        return bool(self.calls)

    # ---- state machine --------------------------------------------------------------------------------
    def _advance(self, *, final: bool) -> list:
        out: list = []
        while True:
            before = (self.mode, len(self.buf))
            getattr(self, f"_step_{self.mode}")(out, final)
            if (self.mode, len(self.buf)) == before:
                return [d for d in out if not (isinstance(d, ContentDelta) and not d.text)]

    def _step_detect(self, out: list, final: bool) -> None:
        s = self.buf.lstrip()
        if s.startswith(TOOL_OPEN):
            self.buf, self.mode = s[len(TOOL_OPEN):], "tagged"
            return
        nl = s.find("\n")
        if nl >= 0:
            name, after = s[:nl].strip(), s[nl + 1:].lstrip()
            if name in self.names and after[:1] == "{":
                self._open_call(out, name)
                self.buf, self.mode = "", "bare"
                self._args_raw = s[nl + 1:]
                return
            if name in self.names and not after and not final:
                return  # the name line is complete; wait for the first argument character
        elif not final and s and (TOOL_OPEN.startswith(s) or any(n.startswith(s) for n in self.names)):
            return  # could still become a call
        elif not final and not s:
            return
        self.buf, self.mode = s, "content"

    def _step_content(self, out: list, final: bool) -> None:
        at = self.buf.find(TOOL_OPEN)
        if at >= 0:
            out.append(ContentDelta(self.buf[:at]))
            self.buf, self.mode = self.buf[at + len(TOOL_OPEN):], "tagged"
            return
        keep = 0 if final else _prefix_overlap(self.buf, TOOL_OPEN)
        out.append(ContentDelta(self.buf[:len(self.buf) - keep]))
        self.buf = self.buf[len(self.buf) - keep:]

    def _step_bare(self, out: list, final: bool) -> None:
        self._args_raw += self.buf
        self.buf = ""
        args = self._args_raw.strip()
        if args[self._args_sent:]:
            out.append(ToolCallDelta(len(self.calls) - 1, args[self._args_sent:]))
            self._args_sent = len(args)
        c = self.calls[-1]
        self.calls[-1] = ToolCall(c.id, c.name, args)

    def _step_tagged(self, out: list, final: bool) -> None:
        end = self.buf.find(TOOL_CLOSE)
        if end < 0 and not final:
            return
        body = self.buf if end < 0 else self.buf[:end]
        name, args = _tagged_call(body)
        self._open_call(out, name, args)
        self.buf = "" if end < 0 else self.buf[end + len(TOOL_CLOSE):]
        self.mode = "between"

    def _step_between(self, out: list, final: bool) -> None:
        """After a tagged call: blanks are dropped; anything else is content again."""
        self.buf = self.buf.lstrip()
        if self.buf:
            self.mode = "content"

    def _open_call(self, out: list, name: str, args: str = "") -> None:
        call = ToolCall(new_call_id(), name, args)
        self.calls.append(call)
        out.append(ToolCallDelta(len(self.calls) - 1, "", id=call.id, name=name))
        if args:
            out.append(ToolCallDelta(len(self.calls) - 1, args))


def parse_tool_calls(text: str, tool_names: Iterable[str], *, forced: str | None = None
                     ) -> tuple[str | None, list[ToolCall]]:
    """Whole reply -> (content or None, calls). Same parser as the stream, fed all at once."""
    p = ToolCallParser(tool_names, forced=forced)
    deltas = p.feed(text) + p.finish()
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    return (content if content.strip() or not p.calls else None), p.calls
