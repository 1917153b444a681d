"""A preallocated dense KV cache for single-batch generation (the engine uses the paged cache instead).

Slot ``s`` of row ``b`` holds the key/value of position ``s``. A query at position ``p`` attends to slots
``0..p``; slots past ``p`` may hold stale values (right padding, earlier rows) and are masked.

Layout [B, K, S, H]: the attention products are batched over (b, k) and contract H (logits) or S (output),
so XLA's batched GEMMs read each layer's cache in place. The [B, S, K, H] layout this cache had first made
XLA transpose K and V of every layer before both products, every step: 160 transposes and 1.36 ms of a
9.5 ms batch-32 GLM-4-9B step on the H100 (512-token prompts; ``experiments/results/tp_diag/decode_profile/``).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from kernels_pallas.dense_decode_attention import dense_decode_attention, dense_decode_attention_rows
from sharding.kernels import sharded_dense_decode_attention
from sharding.partition import on_one_device

from .config import GLMConfig
from .model.attention_ops import gqa_attention

DECODE_KERNELS = ("auto", "pallas", "xla")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DenseKVCache:
    k: tuple[jax.Array, ...]  # per layer [B, K, S, H]
    v: tuple[jax.Array, ...]  # per layer [B, K, S, H]
    # First cache row that the queries' rows map to: a prefill of rows r0..r0+b-1 (to bound activation
    # memory) writes and reads only those rows. A traced int32 scalar, so chunks share one compilation.
    row_offset: jax.Array | int = 0
    # One-token decode steps over all rows: "auto" runs kernels_pallas.dense_decode_attention (the cache write
    # and the attention in one launch; per shard under a multi-device mesh) on a GPU with a 16-bit cache, XLA
    # elsewhere; "pallas" always (interpret mode off GPU: tests); "xla" never. On one device the model hands the
    # kernel whole projection rows and it applies RoPE too (``takes_qkv_rows``, ``attend_rows``).
    decode_kernel: str = dataclasses.field(default="auto", metadata=dict(static=True))

    @classmethod
    def create(cls, cfg: GLMConfig, batch: int, max_len: int, dtype, *,
               decode_kernel: str = "auto") -> "DenseKVCache":
        if decode_kernel not in DECODE_KERNELS:
            raise ValueError(f"decode_kernel={decode_kernel!r}; allowed: {DECODE_KERNELS}")
        shape = (batch, cfg.num_kv_heads, max_len, cfg.head_dim)
        zeros = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
        return cls(k=zeros(), v=zeros(), row_offset=jnp.int32(0), decode_kernel=decode_kernel)

    def with_rows(self, row_offset) -> "DenseKVCache":
        return dataclasses.replace(self, row_offset=jnp.asarray(row_offset, jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @staticmethod
    def nbytes(cfg: GLMConfig, batch: int, max_len: int, dtype) -> int:
        return 2 * cfg.num_layers * batch * max_len * cfg.num_kv_heads * cfg.head_dim * jnp.dtype(dtype).itemsize

    def _decode_kernel_on(self, q) -> bool:
        if self.decode_kernel != "auto":
            return self.decode_kernel == "pallas"
        sixteen_bit = jnp.dtype(self.k[0].dtype).itemsize == 2 and jnp.dtype(q.dtype).itemsize == 2
        return jax.default_backend() == "gpu" and sixteen_bit and self.max_len % 16 == 0

    @staticmethod
    def _fused_decode(q, k, v, cache_k, cache_v, positions, scale):
        """The fused kernel, per shard under a multi-device mesh (``sharding.kernels``)."""
        kw = dict(scale=scale, interpret=jax.default_backend() != "gpu")
        if on_one_device():
            return dense_decode_attention(q, k, v, cache_k, cache_v, positions, **kw)
        return sharded_dense_decode_attention(jax.sharding.get_abstract_mesh(), q, k, v, cache_k, cache_v, positions,
                                              **kw)

    def _fused_step_on(self, x) -> bool:
        """x [B, T, ...] is a one-token step over all rows (rows 0..B-1) that the fused kernel takes
        (``decode_kernel``)."""
        return x.shape[1] == 1 and x.shape[0] == self.k[0].shape[0] and self._decode_kernel_on(x)

    def takes_qkv_rows(self, qkv) -> bool:
        """Whether ``attend_rows`` takes this step's projection qkv [B, T, (N + 2K) H]: a one-token step over all
        rows through the fused kernel (``decode_kernel``), on one device (the per-shard kernel takes q, k, v)."""
        return self._fused_step_on(qkv) and on_one_device()

    def attend_rows(self, layer: int, qkv, rope_cos, rope_sin, positions, *, scale: float, digits: int | None = None):
        """``attend``'s fused step from whole rows: qkv [B, N + 2K, H] (the q, k and v heads; bias added, RoPE not
        applied), tables rope_cos / rope_sin [B, H] (``model.rope.rope_tables``), positions [B, 1]. The kernel
        rotates q and k, writes k and v at ``positions`` and attends. -> (out [B, 1, N, H] in qkv's dtype, cache,
        out's ``act_digits.ActDigits`` in the planes layout of group ``digits`` where the kernel writes them, else
        None: ``dense_decode_attention_rows(..., digits=)``)."""
        ck, cv = self.k[layer], self.v[layer]
        digits = digits if jnp.dtype(qkv.dtype) == jnp.dtype(ck.dtype) else None  # those of out in the cache's dtype
        res = dense_decode_attention_rows(qkv.astype(ck.dtype), ck, cv, positions[:, 0], rope_cos, rope_sin,
                                          scale=scale, digits=digits, interpret=jax.default_backend() != "gpu")
        out, k_all, v_all = res[:3]
        return out[:, None].astype(qkv.dtype), self._with_layer(layer, k_all, v_all), res[3] if digits else None

    def attend(self, layer: int, q, k, v, positions, *, scale: float):
        """Writes k, v [B, T, K, H] at ``positions`` [B, T] and attends q [B, T, N, H] over the cache.
        A one-token step over all rows (rows 0..B-1) may run the fused decode kernel (``decode_kernel``)."""
        b = q.shape[0]
        if self._fused_step_on(q):
            out, k_all, v_all = self._fused_decode(q[:, 0], k[:, 0], v[:, 0], self.k[layer], self.v[layer],
                                                   positions[:, 0], scale)
            return out[:, None], self._with_layer(layer, k_all, v_all)
        rows = self.row_offset + jnp.arange(b)[:, None]
        # rows [B, 1] and positions [B, T] index B and S around the K slice: the indexed block is [B, T, K, H].
        k_all = self.k[layer].at[rows, :, positions].set(k.astype(self.k[layer].dtype), mode="drop")
        v_all = self.v[layer].at[rows, :, positions].set(v.astype(self.v[layer].dtype), mode="drop")
        if b != k_all.shape[0]:  # a row chunk: attend over its own rows only
            k_rows = jax.lax.dynamic_slice_in_dim(k_all, self.row_offset, b, axis=0)
            v_rows = jax.lax.dynamic_slice_in_dim(v_all, self.row_offset, b, axis=0)
        else:
            k_rows, v_rows = k_all, v_all
        slots = jnp.arange(self.max_len)
        mask = slots[None, None, :] <= positions[:, :, None]  # [B, T, S]
        out = gqa_attention(q, k_rows.astype(q.dtype), v_rows.astype(q.dtype), mask, scale=scale, kv_layout="bksh")
        return out, self._with_layer(layer, k_all, v_all)

    def _with_layer(self, layer: int, k, v) -> "DenseKVCache":
        """This cache with layer ``layer``'s K and V replaced."""
        return dataclasses.replace(self, k=self.k[:layer] + (k,) + self.k[layer + 1:],
                                   v=self.v[:layer] + (v,) + self.v[layer + 1:])
