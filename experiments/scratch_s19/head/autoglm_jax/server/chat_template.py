"""Chat messages -> prompt text, with the checkpoint's own Jinja chat template or a documented fallback.

Where the template comes from, first match wins:

1. ``--chat-template FILE`` (a Jinja file);
2. the checkpoint's ``chat_template.jinja``;
3. ``chat_template`` in its ``tokenizer_config.json`` (a string, or a list of ``{name, template}`` from which
   ``tool_use`` is taken when the request has tools, else ``default``);
4. the fallback, ``GLM4_FALLBACK_TEMPLATE``: GLM-4-9B-chat's layout (``[gMASK]<sop>``, ``<|system|>``,
   ``<|user|>``, ``<|assistant|>``, ``<|observation|>`` for tool results), an English tools section in the
   system turn asking for the bare call format (name line, then JSON arguments), and an assistant tool call
   written back in that same format.

Templates render like Hugging Face's ``apply_chat_template``: a sandboxed Jinja environment with
``trim_blocks``/``lstrip_blocks``, ``tojson`` and ``raise_exception``, and the variables ``messages``,
``tools``, ``add_generation_prompt``, ``bos_token`` and ``eos_token``.
"""

from __future__ import annotations

import json
from pathlib import Path

GLM4_FALLBACK_TEMPLATE = (
    "[gMASK]<sop>"
    "{% if tools %}<|system|>\n# Available tools"
    "{% for tool in tools %}{% set fn = tool.function if tool.function is defined else tool %}"
    "{{ '\\n\\n## ' ~ fn.name }}\n\n{{ fn | tojson(indent=4) }}\n"
    "To call this function, reply with its name on one line and its arguments as a JSON object on the next."
    "{% endfor %}{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'tool' %}<|observation|>\n{{ m.content }}"
    "{% elif m.role == 'assistant' and m.tool_calls %}"
    "{% for call in m.tool_calls %}<|assistant|>{{ call.function.name }}\n{{ call.function.arguments }}"
    "{% endfor %}"
    "{% else %}<|{{ m.role }}|>\n{{ m.content if m.content is not none else '' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)

# Tokens a GLM-4 chat reply ends on (each is a stop token when the tokenizer has it as one token).
GLM4_CHAT_STOP_TOKENS = ("<|user|>", "<|observation|>", "<|endoftext|>")


class ChatTemplateError(ValueError):
    """The messages cannot be rendered (bad roles, the template raised)."""


def _text(content) -> str | None:
    """OpenAI content: a string, None, or a list of parts of which only text parts are supported."""
    if content is None or isinstance(content, str):
        return content
    pieces = []
    for part in content:
        if part.get("type") != "text":
            raise ChatTemplateError(f"content part type {part.get('type')!r} is not supported; only 'text'")
        pieces.append(part.get("text", ""))
    return "".join(pieces)


class ChatTemplate:
    def __init__(self, source: str | list | None = None, *, bos_token: str = "", eos_token: str = "",
                 origin: str = "fallback"):
        import jinja2
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message):
            raise ChatTemplateError(message)

        def tojson(x, indent=None, ensure_ascii=False, sort_keys=False):
            return json.dumps(x, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=["jinja2.ext.loopcontrols"])
        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        named = source if isinstance(source, list) else None
        if named is not None:
            by_name = {t["name"]: t["template"] for t in named}
            self._templates = {k: env.from_string(v) for k, v in by_name.items()}
        else:
            self._templates = {"default": env.from_string(source or GLM4_FALLBACK_TEMPLATE)}
        self.origin = origin if source else "fallback"
        self.bos_token, self.eos_token = bos_token, eos_token
        self._jinja_error = jinja2.TemplateError

    @classmethod
    def from_checkpoint(cls, model_dir: str | Path | None, override: str | Path | None = None) -> "ChatTemplate":
        """The template to use for ``model_dir`` (see the module docstring for the order)."""
        cfg = {}
        d = Path(model_dir) if model_dir is not None else None
        if d is not None and (d / "tokenizer_config.json").exists():
            cfg = json.loads((d / "tokenizer_config.json").read_text())
        special = {k: (v.get("content") if isinstance(v, dict) else v) or "" for k, v in cfg.items()
                   if k in ("bos_token", "eos_token")}
        kw = dict(bos_token=special.get("bos_token", ""), eos_token=special.get("eos_token", ""))
        if override is not None:
            return cls(Path(override).read_text(), origin=str(override), **kw)
        if d is not None and (d / "chat_template.jinja").exists():
            return cls((d / "chat_template.jinja").read_text(), origin=str(d / "chat_template.jinja"), **kw)
        if cfg.get("chat_template"):
            return cls(cfg["chat_template"], origin=str(d / "tokenizer_config.json"), **kw)
        return cls(None, **kw)

    def render(self, messages: list[dict], *, tools: list[dict] | None = None,
               add_generation_prompt: bool = True) -> str:
        msgs = []
        for i, m in enumerate(messages):
            role = m.get("role")
            if role not in ("system", "developer", "user", "assistant", "tool"):
                raise ChatTemplateError(f"messages[{i}].role={role!r} is not supported; allowed: system, "
                                        "developer, user, assistant, tool")
            msgs.append({**m, "role": "system" if role == "developer" else role, "content": _text(m.get("content"))})
        name = "tool_use" if tools and "tool_use" in self._templates else "default"
        template = self._templates.get(name) or next(iter(self._templates.values()))
        try:
            return template.render(messages=msgs, tools=tools or None, add_generation_prompt=add_generation_prompt,
                                    bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except self._jinja_error as e:
            raise ChatTemplateError(f"the chat template ({self.origin}) failed: {e}") from e
