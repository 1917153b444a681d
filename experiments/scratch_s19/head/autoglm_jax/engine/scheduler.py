"""Continuous batching over a paged KV cache: which tokens of which requests run in the next engine step.

Each step, ``schedule()`` returns a plain-Python plan (``SchedulerOutput``); the engine runs it on the
device and samples one token for every request whose ``sample`` flag is set; ``update(plan, sampled)``
appends those tokens, applies stop rules and retires finished requests. Requests join and leave at every
step. Calls must alternate: schedule, update, schedule, update, ...

There are no prefill/decode phases. A request has ``num_tokens`` (prompt + output) of which
``num_computed_tokens`` have KV in the cache; a step computes the next ``min(uncomputed, budget)`` of them.
So a prompt is prefilled in chunks under the per-step token budget (``max_num_batched_tokens``), mixed with
the one-token decode steps of other requests. Running requests are served first (in admission order), then
waiting ones (first come first served, preempted ones at the front), while ``max_num_seqs`` allows.

Pages: a request's block table only grows (copy-on-write swaps an entry, never shrinks the table). When a
running request needs pages and none are free, the lowest-priority, latest-admitted request not yet served
this step is preempted by recompute: its pages go back to the pool, it goes to the waiting queue's front
and later re-prefills prompt + generated tokens (mapping whatever the prefix cache still holds), so it
continues exactly where it stopped. Pages about to be written while shared (``ref_count > 1``: a fork, or a
fully cached prompt whose last token must be recomputed) are copied first: the plan's ``copy_ops`` are
``(src_page, dst_page)`` pairs the engine must execute before any write of the step.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import time
from typing import Callable, Mapping, Sequence

from .block_pool import NULL_PAGE, BlockPool
from .eviction import CacheStats, make_policy
from .prefix_cache import PrefixCache
from .request import Request, RequestStatus, SamplingParams, validate_request


@dataclasses.dataclass(frozen=True, kw_only=True)
class SchedulerConfig:
    num_pages: int                      # P, including the null page 0
    page_size: int = 16                 # L
    max_model_len: int                  # context: prompt + output tokens per request
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 2048  # token budget per step
    enable_prefix_caching: bool = True
    eviction: str = "lru"               # "lru" | "priority"
    model_key: str = ""                 # checkpoint/version key of the prefix cache
    cache_ttl_s: float | None = None    # default TTL of prefix-cache entries
    eos_token_ids: tuple[int, ...] = ()
    vocab_size: int | None = None

    def __post_init__(self):
        for key in ("num_pages", "page_size", "max_model_len", "max_num_seqs", "max_num_batched_tokens"):
            v = getattr(self, key)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{key}={v!r} must be a positive integer")
        if self.num_pages - 1 < self.max_pages_per_seq:
            raise ValueError(f"num_pages={self.num_pages} (one is the null page) cannot hold one full context: "
                             f"max_model_len={self.max_model_len} needs {self.max_pages_per_seq} pages of "
                             f"{self.page_size}")
        make_policy(self.eviction)  # validates the name
        object.__setattr__(self, "eos_token_ids", tuple(int(t) for t in self.eos_token_ids))

    @property
    def max_pages_per_seq(self) -> int:
        return -(-self.max_model_len // self.page_size)

    @classmethod
    def for_model(cls, cfg, **kwargs) -> "SchedulerConfig":
        """Fills eos ids, vocabulary and (unless given) the context length from a ``GLMConfig``."""
        kwargs.setdefault("max_model_len", cfg.max_position_embeddings)
        kwargs.setdefault("eos_token_ids", cfg.eos_token_ids)
        kwargs.setdefault("vocab_size", cfg.vocab_size)
        return cls(**kwargs)


@dataclasses.dataclass(frozen=True)
class ScheduledRequest:
    """One request's share of a step. Token lists have the same length t (1 for a decode step)."""

    request_id: str
    token_ids: tuple[int, ...]      # [t] tokens fed this step
    positions: tuple[int, ...]      # [t] their positions (consecutive)
    slot_mapping: tuple[int, ...]   # [t] page * L + offset where each token's KV is written
    block_table: tuple[int, ...]    # the request's pages in order (covers positions < num_computed_tokens)
    num_computed_tokens: int        # context tokens with KV in the cache after this step (= seq len)
    sample: bool                    # sample a token from the last position's logits this step
    sample_index: int               # index of the token to sample in the request's output (for seeding)
    is_prefill: bool                # the step computes prompt (or re-prefill) tokens, not just the last one
    sampling_params: SamplingParams


@dataclasses.dataclass(frozen=True)
class SchedulerOutput:
    step: int
    page_size: int
    requests: tuple[ScheduledRequest, ...]
    copy_ops: tuple[tuple[int, int], ...]  # (src_page, dst_page): copy every layer's K and V before writes
    preempted_ids: tuple[str, ...]         # lost their pages this step (their device state can be dropped)
    finished_ids: tuple[str, ...]          # finished or aborted since the previous plan

    @property
    def num_scheduled_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.requests)

    @property
    def is_empty(self) -> bool:
        return not self.requests

    # Flat, packed views (T = num_scheduled_tokens, B = len(requests)); pure Python lists for np.asarray.
    def flat_token_ids(self) -> list[int]:
        return [t for r in self.requests for t in r.token_ids]

    def flat_positions(self) -> list[int]:
        return [p for r in self.requests for p in r.positions]

    def flat_slot_mapping(self) -> list[int]:
        return [s for r in self.requests for s in r.slot_mapping]

    def query_start_loc(self) -> list[int]:
        """[B + 1] offsets of each request's tokens in the flat lists."""
        return [0, *itertools.accumulate(len(r.token_ids) for r in self.requests)]

    def seq_lens(self) -> list[int]:
        return [r.num_computed_tokens for r in self.requests]

    def logits_indices(self) -> list[int]:
        """Flat index of the last token of every request that samples (rows to run the LM head on)."""
        ends = self.query_start_loc()[1:]
        return [e - 1 for e, r in zip(ends, self.requests) if r.sample]

    def block_tables(self, max_pages: int) -> list[list[int]]:
        """[B, max_pages] page tables padded with the null page 0."""
        out = []
        for r in self.requests:
            if len(r.block_table) > max_pages:
                raise ValueError(f"request {r.request_id!r} holds {len(r.block_table)} pages > max_pages={max_pages}")
            out.append([*r.block_table, *([NULL_PAGE] * (max_pages - len(r.block_table)))])
        return out


@dataclasses.dataclass(frozen=True)
class RequestOutput:
    request_id: str
    new_token_ids: tuple[int, ...]
    num_output_tokens: int
    finished: bool
    finish_reason: str | None = None        # "stop" | "length" | "abort"
    stop_reason: int | str | None = None    # the stop/eos token id or stop string that finished it
    text: str | None = None                 # detokenized output when finished (needs detokenize)


@dataclasses.dataclass(frozen=True)
class SchedulerStats:
    step: int
    num_running: int
    num_waiting: int
    pages_total: int          # usable pages (null page excluded)
    pages_in_use: int
    pages_evictable: int
    prefix_lookup_tokens: int
    prefix_hit_tokens: int
    prefix_hit_rate: float    # hit tokens / looked-up prompt tokens
    evictions: int
    expirations: int
    preemptions: int
    num_finished: int
    num_aborted: int


class Scheduler:
    def __init__(self, config: SchedulerConfig, *, detokenize: Callable[[Sequence[int]], str] | None = None,
                 clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.detokenize = detokenize
        self.cache_stats = CacheStats()
        self.pool = BlockPool(config.num_pages, policy=make_policy(config.eviction), stats=self.cache_stats)
        self.prefix_cache = PrefixCache(self.pool, page_size=config.page_size, model_key=config.model_key,
                                        default_ttl_s=config.cache_ttl_s, clock=clock)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self._seq = itertools.count()
        self._order: dict[str, int] = {}        # admission order (preemption tie-break)
        self._inserted: dict[str, int] = {}     # pages of each request already offered to the prefix cache
        self._step = 0
        self._outstanding: tuple[int, dict[str, Request]] | None = None
        self._finished_since_plan: list[str] = []
        self.num_preemptions = 0
        self.num_finished = 0
        self.num_aborted = 0

    # ---- admission / cancellation -------------------------------------------------------------------
    def add_request(self, request: Request) -> None:
        """Queues ``request``; raises ValueError (changing nothing) if it cannot be served."""
        validate_request(request, max_model_len=self.config.max_model_len, vocab_size=self.config.vocab_size,
                         can_detokenize=self.detokenize is not None)
        if request.request_id in self.requests:
            raise ValueError(f"request id {request.request_id!r} is already in use by an unfinished request")
        if request.status is not RequestStatus.WAITING or request.num_computed_tokens or request.output_token_ids:
            raise ValueError(f"request {request.request_id!r} was already scheduled once; submit a new Request")
        self.requests[request.request_id] = request
        self._order[request.request_id] = next(self._seq)
        self.waiting.append(request)

    def abort(self, request_id: str) -> bool:
        """Cancels a request now: its pages return to the pool at once. False if unknown or already finished."""
        req = self.requests.get(request_id)
        if req is None:
            return False
        if req in self.running:
            self.running.remove(req)
        else:
            self.waiting.remove(req)
        self._retire(req, RequestStatus.FINISHED_ABORTED)
        return True

    def fork(self, parent_id: str, child_id: str, sampling_params: SamplingParams | None = None) -> Request:
        """A running request's copy that shares all its pages (for n > 1 sampling); shared pages are
        copied on write. Only between update() and the next schedule()."""
        if self._outstanding is not None:
            raise RuntimeError("fork() between schedule() and update() is not allowed")
        parent = self.requests.get(parent_id)
        if parent is None or parent.status is not RequestStatus.RUNNING:
            raise ValueError(f"request {parent_id!r} is not running; only running requests can be forked")
        if child_id in self.requests:
            raise ValueError(f"request id {child_id!r} is already in use by an unfinished request")
        if len(self.running) >= self.config.max_num_seqs:
            raise ValueError(f"max_num_seqs={self.config.max_num_seqs} requests are already running")
        child = Request(child_id, parent.prompt_token_ids, sampling_params or parent.sampling_params,
                        priority=parent.priority, cache_ttl_s=parent.cache_ttl_s)
        child.output_token_ids = list(parent.output_token_ids)
        child.num_computed_tokens = parent.num_computed_tokens
        child.block_hashes = list(parent.block_hashes)
        child.page_ids = list(parent.page_ids)
        self.pool.touch(child.page_ids)
        child.status = RequestStatus.RUNNING
        self.requests[child_id] = child
        self._order[child_id] = next(self._seq)
        self._inserted[child_id] = self._inserted.get(parent_id, 0)
        self.running.append(child)
        return child

    def set_model_key(self, model_key: str) -> None:
        """New weights: drops every prefix-cache entry. Only while no request holds pages."""
        if self.running:
            raise RuntimeError(f"{len(self.running)} requests are running with KV of the old model; "
                               "finish or abort them before changing the model key")
        self.prefix_cache.set_model_key(model_key)
        for req in self.waiting:
            req.block_hashes = []

    # ---- queries ------------------------------------------------------------------------------------
    def has_unfinished(self) -> bool:
        return bool(self.requests)

    def stats(self) -> SchedulerStats:
        s = self.cache_stats
        return SchedulerStats(
            step=self._step, num_running=len(self.running), num_waiting=len(self.waiting),
            pages_total=self.pool.num_pages - 1, pages_in_use=self.pool.num_used_pages,
            pages_evictable=self.pool.num_evictable_pages, prefix_lookup_tokens=s.lookup_tokens,
            prefix_hit_tokens=s.hit_tokens, prefix_hit_rate=s.hit_rate, evictions=s.evictions,
            expirations=s.expirations, preemptions=self.num_preemptions, num_finished=self.num_finished,
            num_aborted=self.num_aborted)

    # ---- scheduling -----------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        if self._outstanding is not None:
            raise RuntimeError(f"step {self._outstanding[0]} was scheduled but update() was not called for it")
        cfg = self.config
        self._step += 1
        budget = cfg.max_num_batched_tokens
        chosen: list[tuple[Request, int]] = []
        copy_ops: list[tuple[int, int]] = []
        preempted: list[str] = []

        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self._reserve(req, n, copy_ops):
                victim = min(self.running[i:], key=lambda r: (r.priority, -self._order[r.request_id]))
                self._preempt(victim)
                preempted.append(victim.request_id)
                if victim is req:
                    break
            else:
                chosen.append((req, n))
                budget -= n
                i += 1

        while not preempted and self.waiting and budget > 0 and len(self.running) < cfg.max_num_seqs:
            req = self.waiting[0]
            self._map_cached_prefix(req)
            n = min(req.num_tokens - req.num_computed_tokens, budget)
            if not self._reserve(req, n, copy_ops):
                self._release(req)  # keeps waiting; the hit pages go back
                break
            self.waiting.popleft()
            self._count_lookup(req)
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            chosen.append((req, n))
            budget -= n

        plan = SchedulerOutput(step=self._step, page_size=cfg.page_size,
                               requests=tuple(self._plan_entry(r, n) for r, n in chosen),
                               copy_ops=tuple(copy_ops), preempted_ids=tuple(preempted),
                               finished_ids=tuple(self._finished_since_plan))
        self._finished_since_plan = []
        self._outstanding = (self._step, {r.request_id: r for r, _ in chosen})
        return plan

    def _plan_entry(self, req: Request, n: int) -> ScheduledRequest:
        L = self.config.page_size
        c = req.num_computed_tokens
        positions = tuple(range(c, c + n))
        if n == 1:  # decode: the common case, kept cheap
            tokens, slots = (req.token_at(c),), (req.page_ids[c // L] * L + c % L,)
        else:
            np_ = req.num_prompt_tokens
            tokens = (*req.prompt_token_ids[c:c + n], *req.output_token_ids[max(c - np_, 0):max(c + n - np_, 0)])
            pages = req.page_ids
            slots = tuple(pages[p // L] * L + p % L for p in positions)
        return ScheduledRequest(
            request_id=req.request_id, token_ids=tokens, positions=positions, slot_mapping=slots,
            block_table=tuple(req.page_ids), num_computed_tokens=c + n, sample=c + n == req.num_tokens,
            sample_index=len(req.output_token_ids), is_prefill=n > 1 or c + 1 < req.num_tokens,
            sampling_params=req.sampling_params)

    def _reserve(self, req: Request, n: int, copy_ops: list) -> bool:
        """Gives ``req`` the pages to write positions [c, c + n): new pages past its table, and private
        copies of shared pages in that range. All or nothing; False if the pool is short."""
        L = self.config.page_size
        c = req.num_computed_tokens
        first, last = c // L, (c + n - 1) // L
        shared = [j for j in range(first, min(last + 1, len(req.page_ids)))
                  if self.pool.ref_count(req.page_ids[j]) > 1]
        new = max(0, last + 1 - len(req.page_ids))
        if new + len(shared) > self.pool.num_free_pages:
            return False
        for j in shared:
            src, (dst,) = req.page_ids[j], self.pool.allocate(1)
            copy_ops.append((src, dst))
            req.page_ids[j] = dst
            self.pool.free([src])
        req.page_ids.extend(self.pool.allocate(new))
        return True

    def _map_cached_prefix(self, req: Request) -> None:
        """Maps the longest cached full-page prefix of a request that holds no pages. At least one token is
        left to compute (its logits are needed): a fully cached sequence recomputes its last token."""
        if req.page_ids or not self.config.enable_prefix_caching:
            return
        tokens = req.all_token_ids
        self.prefix_cache.extend_hashes(req.block_hashes, tokens)
        pages = self.prefix_cache.lookup(req.block_hashes)
        self.pool.touch(pages)
        req.page_ids = pages
        req.num_computed_tokens = min(len(pages) * self.config.page_size, len(tokens) - 1)
        self._inserted[req.request_id] = len(pages)

    def _count_lookup(self, req: Request) -> None:
        pages = req.page_ids[:self._inserted.get(req.request_id, 0)]
        self.prefix_cache.record_hit(pages, priority=req.priority)
        req.num_cached_tokens = req.num_computed_tokens
        self.cache_stats.lookup_tokens += req.num_tokens
        self.cache_stats.hit_tokens += req.num_computed_tokens

    def _release(self, req: Request) -> None:
        """Returns all of ``req``'s pages (tail first, so a prefix outlives its suffix in the LRU order)."""
        self.pool.free(reversed(req.page_ids))
        req.page_ids = []
        req.num_computed_tokens = 0
        self._inserted[req.request_id] = 0

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self._release(req)
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(req)

    def _retire(self, req: Request, status: RequestStatus) -> None:
        self._release(req)
        req.status = status
        del self.requests[req.request_id]
        self._order.pop(req.request_id, None)
        self._inserted.pop(req.request_id, None)
        self._finished_since_plan.append(req.request_id)
        if status is RequestStatus.FINISHED_ABORTED:
            self.num_aborted += 1
        else:
            self.num_finished += 1

    # ---- results --------------------------------------------------------------------------------------
    def update(self, plan: SchedulerOutput, sampled_token_ids: Mapping[str, int]) -> list[RequestOutput]:
        """Records the step ``plan`` as done; ``sampled_token_ids`` holds a token for every scheduled request
        with ``sample`` set (others are ignored). Returns one output per request that got a token."""
        if self._outstanding is None or self._outstanding[0] != plan.step:
            expected = None if self._outstanding is None else self._outstanding[0]
            raise RuntimeError(f"update() got the plan of step {plan.step}, but the outstanding step is {expected}")
        live = self._outstanding[1]
        entries = [(s, live[s.request_id]) for s in plan.requests
                   if live[s.request_id].status is RequestStatus.RUNNING]  # skips requests aborted meanwhile
        missing = [s.request_id for s, _ in entries if s.sample and s.request_id not in sampled_token_ids]
        if missing:
            raise KeyError(f"no sampled token for requests {missing} (their plan entries have sample=True)")
        self._outstanding = None
        outputs = []
        for s, req in entries:
            req.num_computed_tokens = s.num_computed_tokens
            self._cache_full_pages(req)
            if not s.sample:
                continue
            token = int(sampled_token_ids[s.request_id])
            req.output_token_ids.append(token)
            status = self._stop_status(req, token)
            text = None
            if status is not None:
                self.running.remove(req)
                self._retire(req, status)
                if self.detokenize is not None:
                    text = req.text if req.text is not None else self.detokenize(req.output_token_ids)
            outputs.append(RequestOutput(
                request_id=req.request_id, new_token_ids=(token,), num_output_tokens=len(req.output_token_ids),
                finished=status is not None, finish_reason=req.finish_reason, stop_reason=req.stop_reason,
                text=text))
        return outputs

    def _cache_full_pages(self, req: Request) -> None:
        if not self.config.enable_prefix_caching:
            return
        L = self.config.page_size
        full = req.num_computed_tokens // L
        done = self._inserted.get(req.request_id, 0)
        if full <= done:
            return
        if len(req.block_hashes) < full:
            self.prefix_cache.extend_hashes(req.block_hashes, req.all_token_ids[:full * L])
        ttl = req.cache_ttl_s
        for j in range(done, full):
            self.prefix_cache.insert(req.page_ids[j], req.block_hashes[j], priority=req.priority, ttl_s=ttl)
        self._inserted[req.request_id] = full

    def _stop_status(self, req: Request, token: int) -> RequestStatus | None:
        sp = req.sampling_params
        if token in sp.stop_token_ids or (not sp.ignore_eos and token in self.config.eos_token_ids):
            req.stop_reason = token
            return RequestStatus.FINISHED_STOPPED
        if sp.stop:
            text = self.detokenize(req.output_token_ids)
            hits = [(text.find(s), s) for s in sp.stop if s in text]
            if hits:
                at, s = min(hits)
                req.stop_reason, req.text = s, text[:at]
                return RequestStatus.FINISHED_STOPPED
        if len(req.output_token_ids) >= sp.max_tokens or req.num_tokens >= self.config.max_model_len:
            return RequestStatus.FINISHED_LENGTH
        return None
