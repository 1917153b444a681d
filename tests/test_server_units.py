"""Server pieces without a model: GLM-4 function-call parsing (streamed == whole), chat templates, incremental
text with stop strings and hidden tokens, request validation messages."""

from __future__ import annotations

import json

import pytest

from autoglm_jax.server import ChatTemplate, ChatTemplateError, ToolCallParser, parse_tool_calls
from autoglm_jax.server.protocol import ChatCompletionRequest, CompletionRequest, ValidationError, validation_message
from autoglm_jax.server.streaming import IncrementalText
from autoglm_jax.server.tool_calls import ContentDelta, ToolCallDelta

NAMES = ("get_weather", "search")


def stream_parse(text, names=NAMES, *, piece=1, forced=None):
    """Feeds ``text`` ``piece`` characters at a time; returns (content, [(id, name, args)])."""
    p = ToolCallParser(names, forced=forced)
    deltas = []
    for i in range(0, len(text), piece):
        deltas += p.feed(text[i:i + piece])
    deltas += p.finish()
    content = "".join(d.text for d in deltas if isinstance(d, ContentDelta))
    calls = {}
    for d in deltas:
        if isinstance(d, ToolCallDelta):
            if d.id is not None:
                assert d.index not in calls, "a call's id/name chunk came twice"
                calls[d.index] = [d.id, d.name, ""]
            else:
                assert d.name is None
            calls[d.index][2] += d.arguments
    return content, [tuple(calls[i]) for i in sorted(calls)]


CASES = [
    # (model text, expected content, expected [(name, arguments as a dict)])
    ('get_weather\n{"city": "Beijing"}', "", [("get_weather", {"city": "Beijing"})]),
    ('\nget_weather\n  {"city": "Beijing", "days": [1, 2]}\n', "",
     [("get_weather", {"city": "Beijing", "days": [1, 2]})]),
    ("\nHello there, how can I help?", "Hello there, how can I help?", []),
    ("get_weather is a tool\n{not a call}", "get_weather is a tool\n{not a call}", []),
    ("unknown_fn\n{\"a\": 1}", "unknown_fn\n{\"a\": 1}", []),  # bare calls must name one of the tools
    ("get_weather\nsunny", "get_weather\nsunny", []),
    ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Beijing</arg_value>\n"
     "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n</tool_call>", "",
     [("get_weather", {"city": "Beijing", "days": 3})]),
    ("Let me look.\n<tool_call>search\n{\"q\": \"jax\"}</tool_call>\n<tool_call>get_weather\n"
     "<arg_key>city</arg_key><arg_value>Paris</arg_value></tool_call>", "Let me look.\n",
     [("search", {"q": "jax"}), ("get_weather", {"city": "Paris"})]),
    ("a < b and <tool_ca", "a < b and <tool_ca", []),
]


@pytest.mark.parametrize("text,content,calls", CASES)
def test_tool_calls_whole_and_streamed_agree(text, content, calls):
    got_content, got_calls = parse_tool_calls(text, NAMES)
    assert (got_content or "") == content
    assert [(c.name, json.loads(c.arguments)) for c in got_calls] == calls
    assert all(c.id.startswith("call_") for c in got_calls)
    assert len({c.id for c in got_calls}) == len(got_calls)
    for piece in (1, 3, 1000):
        s_content, s_calls = stream_parse(text, piece=piece)
        assert s_content == content
        assert [(n, json.loads(a)) for _, n, a in s_calls] == calls
        assert [a for _, _, a in s_calls] == [c.arguments for c in got_calls]
        for _, n, _ in s_calls:  # the call never leaks into the content
            assert n not in s_content


def test_bare_call_arguments_stream_in_pieces_under_one_id():
    p = ToolCallParser(NAMES)
    deltas = []
    for piece in ["get_", "weather", "\n", '{"ci', 'ty": "Bei', 'jing"}']:
        deltas += p.feed(piece)
    deltas += p.finish()
    assert all(isinstance(d, ToolCallDelta) for d in deltas)
    assert deltas[0].id and deltas[0].name == "get_weather"
    assert len(deltas) >= 3 and all(d.id is None and d.index == 0 for d in deltas[1:])
    assert "".join(d.arguments for d in deltas) == '{"city": "Beijing"}'


def test_forced_function_starts_inside_the_call():
    content, calls = parse_tool_calls(' {"q": "x"}', NAMES, forced="search")
    assert content is None and [(c.name, c.arguments) for c in calls] == [("search", '{"q": "x"}')]


def test_fallback_template_renders_glm4_layout_and_tools():
    t = ChatTemplate(None)
    assert t.origin == "fallback"
    text = t.render([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather in Paris?"},
                     {"role": "assistant", "tool_calls": [{"id": "c1", "type": "function", "function": {
                         "name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                     {"role": "tool", "tool_call_id": "c1", "content": "sunny"}],
                    tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    assert text.startswith("[gMASK]<sop><|system|>\n# Available tools\n\n## get_weather\n")
    assert text.endswith('<|system|>\nBe brief.<|user|>\nWeather in Paris?<|assistant|>get_weather\n{"city": "Paris"}'
                         "<|observation|>\nsunny<|assistant|>")
    assert "Available tools" not in t.render([{"role": "user", "content": "hi"}])


def test_checkpoint_template_wins_and_errors_are_clear(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "</s>", "chat_template": "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
                                             "{% if add_generation_prompt %}[assistant]{% endif %}{{ eos_token }}"}))
    t = ChatTemplate.from_checkpoint(tmp_path)
    assert t.render([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) \
        == "[user]ab[assistant]</s>"
    with pytest.raises(ChatTemplateError, match="image_url"):
        t.render([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}])
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no chat here') }}")
    with pytest.raises(ChatTemplateError, match="no chat here"):
        ChatTemplate.from_checkpoint(tmp_path).render([{"role": "user", "content": "x"}])


class CharTokenizer:
    """One token per character; id 0 is EOS, 1 is a chat stop token (both hidden)."""

    def encode(self, text):
        return [ord(c) + 2 for c in text]

    def decode(self, ids):
        return "".join("<eos>" if i == 0 else "<stop>" if i == 1 else chr(i - 2) for i in ids)


def test_incremental_text_hides_stop_tokens_and_holds_back_stop_strings():
    tok = CharTokenizer()
    inc = IncrementalText(tok, hidden={0, 1}, stop=("END",))
    out = [inc.push(tok.encode(c)) for c in "abEN"]
    assert "".join(out) == "ab"  # "EN" may begin "END": held back
    assert inc.push(tok.encode("X")) == "ENX"
    assert inc.push(tok.encode("E")) + inc.push(tok.encode("N")) + inc.push(tok.encode("D")) == ""
    assert inc.finish() == ""
    assert inc.text == "abENX"
    inc = IncrementalText(tok, hidden={0, 1})
    assert inc.push(tok.encode("hi")) + inc.push([1]) + inc.push([0]) + inc.finish() == "hi"


@pytest.mark.parametrize("body,param,words", [
    (b'{"model": "m", "prompt": "x", "temperature": "hot"}', "temperature", "valid number"),
    (b'{"model": "m", "prompt": "x", "max_tokens": 0}', "max_tokens", "greater than or equal to 1"),
    (b'{"model": "m", "prompt": "x", "top_p": 1.5}', "top_p", "less than or equal to 1"),
    (b'{"model": "m", "prompt": "x", "temprature": 0}', "temprature", "Unrecognized request argument"),
    (b'{"model": "m", "prompt": "x"', None, "not valid JSON"),
    (b'{"model": "m", "prompt": ["a", "b"]}', "prompt", "batched prompts"),
    (b'{"model": "m", "prompt": "x", "n": 2}', "n", "less than or equal to 1"),
])
def test_completion_request_validation(body, param, words):
    with pytest.raises(ValidationError) as e:
        CompletionRequest.model_validate_json(body)
    msg, got_param = validation_message(e.value)
    assert got_param == param and words in msg, msg


def test_chat_request_validation():
    ok = ChatCompletionRequest.model_validate_json(json.dumps({
        "model": "m", "messages": [{"role": "user", "content": "x"}],
        "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}], "tool_choice": "auto"}))
    assert ok.tools[0].function.name == "f"
    for bad, words in [({"tool_choice": {"type": "function", "function": {"name": "g"}}}, "not in tools"),
                       ({"messages": []}, "at least 1"), ({"messages": [{"role": "robot", "content": "x"}]}, "robot")]:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}],
                "tools": [{"type": "function", "function": {"name": "f"}}], **bad}
        with pytest.raises(ValidationError) as e:
            ChatCompletionRequest.model_validate_json(json.dumps(body))
        msg, _ = validation_message(e.value)
        assert words in msg or words in str(e.value), msg
