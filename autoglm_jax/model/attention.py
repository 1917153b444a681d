"""Self-attention of a GLM layer: fused q/k/v projection (optional bias), partial RoPE, GQA, output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.partition import constrain

from ..config import GLMConfig
from .attention_ops import causal_mask, gqa_attention
from .linear import Linear
from .rope import apply_rope, rope_tables


class Attention(nnx.Module):
    def __init__(self, cfg: GLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        std = cfg.initializer_range
        # One [D, (N + 2K) * H] projection instead of three: one weight read per decode step.
        self.qkv_proj = Linear(cfg.hidden_size, cfg.qkv_size, axes=("embed", "qkv"), use_bias=cfg.attention_bias,
                               dtype=dtype, param_dtype=param_dtype, init_std=std, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, axes=("heads", "embed"),
                             dtype=dtype, param_dtype=param_dtype, init_std=std, rngs=rngs)
        # qkv_proj columns come in this many groups [q_g | k_g | v_g] (1 = the HF order [q | k | v]);
        # sharding/layout.py sets it to the tensor degree so each shard's columns are one group.
        self.qkv_groups = 1

    def split_qkv(self, qkv: jax.Array, positions: jax.Array):
        """qkv: [B, T, (N + 2K) H] (the projection), positions: [B, T] -> q [B, T, N, H], k and v [B, T, K, H]
        (RoPE applied to q, k)."""
        cfg = self.cfg
        b, t, _ = qkv.shape
        g = self.qkv_groups
        qkv = qkv.reshape(b, t, g, cfg.qkv_size // g)  # [B, T, groups, (N + 2K) H / groups]
        nq, nk = cfg.num_heads * cfg.head_dim // g, cfg.num_kv_heads * cfg.head_dim // g
        q = constrain(qkv[..., :nq].reshape(b, t, cfg.num_heads, cfg.head_dim), ("batch", "sequence", "heads", None))
        kv_axes = ("batch", "sequence", "kv_heads", None)
        k = constrain(qkv[..., nq:nq + nk].reshape(b, t, cfg.num_kv_heads, cfg.head_dim), kv_axes)
        v = constrain(qkv[..., nq + nk:].reshape(b, t, cfg.num_kv_heads, cfg.head_dim), kv_axes)
        q = apply_rope(q, positions, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
        k = apply_rope(k, positions, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
        return q, k, v

    def __call__(self, x: jax.Array, positions: jax.Array, *, layer: int, cache=None,
                 attention_mask: jax.Array | None = None, partials: bool = False, x_digits=None):
        """x: [B, T, D]; positions: [B, T]; attention_mask: [B, T] (1 = real token) for the cache-free path.

        Returns ``(out [B, T, D], cache)``; with ``partials`` out may be o_proj's split-K partial sums
        [S, B, T, D] float32 (``Linear``). Without a cache, attention is causal over the T tokens given;
        with one, ``cache.attend`` writes k/v for this layer and attends over everything cached so far, or, for a
        dense cache's fused decode step, ``cache.attend_rows`` takes the projection rows whole and applies RoPE
        in the kernel (the projection then ends in one XLA fusion). x_digits: x's ``act_digits.ActDigits`` from the
        norm before, for a quantized qkv projection (or None).
        """
        qkv = self.qkv_proj(x, digits=x_digits)  # [B, T, (N + 2K) H]
        scale = self.cfg.head_dim ** -0.5
        o_digits = None  # o_proj's input digits, where the attention kernel writes them
        if self._takes_rows(cache, qkv):
            out, cache, o_digits = self._attend_rows(qkv, positions, layer, cache, scale)
        elif cache is not None:
            q, k, v = self.split_qkv(qkv, positions)
            out, cache = cache.attend(layer, q, k, v, positions, scale=scale)
        else:
            q, k, v = self.split_qkv(qkv, positions)
            t = x.shape[1]
            mask = jnp.broadcast_to(causal_mask(t, t), (x.shape[0], t, t))
            if attention_mask is not None:
                mask = mask & attention_mask.astype(bool)[:, None, :]
            out = gqa_attention(q, k, v, mask, scale=scale)
        b, t = x.shape[:2]
        out = constrain(out, ("batch", "sequence", "heads", None))
        return self.o_proj(out.reshape(b, t, -1), partials=partials, digits=o_digits), cache

    def _takes_rows(self, cache, qkv) -> bool:
        """The cache's fused decode step takes this projection whole (HF column order: one group)."""
        takes = getattr(cache, "takes_qkv_rows", None)  # DenseKVCache only
        return takes is not None and self.qkv_groups == 1 and takes(qkv)

    def _attend_rows(self, qkv, positions, layer: int, cache, scale: float):
        """qkv [B, 1, (N + 2K) H] -> (out [B, 1, N, H], cache, out's digits for o_proj or None) through
        ``cache.attend_rows``, asking for the digits o_proj takes from the attention (``digits_layout``)."""
        cfg = self.cfg
        cos, sin = rope_tables(positions[:, 0], head_dim=cfg.head_dim, rotary_dim=cfg.rotary_dim,
                               theta=cfg.rope_theta, dtype=qkv.dtype)
        rows = qkv.reshape(qkv.shape[0], -1, cfg.head_dim)  # [B, N + 2K, H]
        layout = getattr(self.o_proj, "digits_layout", None)
        x = jax.ShapeDtypeStruct((qkv.shape[0], 1, cfg.num_heads * cfg.head_dim), qkv.dtype)
        digits = None if layout is None else layout(x, "attention")
        return cache.attend_rows(layer, rows, cos, sin, positions, scale=scale, digits=digits or None)
