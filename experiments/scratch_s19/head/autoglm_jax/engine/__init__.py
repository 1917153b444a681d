"""Serving engine: block pool, prefix cache, eviction, requests, scheduler (host side); paged KV cache,
bucketed step inputs and the jitted model runner (device side); ``LLM`` (offline) and ``AsyncLLM`` (online)."""

from .async_llm import AsyncLLM
from .block_pool import NULL_PAGE, BlockPool, OutOfPages
from .eviction import CacheStats, EvictionPolicy, LRUPolicy, PriorityScorePolicy, make_policy, priority_score
from .llm import LLM, Completion
from .paged_cache import KVPages, PagedKVCache
from .prefix_cache import PrefixCache, chain_hash
from .request import Request, RequestStatus, SamplingParams, validate_request
from .runner import ModelRunner, num_compilations
from .scheduler import (RequestOutput, ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput,
                        SchedulerStats)
from .step_inputs import Buckets, StepInputs, build_step_inputs

__all__ = [
    "NULL_PAGE", "BlockPool", "OutOfPages", "CacheStats", "EvictionPolicy", "LRUPolicy", "PriorityScorePolicy",
    "make_policy", "priority_score", "PrefixCache", "chain_hash", "Request", "RequestStatus", "SamplingParams",
    "validate_request", "RequestOutput", "ScheduledRequest", "Scheduler", "SchedulerConfig", "SchedulerOutput",
    "SchedulerStats", "AsyncLLM", "LLM", "Completion", "KVPages", "PagedKVCache", "ModelRunner",
    "num_compilations", "Buckets", "StepInputs", "build_step_inputs",
]
