"""A GLM-4-9B-shaped layer, quantized, runs a 300-token prefill through the tuned GPU kernels (the Mosaic GPU wgmma
kernels where the H100 table names them at M > 128, with qkv's bias) and matches the same model on the reference
path. This is the path that the session-19 W8A8 kernel failed to compile on with a bias (float32 output)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax import GLMConfig
from autoglm_jax.loading import random_model
from autoglm_jax.model.quantized_linear import quantize_model


@pytest.mark.gpu
@pytest.mark.parametrize("fmt,k_major", [("int8", False), ("int8", "auto"), ("w8a8", False), ("int4", "auto")])
def test_quantized_glm_layer_prefill_matches_the_reference_path(fmt, k_major):
    cfg = GLMConfig.from_preset("glm-4-9b", num_layers=1, vocab_size=256)
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 300)), jnp.int32)
    logits = {}
    for impl in ("auto", "reference"):
        model = random_model(cfg, dtype="bfloat16", seed=1)
        quantize_model(model, fmt, k_major=k_major, impl=impl)
        logits[impl] = np.asarray(model(tokens), np.float32)
    got, want = logits["auto"], logits["reference"]
    assert np.isfinite(got).all()
    assert np.linalg.norm(got - want) <= 3e-2 * np.linalg.norm(want)
