"""Runs scheduler plans on the device: one pure jitted step over a donated page pool.

``step(graph, params, pages, inputs) -> (tokens [B], pages)``: embeds the packed tokens as a [1, T] batch,
runs every layer over the ``PagedKVCache`` (k/v written into the pages, ragged paged attention), applies the
LM head only to the last token of each sequence and samples with per-row settings and keys
``fold_in(key(seed), sample_index)``, so a request's draws do not depend on what it is batched with.

Shapes come in buckets (``step_inputs``): the number of distinct compiled programs is bounded, and
``num_compilations`` (a trace counter: the step body runs in Python only when jax traces a new shape) lets
callers check that steady-state serving does not recompile. Copy-on-write page copies run on the device
in a second small jitted function (donated pages, copy count bucketed) before the step's writes.

With a ``mesh`` (tensor parallelism, ``tensor_parallel.py``) the model is sharded, the pool is split over KV
heads, step inputs are replicated and the mesh rides in the static ``attention`` options to the kernels; both
jitted functions pin the pool's output sharding to its input's, so steps never recompile for a layout.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from ..model.static_graph import StaticGraph
from ..sampling import sample_tokens
from sharding.partition import per_device_bytes, use_mesh

from .paged_cache import KVPages, PagedKVCache
from .step_inputs import Buckets, StepInputs, bucket, build_step_inputs, empty_step_inputs
from .tensor_parallel import check_engine_mesh, place_model, replicate

_TRACES = {"step": 0, "copy": 0}


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(2,))
def step(graph: StaticGraph, params, pages: KVPages, inputs: StepInputs, attention: tuple = ()):
    """One engine step. Returns (sampled tokens [B] int32, updated pages). ``attention``: static
    (name, value) pairs for the kernels' dispatch (``backend``, ``interpret``, ``mesh``)."""
    _TRACES["step"] += 1
    model = graph.merge(params)
    options = dict(attention)
    cache = PagedKVCache(pages=pages, slot_mapping=inputs.slot_mapping, page_table=inputs.page_table,
                         context_lens=inputs.context_lens, query_start=inputs.query_start,
                         num_seqs=inputs.num_seqs, decode_only=inputs.decode_only, **options)
    h, cache = model.hidden_states(inputs.token_ids[None], inputs.positions[None], cache=cache)
    logits = model.logits(h[0, inputs.logits_indices])  # [B, V] float32
    if inputs.all_greedy:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    else:
        keys = jax.vmap(lambda s, i: jax.random.fold_in(jax.random.key(s), i))(inputs.seeds, inputs.sample_index)
        tokens = sample_tokens(logits, keys, inputs.temperature, inputs.top_k, inputs.top_p)
    return tokens, cache.pages.constrain(options.get("mesh"))


@functools.partial(jax.jit, static_argnums=(3,), donate_argnums=(0,))
def copy_pages(pages: KVPages, src, dst, mesh=None) -> KVPages:
    _TRACES["copy"] += 1
    return pages.copy_pages(src, dst).constrain(mesh)


def num_compilations() -> int:
    """Programs traced so far by this process's step and copy functions (all runners together)."""
    return _TRACES["step"] + _TRACES["copy"]


class ModelRunner:
    """Owns the device state of one engine: parameters and the page pool (sharded over ``mesh`` if given:
    ``tensor_parallel.py``; the model is sharded here unless it already is, on that mesh)."""

    def __init__(self, model, *, num_pages: int, page_size: int, max_num_seqs: int, max_num_batched_tokens: int,
                 max_pages_per_seq: int, kv_dtype=None, token_buckets=None, seq_buckets=None,
                 attention_backend: str | None = None, interpret: bool = False, mesh=None):
        self.buckets = Buckets.make(max_num_batched_tokens=max_num_batched_tokens, max_num_seqs=max_num_seqs,
                                    max_pages_per_seq=max_pages_per_seq, token_buckets=token_buckets,
                                    seq_buckets=seq_buckets)
        self.mesh = check_engine_mesh(model, mesh)  # errors first, then device work
        model = place_model(model, self.mesh)
        self.cfg = model.cfg
        self.graph, self.params = StaticGraph.split(model)
        kv_dtype = model.dtype if kv_dtype is None else kv_dtype
        self.pages = KVPages.create(self.cfg, num_pages=num_pages, page_size=page_size, dtype=kv_dtype,
                                    mesh=self.mesh)
        self.attention = (("backend", attention_backend), ("interpret", bool(interpret)), ("mesh", self.mesh))
        self.shape_keys: set[tuple] = set()  # step shapes run so far
        self.num_steps = 0

    @property
    def param_bytes(self) -> int:
        """Parameter bytes on the fullest device (all of them without a mesh)."""
        return max(per_device_bytes(self.params).values(), default=0)

    def build_inputs(self, plan, seeds: dict[str, int]) -> StepInputs:
        return build_step_inputs(plan, seeds, self.buckets)

    def all_shape_keys(self, *, sampled: bool = True) -> list[tuple]:
        return self.buckets.shape_keys(sampled=sampled)

    def warmup(self, *, sampled: bool = True) -> int:
        """Compiles every step shape (and the smallest page-copy bucket) without touching the pages' contents.
        ``sampled=False`` skips the sampling variants (greedy-only serving). Returns the number of shapes."""
        keys = self.all_shape_keys(sampled=sampled)
        for key in keys:
            inputs = replicate(empty_step_inputs(key), self.mesh)
            with use_mesh(self.mesh):
                tokens, self.pages = step(self.graph, self.params, self.pages, inputs, self.attention)
        self.copy([(0, 0)])
        tokens.block_until_ready()
        return len(keys)

    def copy(self, copy_ops) -> None:
        if not copy_ops:
            return
        c = bucket(len(copy_ops), 4, 1 << 30)  # powers of two: few programs
        src = np.zeros(c, np.int32)
        dst = np.zeros(c, np.int32)
        src[:len(copy_ops)], dst[:len(copy_ops)] = zip(*copy_ops)
        self.pages = copy_pages(self.pages, *replicate((src, dst), self.mesh), self.mesh)

    def execute(self, plan, seeds: dict[str, int]) -> dict[str, int]:
        """Runs ``plan`` (copies first, then the step); returns {request_id: token} for sampling requests."""
        return self.execute_inputs(plan, None if plan.is_empty else self.build_inputs(plan, seeds))

    def execute_inputs(self, plan, inputs: StepInputs | None) -> dict[str, int]:
        """``execute`` with the inputs already built (``build_inputs``; None for an empty plan)."""
        return self.collect(self.launch(plan, inputs))

    def launch(self, plan, inputs: StepInputs | None):
        """Dispatches the step without waiting for it; ``collect`` the returned handle for its tokens."""
        self.copy(plan.copy_ops)
        if inputs is None:
            return plan, None
        self.shape_keys.add(inputs.shape_key)
        inputs = replicate(inputs, self.mesh)
        with use_mesh(self.mesh):  # the model's activation constraints apply on the mesh (sharding/rules.py)
            tokens, self.pages = step(self.graph, self.params, self.pages, inputs, self.attention)
        self.num_steps += 1
        return plan, tokens

    @staticmethod
    def collect(launched) -> dict[str, int]:
        """Waits for a launched step: {request_id: token} for its sampling requests."""
        plan, tokens = launched
        if tokens is None:
            return {}
        host = np.asarray(tokens)
        return {r.request_id: int(host[i]) for i, r in enumerate(plan.requests) if r.sample}
