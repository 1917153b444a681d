"""The GLM-4 causal language model: embedding, decoder layers, final norm, LM head.

Layers are held as a list and unrolled under ``jit``: every decode step reads each weight exactly once
(a ``scan`` over stacked weights made XLA copy each layer's slice, 3x the memory traffic).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sharding.partition import constrain

from ..config import GLMConfig
from .decoder_layer import DecoderLayer
from .linear import Linear
from .norm import RMSNorm
from .remat import remat_policy

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


def resolve_dtype(dtype) -> jnp.dtype:
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"unknown dtype {dtype!r}; allowed: {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    return jnp.dtype(dtype)


class GLMForCausalLM(nnx.Module):
    """``model(input_ids [B, T]) -> logits [B, T, V]`` (float32).

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype of parameters; ``remat`` names a
    gradient-checkpointing policy (see ``remat.REMAT_POLICIES``) applied per layer.
    """

    def __init__(self, cfg: GLMConfig, *, dtype="float32", param_dtype=None, remat: str = "none",
                 rngs: nnx.Rngs | None = None):
        self.cfg = cfg
        self.dtype = resolve_dtype(dtype)
        self.param_dtype = resolve_dtype(param_dtype if param_dtype is not None else dtype)
        remat_policy(remat)  # validates the name
        self.remat = remat
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        key = rngs.params()
        self.embed = nnx.Param(
            cfg.initializer_range * jax.random.normal(key, (cfg.vocab_size, cfg.hidden_size), self.param_dtype),
            logical_axes=("table_vocab", "table_embed"))
        self.layers = nnx.List([DecoderLayer(cfg, rngs=rngs, **kw) for _ in range(cfg.num_layers)])
        self.final_norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, axes=("embed", "vocab"), init_std=cfg.initializer_range,
            rngs=rngs, **kw)

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array | None = None, *, cache=None,
                      attention_mask: jax.Array | None = None):
        """input_ids: [B, T] int; positions: [B, T] (default 0..T-1) -> (h [B, T, D] after the final norm, cache)."""
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_ids.shape[1], dtype=jnp.int32), input_ids.shape)
        h = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)
        axes = ("batch", "sequence", "activation_embed")
        h = constrain(h, axes)
        if self.remat != "none" and cache is None:  # training: each layer's output whole, one remat unit a layer
            for i, layer in enumerate(self.layers):
                step = nnx.remat(lambda lyr, x, pos, m, i=i: lyr(x, pos, layer=i, attention_mask=m)[0],
                                 policy=remat_policy(self.remat))
                h = constrain(step(layer, h, positions, attention_mask), axes)
            return self.final_norm(h), cache
        # Each layer leaves its last residual add to the next norm (one fused add + norm launch on the GPU), which
        # also sums the split-K partials that o_proj / down_proj may hand it (one device only: no constraint).
        residual = None
        for i, layer in enumerate(self.layers):
            h, residual, cache = layer.step(h, residual, positions, layer=i, cache=cache,
                                            attention_mask=attention_mask, partials=True)
            h = constrain(h, axes) if h.ndim == residual.ndim else h
            residual = constrain(residual, axes)
        return self.final_norm.add_and_norm(h, residual)[0], cache

    def logits(self, h: jax.Array) -> jax.Array:
        """h: [..., D] -> float32 logits [..., V]."""
        if self.lm_head is None:
            out = jnp.einsum("...d,vd->...v", h, self.embed[...].astype(self.dtype))
        else:
            out = self.lm_head(h)
        return out.astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, positions: jax.Array | None = None, *, cache=None,
                 attention_mask: jax.Array | None = None):
        """Returns logits [B, T, V]; with a ``cache``, returns ``(logits, cache)``."""
        h, new_cache = self.hidden_states(input_ids, positions, cache=cache, attention_mask=attention_mask)
        logits = self.logits(h)
        return logits if cache is None else (logits, new_cache)
