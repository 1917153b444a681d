"""Self-attention of a GLM layer: fused q/k/v projection (optional bias), partial RoPE, GQA, output projection."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from ..config import GLMConfig
from .attention_ops import causal_mask, gqa_attention
from .linear import Linear
from .rope import apply_rope


class Attention(nnx.Module):
    def __init__(self, cfg: GLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        std = cfg.initializer_range
        # One [D, (N + 2K) * H] projection instead of three: one weight read per decode step.
        self.qkv_proj = Linear(cfg.hidden_size, cfg.qkv_size, axes=("embed", "qkv"), use_bias=cfg.attention_bias,
                               dtype=dtype, param_dtype=param_dtype, init_std=std, rngs=rngs)
        self.o_proj = Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, axes=("heads", "embed"),
                             dtype=dtype, param_dtype=param_dtype, init_std=std, rngs=rngs)

    def project_qkv(self, x: jax.Array, positions: jax.Array):
        """x: [B, T, D], positions: [B, T] -> q [B, T, N, H], k and v [B, T, K, H] (RoPE applied to q, k)."""
        cfg = self.cfg
        b, t, _ = x.shape
        qkv = self.qkv_proj(x)
        nq, nk = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        q = qkv[..., :nq].reshape(b, t, cfg.num_heads, cfg.head_dim)
        k = qkv[..., nq:nq + nk].reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        v = qkv[..., nq + nk:].reshape(b, t, cfg.num_kv_heads, cfg.head_dim)
        q = apply_rope(q, positions, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
        k = apply_rope(k, positions, rotary_dim=cfg.rotary_dim, theta=cfg.rope_theta)
        return q, k, v

    def __call__(self, x: jax.Array, positions: jax.Array, *, layer: int, cache=None,
                 attention_mask: jax.Array | None = None):
        """x: [B, T, D]; positions: [B, T]; attention_mask: [B, T] (1 = real token) for the cache-free path.

        Returns ``(out [B, T, D], cache)``. Without a cache, attention is causal over the T tokens given;
        with one, ``cache.attend`` writes k/v for this layer and attends over everything cached so far.
        """
        q, k, v = self.project_qkv(x, positions)
        scale = self.cfg.head_dim ** -0.5
        if cache is None:
            t = x.shape[1]
            mask = jnp.broadcast_to(causal_mask(t, t), (x.shape[0], t, t))
            if attention_mask is not None:
                mask = mask & attention_mask.astype(bool)[:, None, :]
            out = gqa_attention(q, k, v, mask, scale=scale)
        else:
            out, cache = cache.attend(layer, q, k, v, positions, scale=scale)
        b, t = x.shape[:2]
        return self.o_proj(out.reshape(b, t, -1)), cache
