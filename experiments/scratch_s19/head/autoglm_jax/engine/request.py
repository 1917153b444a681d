"""A generation request as the scheduler sees it: prompt, sampling parameters, priority, progress.

Everything here is host-side Python. Validation happens in two places, both before any device work:
``SamplingParams`` checks its own fields when built, and ``validate_request`` checks what depends on the
serving setup (context length, vocabulary) when the scheduler admits the request. Both raise ``ValueError``
whose message says what was wrong and what is allowed; a rejected request never touches scheduler state,
so the requests already running keep running.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from typing import Sequence

PRIORITY_CLASSES = (1, 2, 3)  # 1 = low, 3 = high (the seed's priority_class multiplier)


class RequestStatus(enum.Enum):
    WAITING = "waiting"            # admitted, not yet given pages
    RUNNING = "running"            # holds pages, scheduled every step until it finishes
    PREEMPTED = "preempted"        # lost its pages; waits at the queue front to re-prefill prompt + output
    FINISHED_STOPPED = "stopped"   # EOS, a stop token or a stop string
    FINISHED_LENGTH = "length"     # max_tokens or the context length reached
    FINISHED_ABORTED = "aborted"   # cancelled by abort()

    @property
    def finished(self) -> bool:
        return self in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH,
                        RequestStatus.FINISHED_ABORTED)


FINISH_REASON = {RequestStatus.FINISHED_STOPPED: "stop", RequestStatus.FINISHED_LENGTH: "length",
                 RequestStatus.FINISHED_ABORTED: "abort"}


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SamplingParams:
    """How one request samples. ``temperature == 0`` is greedy; ``top_k == 0`` and ``top_p == 1`` are off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()            # stop strings (need the scheduler's detokenize callback)
    stop_token_ids: tuple[int, ...] = ()  # finish on any of these tokens (kept in the output)
    ignore_eos: bool = False

    def __post_init__(self):
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if not isinstance(self.temperature, (int, float)) or isinstance(self.temperature, bool) \
                or not self.temperature >= 0:
            raise ValueError(f"temperature={self.temperature!r} must be a number >= 0 (0 = greedy)")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r} must be an integer >= 0 (0 = off)")
        if not isinstance(self.top_p, (int, float)) or isinstance(self.top_p, bool) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} must be in (0, 1] (1 = off)")
        if self.seed is not None and not _is_int(self.seed):
            raise ValueError(f"seed={self.seed!r} must be an integer or None")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop={self.stop!r} must be non-empty strings")
        ids = tuple(self.stop_token_ids)
        if any(not _is_int(t) or t < 0 for t in ids):
            raise ValueError(f"stop_token_ids={self.stop_token_ids!r} must be non-negative integers")
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "stop_token_ids", ids)
        object.__setattr__(self, "ignore_eos", bool(self.ignore_eos))


class Request:
    """One request and its progress. The scheduler owns and mutates it; callers read it.

    Token bookkeeping: ``all_token_ids = prompt + output``; ``num_computed_tokens`` of them have their
    key/value in the cache. A token sampled in step t is computed (its KV written) in step t + 1.
    """

    def __init__(self, request_id: str, prompt_token_ids: Sequence[int], sampling_params: SamplingParams
                 | None = None, *, priority: int = 2, cache_ttl_s: float | None = None,
                 arrival_time: float | None = None):
        self.request_id = request_id
        self.prompt_token_ids: tuple[int, ...] = tuple(prompt_token_ids)
        self.sampling_params = sampling_params if sampling_params is not None else SamplingParams()
        self.priority = priority
        self.cache_ttl_s = cache_ttl_s  # TTL of the prefix-cache entries this request creates (None: default)
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.status = RequestStatus.WAITING
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0        # prompt tokens served by the prefix cache at (last) admission
        self.page_ids: list[int] = []     # block table: page i holds positions [i*L, (i+1)*L)
        self.block_hashes: list[bytes] = []  # hash chain of the full pages of all_token_ids (grows)
        self.num_preemptions = 0
        self.stop_reason: int | str | None = None
        self.text: str | None = None      # detokenized output (only with a detokenize callback)

    # ---- derived ---------------------------------------------------------------------------------
    @property
    def all_token_ids(self) -> list[int]:
        return [*self.prompt_token_ids, *self.output_token_ids]

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    def token_at(self, position: int) -> int:
        n = len(self.prompt_token_ids)
        return self.prompt_token_ids[position] if position < n else self.output_token_ids[position - n]

    @property
    def finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return FINISH_REASON.get(self.status)

    def __repr__(self) -> str:
        return (f"Request({self.request_id!r}, status={self.status.value}, prompt={self.num_prompt_tokens}, "
                f"output={len(self.output_token_ids)}, computed={self.num_computed_tokens}, "
                f"pages={self.page_ids})")


def validate_request(req: Request, *, max_model_len: int, vocab_size: int | None = None,
                     can_detokenize: bool = True) -> None:
    """Raises ``ValueError`` naming the problem if the scheduler cannot serve ``req``."""
    rid = req.request_id
    if not isinstance(rid, str) or not rid:
        raise ValueError(f"request_id={rid!r} must be a non-empty string")
    if not isinstance(req.sampling_params, SamplingParams):
        raise ValueError(f"request {rid!r}: sampling_params must be a SamplingParams, "
                         f"got {type(req.sampling_params).__name__}")
    n = len(req.prompt_token_ids)
    if n == 0:
        raise ValueError(f"request {rid!r}: the prompt is empty; at least one token is needed")
    if n >= max_model_len:
        raise ValueError(f"request {rid!r}: the prompt has {n} tokens but the context holds {max_model_len}; "
                         f"prompts may have at most {max_model_len - 1} tokens (one slot is needed to generate)")
    bad = [t for t in req.prompt_token_ids if not _is_int(t) or t < 0
           or (vocab_size is not None and t >= vocab_size)]
    if bad:
        allowed = f"[0, {vocab_size})" if vocab_size is not None else "non-negative integers"
        raise ValueError(f"request {rid!r}: prompt token ids {bad[:5]} are outside the vocabulary; "
                         f"allowed: {allowed}")
    if req.priority not in PRIORITY_CLASSES or isinstance(req.priority, bool):
        raise ValueError(f"request {rid!r}: priority={req.priority!r} is unknown; allowed: {PRIORITY_CLASSES} "
                         "(1 = low, 3 = high)")
    if req.cache_ttl_s is not None and not (isinstance(req.cache_ttl_s, (int, float)) and req.cache_ttl_s > 0):
        raise ValueError(f"request {rid!r}: cache_ttl_s={req.cache_ttl_s!r} must be a positive number or None")
    if req.sampling_params.stop and not can_detokenize:
        raise ValueError(f"request {rid!r}: stop strings {req.sampling_params.stop} need a detokenize callback; "
                         "build the Scheduler with detokenize=... or use stop_token_ids")
