"""Offline serving engine: continuous batching over a paged KV cache with prefix caching.

``LLM(model, ...)`` ties the host-side ``Scheduler`` to a ``ModelRunner`` (device state). Each ``step()``
schedules a plan, runs it (copy-on-write copies, then one jitted step) and feeds the sampled tokens back.
``generate`` runs a list of prompts to completion; ``stream`` yields one prompt's tokens as they come;
``abort`` cancels a request and returns its pages at once.

Shapes: steps are padded to buckets (``step_inputs.Buckets``; ``token_buckets`` / ``seq_buckets`` override
the default powers of two, each must end at max_num_batched_tokens / max_num_seqs); ``warmup()`` compiles
them all so that serving never compiles.

Kernels: ``attention_backend`` / ``interpret`` pass through to the paged attention kernels (default: by
platform; ``interpret=True`` runs the GPU kernels' Pallas code on CPU, for tests).

Sizing: ``num_pages=None`` takes what device memory allows (``autoglm_jax.memory``): free memory now (the
parameters are already loaded) less a headroom and the step workspace, divided by the page size in bytes.
Without a memory query (CPU) it allocates enough pages for ``max_num_seqs`` full contexts, at most 1 GiB.

Tensor parallelism: ``mesh=sharding.make_mesh(tensor=t)`` shards the model (unless it already is, on that
mesh; a tensor-parallel model without ``mesh=`` runs on its own mesh), splits the page pool over KV heads and
runs the attention kernels per shard (``tensor_parallel.py``). Sizing then counts bytes per device: the
least free memory over the mesh's devices, a page's K'/t heads. A mesh that does not fit raises ``MeshError``
before any device work. Sharding here leaves the caller's unsharded model where it is (one full copy on its
device, counted against that device's free memory): pass an already sharded model
(``sharding.from_pretrained_sharded``) to serve large models.
"""

from __future__ import annotations

import dataclasses
import itertools
import time
from typing import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from ..memory import GiB, device_free_bytes, plan_memory
from .request import Request, SamplingParams
from .runner import ModelRunner, num_compilations
from .scheduler import RequestOutput, Scheduler, SchedulerConfig, SchedulerOutput
from .step_inputs import StepInputs
from .tensor_parallel import check_engine_mesh, place_model, tensor_degree

CPU_KV_BUDGET = 1 * GiB


@dataclasses.dataclass
class Completion:
    """One finished (or aborted) request: its tokens, text and timing (``time.perf_counter`` seconds)."""

    request_id: str
    prompt_token_ids: tuple[int, ...]
    token_ids: list[int] = dataclasses.field(default_factory=list)
    text: str | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0
    arrival_time: float = 0.0
    token_times: list[float] = dataclasses.field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def ttft(self) -> float | None:
        return self.token_times[0] - self.arrival_time if self.token_times else None

    @property
    def itl(self) -> list[float]:
        return list(np.diff(self.token_times)) if len(self.token_times) > 1 else []


def _kv_dtype_name(kv_dtype, model_dtype) -> str:
    name = jnp.dtype(model_dtype if kv_dtype is None else kv_dtype).name
    if name not in ("float32", "bfloat16", "float16", "int8"):
        raise ValueError(f"kv_dtype={kv_dtype!r} is not supported; allowed: None (the model's dtype), 'int8', "
                         "'bfloat16', 'float16', 'float32'")
    return name


class LLM:
    def __init__(self, model, *, num_pages: int | None = None, page_size: int = 16, max_num_seqs: int = 64,
                 max_num_batched_tokens: int = 512, max_model_len: int | None = None, kv_dtype=None,
                 tokenizer=None, eviction: str = "lru", enable_prefix_caching: bool = True, seed: int = 0,
                 memory_headroom: float = 0.1, model_key: str = "", token_buckets: Sequence[int] | None = None,
                 seq_buckets: Sequence[int] | None = None, attention_backend: str | None = None,
                 interpret: bool = False, mesh=None):
        cfg = model.cfg
        self.cfg, self.tokenizer = cfg, tokenizer
        max_model_len = cfg.max_position_embeddings if max_model_len is None else max_model_len
        if not isinstance(max_model_len, int) or not 1 < max_model_len <= cfg.max_position_embeddings:
            raise ValueError(f"max_model_len={max_model_len!r} must be an integer in 2..{cfg.max_position_embeddings} "
                             "(the model's max_position_embeddings)")
        if not isinstance(page_size, int) or page_size < 1 or page_size & (page_size - 1):
            raise ValueError(f"page_size={page_size!r} must be a power of two (the paged kernels need it)")
        self.kv_dtype = _kv_dtype_name(kv_dtype, model.dtype)
        self.mesh = check_engine_mesh(model, mesh)  # MeshError before any device work
        pages_per_seq = -(-max_model_len // page_size)
        plan = plan_memory(cfg, dtype=jnp.dtype(model.dtype).name, kv_dtype=self.kv_dtype, batch=max_num_seqs,
                           context=max_model_len, page_size=page_size, chunk=max_num_batched_tokens,
                           logits_rows=max_num_seqs, tensor=tensor_degree(self.mesh))
        if num_pages is None:
            free = device_free_bytes(None if self.mesh is None else self.mesh.devices.flat)
            if free is None:
                num_pages = min(max_num_seqs * pages_per_seq + 1, max(CPU_KV_BUDGET // plan.page_bytes, 2))
            else:
                num_pages = (int(free * (1 - memory_headroom)) - plan.workspace_bytes) // plan.page_bytes
            if num_pages < pages_per_seq + 1:
                raise ValueError(f"device memory holds only {num_pages} KV pages of {plan.page_bytes} bytes; one "
                                 f"context of {max_model_len} tokens needs {pages_per_seq} + 1 (null page): lower "
                                 "max_model_len, use kv_dtype='int8' or free memory")
        sched_cfg = SchedulerConfig.for_model(
            cfg, num_pages=num_pages, page_size=page_size, max_model_len=max_model_len, max_num_seqs=max_num_seqs,
            max_num_batched_tokens=max_num_batched_tokens, eviction=eviction, model_key=model_key,
            enable_prefix_caching=enable_prefix_caching)
        self.scheduler = Scheduler(sched_cfg, detokenize=None if tokenizer is None else tokenizer.decode)
        model = place_model(model, self.mesh)
        self.cfg = model.cfg  # a sharded model's: K' KV heads
        self.runner = ModelRunner(model, num_pages=num_pages, page_size=page_size, max_num_seqs=max_num_seqs,
                                  max_num_batched_tokens=max_num_batched_tokens, max_pages_per_seq=pages_per_seq,
                                  kv_dtype=self.kv_dtype, token_buckets=token_buckets, seq_buckets=seq_buckets,
                                  attention_backend=attention_backend, interpret=interpret, mesh=self.mesh)
        kv_bytes = num_pages * plan.page_bytes  # per device on a mesh, like the other entries
        self.memory = {"tensor_parallel": plan.tensor, "param_bytes": self.runner.param_bytes,
                       "page_bytes": plan.page_bytes,
                       "num_pages": num_pages, "kv_bytes": kv_bytes, "workspace_bytes": plan.workspace_bytes,
                       "predicted_peak_bytes": self.runner.param_bytes + kv_bytes + plan.workspace_bytes}
        self._rng = np.random.default_rng(seed)
        self._ids = itertools.count()
        self._seeds: dict[str, int] = {}
        self.completions: dict[str, Completion] = {}  # every request since start (finished ones included)

    # ---- requests -------------------------------------------------------------------------------------
    def _tokens(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass LLM(..., tokenizer=...) or token ids")
            return list(self.tokenizer.encode(prompt))
        try:
            return [int(t) if isinstance(t, (int, np.integer)) else t for t in prompt]
        except TypeError:
            raise ValueError(f"a prompt must be a string or a sequence of token ids; got {type(prompt).__name__}")

    def add_request(self, prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
                    priority: int = 2) -> str:
        """Queues one request; returns its id. Raises ValueError (queueing nothing) for a bad request."""
        params = SamplingParams() if params is None else params
        rid = f"req-{next(self._ids)}" if request_id is None else request_id
        tokens = self._tokens(prompt)
        self.scheduler.add_request(Request(rid, tokens, params, priority=priority))
        self._seeds[rid] = params.seed if params.seed is not None else int(self._rng.integers(2 ** 32))
        self.completions[rid] = Completion(rid, tuple(tokens), arrival_time=time.perf_counter())
        return rid

    def abort(self, request_id: str) -> bool:
        """Cancels a request; its pages return to the pool now. False if unknown or already finished."""
        if not self.scheduler.abort(request_id):
            return False
        self._seeds.pop(request_id, None)
        c = self.completions.get(request_id)
        if c is not None and c.finish_reason is None:
            c.finish_reason = "abort"
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- stepping -------------------------------------------------------------------------------------
    def schedule(self) -> tuple[SchedulerOutput, StepInputs | None]:
        """Host half of a step: the plan and its padded inputs (None for an empty plan)."""
        plan = self.scheduler.schedule()
        for s in plan.requests:
            c = self.completions[s.request_id]
            if not c.token_times:  # still in its first prefill: record the prefix-cache hit
                c.num_cached_tokens = self.scheduler.requests[s.request_id].num_cached_tokens
        return plan, (None if plan.is_empty else self.runner.build_inputs(plan, self._seeds))

    def run(self, plan: SchedulerOutput, inputs: StepInputs | None) -> dict[str, int]:
        """Device half: copy-on-write copies, then the step. Returns sampled tokens by request id."""
        return self.runner.execute_inputs(plan, inputs)

    def launch(self, plan: SchedulerOutput, inputs: StepInputs | None):
        """``run`` split in two: dispatch now, ``collect(handle)`` waits for the sampled tokens."""
        return self.runner.launch(plan, inputs)

    def collect(self, handle) -> dict[str, int]:
        return self.runner.collect(handle)

    def finish_step(self, plan: SchedulerOutput, sampled: dict[str, int]) -> list[RequestOutput]:
        outs = self.scheduler.update(plan, sampled)
        now = time.perf_counter()
        for o in outs:
            c = self.completions[o.request_id]
            c.token_ids.extend(o.new_token_ids)
            c.token_times.append(now)
            if o.finished:
                c.finish_reason, c.stop_reason, c.text = o.finish_reason, o.stop_reason, o.text
                self._seeds.pop(o.request_id, None)
        return outs

    def step(self) -> list[RequestOutput]:
        plan, inputs = self.schedule()
        return self.finish_step(plan, self.run(plan, inputs))

    # ---- convenience ----------------------------------------------------------------------------------
    def generate(self, prompts, params: SamplingParams | Sequence[SamplingParams] | None = None, *,
                 priority: int = 2) -> list[Completion]:
        """Runs prompts (a string, a token list, or a list of either) to completion; one Completion each.

        All prompts are checked before any is queued: a bad one raises ValueError and nothing runs."""
        single = isinstance(prompts, str) or (len(prompts) > 0 and isinstance(prompts[0], (int, np.integer)))
        prompts = [prompts] if single else list(prompts)
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(plist) != len(prompts):
            raise ValueError(f"{len(plist)} sampling params for {len(prompts)} prompts; pass one or one per prompt")
        ids = []
        try:
            for p, sp in zip(prompts, plist):
                ids.append(self.add_request(p, sp, priority=priority))
        except ValueError:
            for rid in ids:
                self.abort(rid)
            raise
        while any(self.completions[r].finish_reason is None for r in ids):
            self.step()
        return [self.completions[r] for r in ids]

    def stream(self, prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
               priority: int = 2) -> Iterator[int]:
        """Yields the request's tokens as they are sampled (other queued requests advance too). Closing the
        iterator early aborts the request."""
        rid = self.add_request(prompt, params, request_id=request_id, priority=priority)
        try:
            while True:
                for o in self.step():
                    if o.request_id == rid:
                        yield from o.new_token_ids
                        if o.finished:
                            return
                if self.completions[rid].finish_reason is not None:  # aborted meanwhile
                    return
        finally:
            if self.completions[rid].finish_reason is None:
                self.abort(rid)

    def warmup(self, *, sampled: bool = True) -> int:
        """Compiles every step shape this engine can use, so serving never compiles (see ``step_inputs``)."""
        return self.runner.warmup(sampled=sampled)

    # ---- introspection --------------------------------------------------------------------------------
    def stats(self):
        return self.scheduler.stats()

    @property
    def num_compilations(self) -> int:
        """Programs traced so far (process-wide: step and page-copy functions)."""
        return num_compilations()

    def kv_waste(self) -> dict:
        """Slots allocated to running requests but not holding tokens (the tail of each last page)."""
        L = self.scheduler.config.page_size
        allocated = sum(len(r.page_ids) for r in self.scheduler.running) * L
        used = sum(r.num_computed_tokens for r in self.scheduler.running)
        return {"allocated_slots": allocated, "used_slots": used, "wasted_slots": allocated - used}
