"""One GLM decoder layer: pre-norm attention and MLP with residuals (glm4 adds a post-norm to each)."""

from __future__ import annotations

import jax
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from ..config import GLMConfig
from .attention import Attention
from .mlp import MLP
from .norm import RMSNorm
from .remat import ATTENTION_OUT, MLP_OUT


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: GLMConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        norm = lambda: RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.input_norm = norm()
        self.attn = Attention(cfg, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attn_norm = norm() if cfg.post_norms else None
        self.mlp_norm = norm()
        self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                       init_std=cfg.initializer_range, rngs=rngs)
        self.post_mlp_norm = norm() if cfg.post_norms else None

    def __call__(self, h: jax.Array, positions: jax.Array, *, layer: int, cache=None, attention_mask=None):
        """h: [B, T, D] -> ([B, T, D], cache)."""
        m, h, cache = self.step(h, None, positions, layer=layer, cache=cache, attention_mask=attention_mask)
        return h + m, cache

    def step(self, x: jax.Array, residual: jax.Array | None, positions: jax.Array, *, layer: int, cache=None,
             attention_mask=None, partials: bool = False):
        """The layer on a residual stream whose last add is pending: its input is ``x + residual`` (residual
        None: x itself). Returns ``(m, h, cache)``: the output is ``h + m``, left to the next norm's fused add.
        With ``partials``, x and m may be split-K partial sums [S, B, T, D] (``Linear``; not where a post-norm
        needs the whole output first). Each norm writes the digits of its output too where the quantized projection
        after it would compute them itself (``RMSNorm.add_norm_digits``)."""
        x, h, digits = self.input_norm.add_norm_digits(x, residual, self.attn.qkv_proj)
        a, cache = self.attn(x, positions, layer=layer, cache=cache, attention_mask=attention_mask,
                             partials=partials and self.post_attn_norm is None, x_digits=digits)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x, h, digits = self.mlp_norm.add_norm_digits(checkpoint_name(a, ATTENTION_OUT), h, self.mlp.gate_up_proj)
        m = self.mlp(x, partials=partials and self.post_mlp_norm is None, x_digits=digits)
        if self.post_mlp_norm is not None:
            m = self.post_mlp_norm(m)
        return checkpoint_name(m, MLP_OUT), h, cache
