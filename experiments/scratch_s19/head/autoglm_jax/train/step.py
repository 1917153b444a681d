"""Masked next-token loss and the jitted train step (donated state, gradient accumulation)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax

from .config import TrainConfig
from .scanned import ScannedGLM
from .state import TrainState


def loss_terms(fwd: ScannedGLM, params: dict, tokens: jax.Array, mask: jax.Array):
    """tokens, mask: [B, T + 1] -> (sum of masked next-token NLL, number of counted targets), float32.

    Position t predicts token t + 1; ``mask[:, t + 1]`` (1 = count, 0 = ignore, e.g. padding) weights it.
    """
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    weights = mask[:, 1:].astype(jnp.float32)
    logits = fwd(params, inputs)  # [B, T, V] float32
    logz = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - target_logit) * weights), jnp.sum(weights)


_global_norm = getattr(getattr(optax, "tree", None), "norm", None) or optax.global_norm


def _grads(fwd, params, tokens, mask):
    (total, count), grads = jax.value_and_grad(lambda p: loss_terms(fwd, p, tokens, mask), has_aux=True)(params)
    return total, count, grads


def train_step(fwd: ScannedGLM, tx: optax.GradientTransformation, cfg: TrainConfig, state: TrainState,
               tokens: jax.Array, mask: jax.Array):
    """One optimizer step on a global batch tokens, mask [B, T + 1] -> (new state, metrics).

    With ``grad_accum_steps = A`` the batch is cut into A microbatches of B / A rows whose summed losses and
    gradients are accumulated in float32, then divided by the total target count: the same update as one
    batch of B rows, with the activation memory of B / A rows.
    """
    a = cfg.grad_accum_steps
    if a == 1:
        total, count, grads = _grads(fwd, state.params, tokens, mask)
    else:
        micro_tokens = tokens.reshape(a, -1, tokens.shape[-1])
        micro_mask = mask.reshape(a, -1, mask.shape[-1])

        def body(carry, xs):
            total, count, grads = carry
            t, c, g = _grads(fwd, state.params, *xs)
            return (total + t, count + c, jax.tree.map(jnp.add, grads, g)), None

        zeros = jax.tree.map(jnp.zeros_like, state.params)
        (total, count, grads), _ = jax.lax.scan(body, (jnp.zeros(()), jnp.zeros(()), zeros),
                                                (micro_tokens, micro_mask))
    denom = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / denom, grads)
    grad_norm = _global_norm(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    rng = jax.random.key_data(jax.random.split(jax.random.wrap_key_data(state.rng))[0])
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              data_position=state.data_position + 1, rng=rng)
    return new_state, {"loss": total / denom, "tokens": count, "grad_norm": grad_norm}


def make_train_step(fwd: ScannedGLM, tx: optax.GradientTransformation, cfg: TrainConfig):
    """``step(state, tokens, mask) -> (state, metrics)``, jitted, with the input state donated."""
    return jax.jit(functools.partial(train_step, fwd, tx, cfg), donate_argnums=(0,))


def make_eval_step(fwd: ScannedGLM):
    """``eval(params, tokens, mask) -> (sum NLL, count)``, jitted."""
    return jax.jit(functools.partial(loss_terms, fwd))
