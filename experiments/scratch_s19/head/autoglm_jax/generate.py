"""Generation over a preallocated dense KV cache: one jitted prefill, one jitted decode step (donated cache).

The prompts of a batch are right-padded to a common length; each row keeps its own positions, so row b's
decode step t writes slot ``len_b + t`` and attends to slots ``0..len_b + t``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sharding.partition import mesh_of, use_mesh

from .kv_cache import DenseKVCache
from .model.static_graph import StaticGraph
from .sampling import sample_tokens

CACHE_BUCKET = 128  # cache lengths are rounded up to this, so nearby requests share one compilation


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0
    seed: int = 0
    eos_token_ids: tuple[int, ...] | None = None  # None = the model config's
    cache_dtype: str | None = None  # None = the model's compute dtype
    # Prefill at most this many tokens per call (whole rows; the row count divides the batch), bounding the
    # activation memory of a large batch at a small cost in prefill speed. The dense attention's float32
    # logits dominate: rows x N x T x S x 4 bytes (4096 tokens of 512 over a 640-slot cache: 0.31 GiB, with
    # masked and exponentiated copies about 1 GiB; the H100 peak at 4096 was 2.8 GiB over params + KV).
    max_prefill_tokens: int = 2048

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1")
        if self.temperature < 0:
            raise ValueError(f"temperature={self.temperature} must be >= 0 (0 = greedy)")
        if self.top_k < 0:
            raise ValueError(f"top_k={self.top_k} must be >= 0 (0 = no limit)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if self.max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens={self.max_prefill_tokens} must be >= 1")


@functools.partial(jax.jit, static_argnums=(0,), donate_argnums=(4,))
def _prefill(graph: StaticGraph, state, input_ids, positions, cache, last_index):
    model = graph.merge(state)
    h, cache = model.hidden_states(input_ids, positions, cache=cache)
    h_last = jnp.take_along_axis(h, last_index[:, None, None], axis=1)[:, 0]  # [B, D]
    return model.logits(h_last), cache


def _step_keys(key, step, batch: int):
    """Row keys of sampling step ``step``: split(fold_in(key, step), B), the same in and out of jit."""
    return jax.random.split(jax.random.fold_in(key, step), batch)


@functools.partial(jax.jit, static_argnums=(0, 10), donate_argnums=(4,))
def _decode(graph: StaticGraph, state, tokens, positions, cache, key, step, temperature, top_k, top_p, all_greedy):
    """One decode step. tokens, positions: [B]; step: int32 scalar (the sampling step, for the keys).

    Returns (next tokens [B], positions + 1, step + 1, cache): everything the next step needs stays on the
    device, so the host only dispatches and never waits between steps.
    """
    model = graph.merge(state)
    h, cache = model.hidden_states(tokens[:, None], positions[:, None], cache=cache)
    logits = model.logits(h[:, 0])
    keys = _step_keys(key, step, tokens.shape[0])
    return sample_tokens(logits, keys, temperature, top_k, top_p, all_greedy=all_greedy), positions + 1, step + 1, cache


def decode_hlo(model, cache: DenseKVCache, *, position: int = 0) -> str:
    """The optimized HLO of one greedy decode step of ``model`` over ``cache`` (every row at ``position``),
    compiled as ``decode_stream`` runs it (under the model's mesh): for tests and diagnostics that count its
    collectives, transposes or kernels. Token and sampling values do not change the program."""
    graph, state = StaticGraph.split(model)
    batch = cache.k[0].shape[0]
    vec = lambda v, dt: jnp.full((batch,), v, dt)
    with use_mesh(mesh_of(state)):
        return _decode.lower(graph, state, vec(0, jnp.int32), vec(position, jnp.int32), cache, jax.random.key(0),
                             jnp.int32(1), vec(0.0, jnp.float32), vec(0, jnp.int32), vec(1.0, jnp.float32),
                             True).compile().as_text()


@functools.partial(jax.jit, static_argnums=(5,))
def _sample_first(logits, key, temperature, top_k, top_p, all_greedy):
    return sample_tokens(logits, _step_keys(key, 0, logits.shape[0]), temperature, top_k, top_p, all_greedy=all_greedy)


def prefill_rows(batch: int, length: int, max_tokens: int) -> int:
    """The largest divisor of ``batch`` whose rows hold at most ``max_tokens`` tokens (at least 1)."""
    fit = max(1, max_tokens // max(length, 1))
    return max(d for d in range(1, batch + 1) if batch % d == 0 and d <= fit)


def prefill(graph: StaticGraph, state, ids: np.ndarray, lens: np.ndarray, cache: DenseKVCache, *, max_tokens: int):
    """Prefills right-padded ``ids`` [B, T] in row chunks of at most ``max_tokens`` tokens.

    Returns (logits of each row's last prompt token [B, V], cache); the cache is donated.
    """
    batch, t = ids.shape
    rows = prefill_rows(batch, t, max_tokens)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (rows, t))
    parts = []
    with use_mesh(mesh_of(state)):  # a sharded model: its activation constraints apply (sharding/rules.py)
        for r0 in range(0, batch, rows):
            part, cache = _prefill(graph, state, jnp.asarray(ids[r0:r0 + rows]), positions, cache.with_rows(r0),
                                   jnp.asarray(lens[r0:r0 + rows] - 1))
            parts.append(part)
    return (parts[0] if len(parts) == 1 else jnp.concatenate(parts)), cache.with_rows(0)


def _check_prompts(cfg, prompts, max_new_tokens: int) -> np.ndarray:
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    lens = np.array([len(p) for p in prompts], np.int32)
    limit = cfg.max_position_embeddings
    if lens.max() + max_new_tokens > limit:
        raise ValueError(f"prompt of {lens.max()} tokens + max_new_tokens={max_new_tokens} exceeds the "
                         f"model's context of {limit} positions")
    return lens


def decode_stream(model, prompts: Sequence[Sequence[int]], config: GenerationConfig = GenerationConfig(), *,
                  cache: DenseKVCache | None = None) -> Iterator[jax.Array]:
    """Yields each step's tokens as a device array [B] int32 (``max_new_tokens`` steps, no EOS handling).

    Nothing here waits on the device: a consumer that does not read the tokens back keeps the device busy
    back to back. ``cache``: a preallocated (for example sharded) cache of at least prompt + new slots;
    by default one is created, its length rounded up to ``CACHE_BUCKET``. Raises before any device work
    when a prompt is empty or prompt + max_new_tokens exceeds the context.
    """
    cfg = model.cfg
    lens = _check_prompts(cfg, prompts, config.max_new_tokens)
    batch, t = len(prompts), int(lens.max())
    ids = np.zeros((batch, t), np.int32)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = p
    if cache is None:
        cache_len = min(-(-(t + config.max_new_tokens) // CACHE_BUCKET) * CACHE_BUCKET, cfg.max_position_embeddings)
        cache = DenseKVCache.create(cfg, batch, cache_len, config.cache_dtype or model.dtype)
    elif cache.max_len < t + config.max_new_tokens or cache.k[0].shape[0] != batch:
        raise ValueError(f"cache of {cache.k[0].shape[0]} rows x {cache.max_len} slots cannot hold {batch} rows "
                         f"of {t} prompt + {config.max_new_tokens} new tokens")
    graph, state = StaticGraph.split(model)
    mesh = mesh_of(state)  # a sharded model: its activation constraints apply (sharding/rules.py)
    temperature = jnp.full((batch,), config.temperature, jnp.float32)
    top_k = jnp.full((batch,), config.top_k, jnp.int32)
    top_p = jnp.full((batch,), config.top_p, jnp.float32)
    greedy = config.temperature == 0
    key = jax.random.key(config.seed)

    logits, cache = prefill(graph, state, ids, lens, cache, max_tokens=config.max_prefill_tokens)
    token = _sample_first(logits, key, temperature, top_k, top_p, greedy)
    positions, step = jnp.asarray(lens), jnp.int32(1)
    yield token
    for _ in range(config.max_new_tokens - 1):
        with use_mesh(mesh):  # per call: a suspended generator must not leave the mesh active
            token, positions, step, cache = _decode(graph, state, token, positions, cache, key, step,
                                                    temperature, top_k, top_p, greedy)
        yield token


def generate_stream(model, prompts: Sequence[Sequence[int]], config: GenerationConfig = GenerationConfig()
                    ) -> Iterator[np.ndarray]:
    """Yields the next token of every row, [B] int32, once per step (rows that finished repeat their EOS).

    Step t + 1 is dispatched before step t's tokens are read back, so the device never idles on the host.
    Raises before any device work when a prompt is empty or prompt + max_new_tokens exceeds the context.
    """
    eos = np.array(config.eos_token_ids if config.eos_token_ids is not None else model.cfg.eos_token_ids, np.int32)
    steps = decode_stream(model, prompts, config)
    pending = next(steps)
    done = np.zeros(len(prompts), bool)
    last = None
    for step in range(config.max_new_tokens):
        ahead = next(steps, None)  # dispatch the following step before waiting on this one
        host = np.asarray(pending)
        if last is not None:
            host = np.where(done, last, host)
        done |= np.isin(host, eos)
        last = host
        yield host
        if done.all() or ahead is None:
            return
        pending = ahead


def generate(model, prompts: Sequence[Sequence[int]], config: GenerationConfig = GenerationConfig()
             ) -> list[list[int]]:
    """Returns each row's new tokens, cut after its first EOS (which is kept)."""
    steps = list(generate_stream(model, prompts, config))
    out = []
    eos = set(config.eos_token_ids if config.eos_token_ids is not None else model.cfg.eos_token_ids)
    for b in range(len(prompts)):
        row = []
        for s in steps:
            row.append(int(s[b]))
            if row[-1] in eos:
                break
        out.append(row)
    return out
