"""Training loop: loss goes down, exact resume, accumulation, loss masking, export, config errors."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from autoglm_jax.checkpoint.convert import save_pretrained
from autoglm_jax.config import GLMConfig
from autoglm_jax.loading import from_pretrained
from autoglm_jax.train import (ScannedGLM, TokenBatches, TrainConfig, TrainConfigError, eval_batches,
                               latest_checkpoint, train)
from autoglm_jax.train.loop import build
from autoglm_jax.train.state import init_train_state, list_checkpoints
from autoglm_jax.train.step import loss_terms

CFG = GLMConfig.from_preset("tiny", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                            num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
STREAM = np.random.default_rng(0).integers(1, CFG.vocab_size, 4000).astype(np.int32)


def _cfg(**kw):
    base = dict(seq_len=16, batch_size=4, total_steps=12, warmup_steps=1, learning_rate=1e-2, log_every=1,
                seed=3)
    return TrainConfig(**{**base, **kw})


def test_loss_decreases_on_a_fixed_batch():
    fwd, tx, step = build(CFG, _cfg())
    data = TokenBatches(STREAM, seq_len=16, batch_size=4, seed=0)
    tokens, mask = data.batch(0)
    state = init_train_state(fwd.init_params(0), tx, 0)
    losses = []
    for _ in range(12):
        state, m = step(state, tokens, mask)
        losses.append(float(m["loss"]))
    assert losses[0] > np.log(CFG.vocab_size) - 0.5  # starts near uniform
    assert losses[-1] < losses[0] - 1.0, losses


def test_resume_gives_the_same_next_losses_as_uninterrupted(tmp_path):
    cfg = _cfg(checkpoint_every=2)
    data = TokenBatches(STREAM, seq_len=16, batch_size=4, seed=0)
    full = train(CFG, cfg, data, progress=False, checkpoint_dir=tmp_path / "a", stop_at_step=6)
    part = train(CFG, cfg, data, progress=False, checkpoint_dir=tmp_path / "b", stop_at_step=3)
    assert part.resumed_from is None and int(part.state.step) == 3
    assert latest_checkpoint(tmp_path / "b").name == "step_00000003"
    rest = train(CFG, cfg, data, progress=False, checkpoint_dir=tmp_path / "b", metrics_path=tmp_path / "m.jsonl",
                 stop_at_step=6)
    assert rest.resumed_from.endswith("step_00000003")
    want = {h["step"]: h["loss"] for h in full.history}
    got = {h["step"]: h["loss"] for h in rest.history}
    assert sorted(got) == [4, 5, 6]
    for s in got:
        assert abs(got[s] - want[s]) <= 1e-6, (s, got[s], want[s])
    for a, b in zip(jax.tree.leaves(full.state), jax.tree.leaves(rest.state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4, 5, 6] and all(r["tokens_per_s"] > 0 for r in rows)
    assert len(list_checkpoints(tmp_path / "b")) <= cfg.keep_checkpoints
    assert not [p for p in (tmp_path / "b").iterdir() if "partial" in p.name]


def test_restore_into_a_different_setup_is_a_clear_error(tmp_path):
    data = TokenBatches(STREAM, seq_len=16, batch_size=4, seed=0)
    train(CFG, _cfg(), data, progress=False, checkpoint_dir=tmp_path, stop_at_step=1)
    from autoglm_jax.checkpoint.safetensors_io import CheckpointError
    with pytest.raises(CheckpointError, match="does not match"):
        train(CFG.replace(intermediate_size=64), _cfg(), data, progress=False, checkpoint_dir=tmp_path)


def test_gradient_accumulation_matches_one_big_batch():
    data = TokenBatches(STREAM, seq_len=16, batch_size=4, seed=0)
    tokens, mask = data.batch(0)
    mask = mask.copy()
    mask[0, 5:] = 0.0  # uneven target counts across microbatches
    out = {}
    for accum in (1, 2):
        fwd, tx, step = build(CFG, _cfg(grad_accum_steps=accum))
        state = init_train_state(fwd.init_params(0), tx, 0)
        state, m = step(state, tokens, mask)
        out[accum] = (float(m["loss"]), state.params)
    for accum in (2,):
        assert abs(out[accum][0] - out[1][0]) < 1e-5
        for a, b in zip(jax.tree.leaves(out[accum][1]), jax.tree.leaves(out[1][1])):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_loss_masking_ignores_masked_targets():
    fwd = ScannedGLM.create(CFG)
    params = fwd.init_params(1)
    rng = np.random.default_rng(2)
    tokens = rng.integers(0, CFG.vocab_size, (2, 9)).astype(np.int32)
    mask = np.ones((2, 9), np.float32)
    mask[1, 4:] = 0.0
    total, count = loss_terms(fwd, params, jnp.asarray(tokens), jnp.asarray(mask))
    assert float(count) == 8 + 3
    changed = tokens.copy()
    changed[1, 5:] = (changed[1, 5:] + 7) % CFG.vocab_size  # only masked targets (and later context) change
    total2, _ = loss_terms(fwd, params, jnp.asarray(changed), jnp.asarray(mask))
    np.testing.assert_allclose(float(total2), float(total), rtol=1e-6)
    logits = np.asarray(fwd(params, jnp.asarray(tokens[:, :-1])), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
    nll = -np.take_along_axis(logp, tokens[:, 1:, None], -1)[..., 0]
    np.testing.assert_allclose(float(total), (nll * mask[:, 1:]).sum(), rtol=1e-5)


def test_eval_batches_count_every_target_once():
    stream = np.arange(1, 40, dtype=np.int32)
    n = sum(float(m.sum()) for _, m in eval_batches(stream, seq_len=8, batch_size=2))
    assert n == len(stream) - 1


def test_trained_model_saves_and_loads_with_pretrained_api(tmp_path):
    data = TokenBatches(STREAM, seq_len=16, batch_size=4, seed=0)
    res = train(CFG, _cfg(), data, progress=False, stop_at_step=2)
    model = res.model()
    save_pretrained(model, tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m", progress=False)
    tokens = jnp.asarray(STREAM[:20][None])
    want = res.fwd(res.state.params, tokens)
    np.testing.assert_allclose(np.asarray(loaded(tokens)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_bad_configs_are_clear_errors():
    with pytest.raises(TrainConfigError, match="batch_size=6 is not divisible by grad_accum_steps=4"):
        TrainConfig(batch_size=6, grad_accum_steps=4)
    with pytest.raises(TrainConfigError, match="unknown remat policy 'most'.*allowed"):
        TrainConfig(remat="most")
    with pytest.raises(TrainConfigError, match="warmup_steps"):
        TrainConfig(total_steps=10, warmup_steps=20)
    with pytest.raises(TrainConfigError, match="seq_len"):
        TrainConfig(seq_len=0)
    data = TokenBatches(STREAM, seq_len=8, batch_size=4, seed=0)
    with pytest.raises(TrainConfigError, match="data gives batches"):
        train(CFG, _cfg(), data, progress=False)
