"""Host-side serving engine pieces: block pool, prefix cache, eviction policies, requests, scheduler."""

from .block_pool import NULL_PAGE, BlockPool, OutOfPages
from .eviction import CacheStats, EvictionPolicy, LRUPolicy, PriorityScorePolicy, make_policy, priority_score
from .prefix_cache import PrefixCache, chain_hash
from .request import Request, RequestStatus, SamplingParams, validate_request
from .scheduler import (RequestOutput, ScheduledRequest, Scheduler, SchedulerConfig, SchedulerOutput,
                        SchedulerStats)

__all__ = [
    "NULL_PAGE", "BlockPool", "OutOfPages", "CacheStats", "EvictionPolicy", "LRUPolicy", "PriorityScorePolicy",
    "make_policy", "priority_score", "PrefixCache", "chain_hash", "Request", "RequestStatus", "SamplingParams",
    "validate_request", "RequestOutput", "ScheduledRequest", "Scheduler", "SchedulerConfig", "SchedulerOutput",
    "SchedulerStats",
]
