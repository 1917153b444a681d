"""Shared by the engine and AsyncLLM tests: a small random model, prompts, greedy params, dense reference."""

from __future__ import annotations

import numpy as np
from flax import nnx

from autoglm_jax import GLMConfig, GLMForCausalLM
from autoglm_jax.engine import SamplingParams
from autoglm_jax.generate import GenerationConfig, generate

CFG = GLMConfig.from_preset("tiny").replace(num_layers=2)


def make_model():
    return GLMForCausalLM(CFG, rngs=nnx.Rngs(0))


def random_prompts(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(1, CFG.vocab_size, n)] for n in lengths]


def greedy(n):
    return SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)


def dense(model, prompts, n):
    return generate(model, prompts, GenerationConfig(max_new_tokens=n, eos_token_ids=()))
