"""OpenAI-compatible HTTP serving: ``create_app`` (ASGI), ``serve_main`` (``autoglm serve``), the GLM-4
chat template and function-call parser."""

from .app import OpenAIServer, create_app
from .chat_template import GLM4_FALLBACK_TEMPLATE, ChatTemplate, ChatTemplateError
from .main import serve_main
from .tool_calls import ToolCall, ToolCallParser, parse_tool_calls

__all__ = ["OpenAIServer", "create_app", "serve_main", "ChatTemplate", "ChatTemplateError",
           "GLM4_FALLBACK_TEMPLATE", "ToolCall", "ToolCallParser", "parse_tool_calls"]
