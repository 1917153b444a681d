"""OpenAI request bodies (validated with pydantic) and the error body, plus response builders.

Requests reject unknown fields (``extra="forbid"``, as the OpenAI API does) and check types and ranges:
a violation becomes a 400 ``invalid_request_error`` naming the parameter. Fields the API defines but this
server does not implement are accepted only at their neutral value (``n=1``, no logprobs, no penalties,
no ``echo``); anything else is a 400 saying it is unsupported. Extensions (as in vLLM): ``top_k``,
``ignore_eos``, ``stop_token_ids``, ``priority`` (1 low .. 3 high).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

__all__ = ["CompletionRequest", "ChatCompletionRequest", "APIError", "error_body", "validation_message",
           "ValidationError"]


class APIError(Exception):
    """An error answered with OpenAI's error body: ``{"error": {message, type, param, code}}``."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.message, self.status, self.type, self.param, self.code = message, status, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return error_body(self.message, type=self.type, param=self.param, code=self.code)


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_message(e: ValidationError) -> tuple[str, str | None]:
    """(message, param) for the first problem pydantic found."""
    err = e.errors()[0]
    where = ".".join(str(x) for x in err["loc"]) or None
    param = str(err["loc"][0]) if err["loc"] else None  # the top-level parameter, as OpenAI names it
    kind, msg = err.get("type", ""), err["msg"].removeprefix("Value error, ")
    if kind == "json_invalid":
        return f"The request body is not valid JSON: {msg}", None
    if kind == "extra_forbidden":
        return f"Unrecognized request argument supplied: {param}", param
    if param is None:
        return msg, None
    got = "" if kind == "missing" else f" (got {err.get('input')!r:.120})"
    return f"{where}: {msg}{got}", param


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class StreamOptions(_Strict):
    include_usage: bool = False


class _Sampling(_Strict):
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    n: int = Field(default=1, ge=1, le=1, description="only 1 is supported")
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: Union[str, list[str], None] = None
    seed: int | None = None
    presence_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="penalties are not supported")
    frequency_penalty: float = Field(default=0.0, ge=0.0, le=0.0, description="penalties are not supported")
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    # extensions
    top_k: int = Field(default=0, ge=0)
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    priority: int = Field(default=2, ge=1, le=3)

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        v = [v] if isinstance(v, str) else (v or [])
        if len(v) > 4 or any(not s for s in v):
            raise ValueError("stop must be at most 4 non-empty strings")
        return v

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, v):
        if v:
            raise ValueError("logit_bias is not supported")
        return v


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = Field(default=None, ge=1, le=1)
    suffix: str | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, v):
        if isinstance(v, list) and v and isinstance(v[0], (list, str)):
            if len(v) != 1:
                raise ValueError(f"batched prompts ({len(v)}) are not supported; send one prompt per request")
            v = v[0]
        if isinstance(v, list) and not v:
            raise ValueError("the prompt is empty")
        return v

    @model_validator(mode="after")
    def _unsupported(self):
        if self.echo:
            raise ValueError("echo is not supported")
        if self.logprobs is not None:
            raise ValueError("logprobs is not supported")
        if self.suffix:
            raise ValueError("suffix is not supported")
        return self


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.\-]+$")
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Strict):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(_Strict):
    name: str


class ToolChoiceFunction(_Strict):
    type: Literal["function"]
    function: NamedFunction


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[str, list[dict[str, Any]], None] = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    tools: list[Tool] | None = None
    tool_choice: Union[Literal["none", "auto", "required"], ToolChoiceFunction, None] = None
    parallel_tool_calls: bool | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _checks(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs is not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise ValueError("response_format other than {'type': 'text'} is not supported")
        if isinstance(self.tool_choice, ToolChoiceFunction):
            names = [t.function.name for t in self.tools or []]
            if self.tool_choice.function.name not in names:
                raise ValueError(f"tool_choice names function {self.tool_choice.function.name!r}, which is not "
                                 f"in tools {names}")
        if self.tool_choice == "required" and not self.tools:
            raise ValueError("tool_choice='required' needs tools")
        return self

    @property
    def output_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# ---- responses -------------------------------------------------------------------------------------------
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def tool_call_json(call) -> dict:
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def tool_delta_json(d) -> dict:
    out: dict = {"index": d.index}
    if d.id is not None:
        out.update(id=d.id, type="function", function={"name": d.name, "arguments": d.arguments})
    else:
        out["function"] = {"arguments": d.arguments}
    return out
