"""The training-memory estimator against XLA's compiled memory_analysis() (AOT, nothing allocated)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from autoglm_jax.config import GLMConfig
from autoglm_jax.train import TrainConfig
from autoglm_jax.train.loop import abstract_train_state, build
from autoglm_jax.train.memory_estimate import compiled_memory, estimate_training_memory

# Small, but with activations a large share of the step (T = 256, V = 4096) so the activation model matters.
CFG = GLMConfig.from_preset("tiny")  # the embedded model's shape


def _compiled(cfg: TrainConfig):
    fwd, tx, step = build(CFG, cfg)
    tokens = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + 1), jnp.int32)
    mask = jax.ShapeDtypeStruct((cfg.batch_size, cfg.seq_len + 1), jnp.float32)
    return compiled_memory(step.lower(abstract_train_state(fwd, tx, 0), tokens, mask).compile())


# Measured gap on this config: none/full/dots_saveable within 10%; save_attention_out overestimated by
# ~18% (the model charges a whole recomputed block while XLA overlaps less; see remat_memory.md).
@pytest.mark.parametrize("policy,tol", [("none", 0.10), ("full", 0.10), ("dots_saveable", 0.10),
                                        ("save_attention_out", 0.25)])
def test_estimate_within_tolerance_of_memory_analysis(policy, tol):
    cfg = TrainConfig(seq_len=256, batch_size=8, remat=policy)
    xla = _compiled(cfg)
    est = estimate_training_memory(CFG, cfg)
    assert xla["alias"] > 0.9 * est.state  # the train state is donated
    assert abs(est.total - xla["total"]) <= tol * xla["total"], (est.as_dict(), xla)


def test_estimate_orders_policies_like_xla():
    sizes = {p: estimate_training_memory(CFG, TrainConfig(seq_len=256, batch_size=8, remat=p)).activations
             for p in ("none", "dots_saveable", "full")}
    assert sizes["none"] > sizes["dots_saveable"] > sizes["full"]
    est = estimate_training_memory(CFG, TrainConfig(seq_len=256, batch_size=8))
    assert est.params == 4 * CFG.num_params() and est.optimizer == 2 * est.params
