"""The paged KV cache as the model sees it during one engine step.

Two pytrees:

* ``KVPages``: the page pool of every layer (the engine's long-lived device state, donated to each step):
  k, v per layer [K, P, L, H] and, for int8 pages, k_scales, v_scales per layer [K, P, L] float32
  (``kernels_pallas.kv_pages`` layout; page 0 is the scheduler's null page).
* ``PagedKVCache``: the pool plus one step's metadata. The step's tokens of all sequences are packed into
  one row, so the model runs on a [1, T] batch; ``attend`` writes the chunk's k/v into its slots
  (``write_kv_pages``) and runs ``ragged_paged_attention`` (or the decode kernel ``paged_attention`` when
  every sequence has exactly one query token, ``decode_only``).

Step metadata (T = padded token count, B = padded sequence count)::

    slot_mapping  [T]            page * L + offset of each token's k/v; -1 for padding (not written)
    page_table    [B, max_pages] pages of each sequence, padded with the null page 0
    context_lens  [B]            tokens of each sequence in the cache after this step (0 for padding rows)
    query_start   [B + 1]        offsets of each sequence's tokens in the packed row (padding rows empty)
    num_seqs      [1]            real sequences (rows past it are padding)

On a mesh (``mesh=``, tensor parallelism: ``engine/tensor_parallel.py``) the pool is split over KV heads
(``sharding.paged_cache_sharding``) and the kernels run per shard (``sharding.kernels``, shard_map).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels_pallas.kv_pages import write_kv_pages
from kernels_pallas.paged_attention import paged_attention
from kernels_pallas.ragged_paged_attention import ragged_paged_attention
from sharding.kernels import sharded_paged_attention, sharded_ragged_paged_attention
from sharding.partition import paged_cache_sharding

KV_DTYPES = ("float32", "bfloat16", "float16", "int8")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVPages:
    k: tuple[jax.Array, ...]         # per layer [K, P, L, H]
    v: tuple[jax.Array, ...]         # per layer [K, P, L, H]
    k_scales: tuple[jax.Array, ...]  # per layer [K, P, L] float32 (int8 pages only; else empty)
    v_scales: tuple[jax.Array, ...]

    @classmethod
    def create(cls, cfg, *, num_pages: int, page_size: int, dtype, mesh=None) -> "KVPages":
        """Zeroed pages for ``cfg`` (a GLMConfig; a sharded model's, with K' KV heads, on a mesh); ``dtype``
        "int8" adds per-token scales. With ``mesh`` each device allocates only its KV heads."""
        dtype = jnp.dtype(dtype)
        if dtype.name not in KV_DTYPES:
            raise ValueError(f"kv dtype {dtype.name!r} is not supported; allowed: {KV_DTYPES}")
        shape = (cfg.num_kv_heads, num_pages, page_size, cfg.head_dim)
        place = (lambda shp: None) if mesh is None else (lambda shp: paged_cache_sharding(mesh, shp))
        zeros = lambda shp, dt: tuple(jnp.zeros(shp, dt, device=place(shp)) for _ in range(cfg.num_layers))
        scales = zeros(shape[:3], jnp.float32) if dtype == jnp.int8 else ()
        return cls(k=zeros(shape, dtype), v=zeros(shape, dtype), k_scales=scales,
                   v_scales=zeros(shape[:3], jnp.float32) if scales else ())

    @property
    def quantized(self) -> bool:
        return bool(self.k_scales)

    @property
    def num_pages(self) -> int:
        return self.k[0].shape[1]

    @property
    def page_size(self) -> int:
        return self.k[0].shape[2]

    def nbytes(self) -> int:
        return sum(x.nbytes for x in jax.tree_util.tree_leaves(self))

    def constrain(self, mesh) -> "KVPages":
        """Inside jit: pins every array to its ``paged_cache_sharding`` over ``mesh`` (None: unchanged), so a
        step returns the pool laid out as it came in (donation and the compiled programs stay valid)."""
        if mesh is None:
            return self
        pin = lambda x: jax.lax.with_sharding_constraint(x, paged_cache_sharding(mesh, x.shape))
        return jax.tree_util.tree_map(pin, self)

    def copy_pages(self, src: jax.Array, dst: jax.Array) -> "KVPages":
        """Copies page src[i] to dst[i] in every layer (K, V and scales). src, dst: [C] int32; pairs (0, 0)
        are padding (the null page onto itself)."""
        cp = lambda x: x.at[:, dst].set(x[:, src])
        return KVPages(k=tuple(map(cp, self.k)), v=tuple(map(cp, self.v)), k_scales=tuple(map(cp, self.k_scales)),
                       v_scales=tuple(map(cp, self.v_scales)))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PagedKVCache:
    pages: KVPages
    slot_mapping: jax.Array   # [T] int32
    page_table: jax.Array     # [B, max_pages] int32
    context_lens: jax.Array   # [B] int32
    query_start: jax.Array    # [B + 1] int32
    num_seqs: jax.Array       # [1] int32
    decode_only: bool = dataclasses.field(default=False, metadata=dict(static=True))
    backend: str | None = dataclasses.field(default=None, metadata=dict(static=True))  # kernels' dispatch
    interpret: bool = dataclasses.field(default=False, metadata=dict(static=True))   # Pallas interpret mode
    mesh: object = dataclasses.field(default=None, metadata=dict(static=True))  # tensor-parallel Mesh or None

    def attend(self, layer: int, q, k, v, positions, *, scale: float):
        """q [1, T, N, H], k, v [1, T, K, H] (packed tokens of all sequences) -> (out [1, T, N, H], cache).

        Writes k, v at ``slot_mapping`` then attends each token to its sequence's keys up to its position
        (``positions`` are implied by context_lens / query_start and not read here)."""
        del positions
        if q.shape[0] != 1:
            raise ValueError(f"the paged cache takes packed tokens as a [1, T] batch; got q {q.shape}")
        p = self.pages
        quant = p.quantized
        written = write_kv_pages(p.k[layer], p.v[layer], k[0], v[0], self.slot_mapping,
                                 k_scales=p.k_scales[layer] if quant else None,
                                 v_scales=p.v_scales[layer] if quant else None)
        kl, vl = written[:2]
        ks, vs = (written[2], written[3]) if quant else (None, None)
        kw = dict(k_scales=ks, v_scales=vs, scale=scale, backend=self.backend, interpret=self.interpret)
        if self.decode_only:  # one query token per sequence: row b of q is sequence b
            args = (q[0], kl, vl, self.context_lens, self.page_table)
            out = paged_attention(*args, **kw) if self.mesh is None else sharded_paged_attention(self.mesh, *args, **kw)
        else:
            args = (q[0], kl, vl, self.page_table, self.context_lens, self.query_start, self.num_seqs)
            out = (ragged_paged_attention(*args, **kw) if self.mesh is None
                   else sharded_ragged_paged_attention(self.mesh, *args, **kw))
        put = lambda xs, x: xs[:layer] + (x,) + xs[layer + 1:]
        pages = KVPages(k=put(p.k, kl), v=put(p.v, vl), k_scales=put(p.k_scales, ks) if quant else (),
                        v_scales=put(p.v_scales, vs) if quant else ())
        return out[None], dataclasses.replace(self, pages=pages)
