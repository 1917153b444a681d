"""Remat policies on the scanned layer stack: same gradients as no remat; offload detection; bad names."""

from __future__ import annotations

import importlib
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.config import GLMConfig
from autoglm_jax.model import GLMForCausalLM
from autoglm_jax.model.remat import (REMAT_POLICIES, RematUnsupportedError, check_remat_supported,
                                     offload_supported, remat_policy, resolve_remat)
from autoglm_jax.train.scanned import ScannedGLM, params_from_model, stack_layers, unstack_layers
from autoglm_jax.train.step import loss_terms

CFG = GLMConfig.from_preset("tiny", vocab_size=96, hidden_size=32, intermediate_size=40, num_layers=3,
                            num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64)
CFG_POST = CFG.replace(model_type="glm4", post_norms=True)


def _batch(seed=1, b=2, t=12):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CFG.vocab_size, (b, t + 1)).astype(np.int32)
    mask = (rng.random((b, t + 1)) > 0.2).astype(np.float32)
    return jnp.asarray(tokens), jnp.asarray(mask)


def _grads(cfg, policy, params, tokens, mask):
    fwd = ScannedGLM.create(cfg, remat=policy)
    f = jax.jit(jax.grad(lambda p: loss_terms(fwd, p, tokens, mask)[0]))
    return f(params)


@pytest.mark.parametrize("cfg", [CFG, CFG_POST], ids=["glm", "glm4"])
def test_scanned_forward_matches_serving_model(cfg):
    model = GLMForCausalLM(cfg, rngs=nnx.Rngs(3))
    tokens, _ = _batch()
    want = model(tokens)
    got = ScannedGLM.create(cfg)(params_from_model(model), tokens)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_stack_unstack_roundtrip_is_exact():
    pure = nnx.state(GLMForCausalLM(CFG, rngs=nnx.Rngs(5))).to_pure_dict()
    back = unstack_layers(stack_layers(pure))
    assert set(back["layers"]) == set(range(CFG.num_layers))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, pure)
    stacked = stack_layers(pure)
    assert stacked["layers"]["attn"]["qkv_proj"]["kernel"].shape == (CFG.num_layers, CFG.hidden_size, CFG.qkv_size)


@pytest.fixture(scope="module")
def reference():
    """(params, tokens, mask, gradients without remat), computed once for the policy tests."""
    params = ScannedGLM.create(CFG).init_params(7)
    tokens, mask = _batch()
    return params, tokens, mask, _grads(CFG, "none", params, tokens, mask)


@pytest.mark.parametrize("policy", ["full", "dots_saveable", "save_attention_out"])
def test_gradients_equal_no_remat(policy, reference):
    params, tokens, mask, want = reference
    got = _grads(CFG, policy, params, tokens, mask)
    flat_w, flat_g = jax.tree.leaves(want), jax.tree.leaves(got)
    assert len(flat_w) == len(flat_g) and all(float(jnp.abs(w).max()) > 0 for w in flat_w)
    for w, g in zip(flat_w, flat_g):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


@pytest.mark.gpu
def test_offload_gradients_equal_no_remat_on_gpu(reference):
    """Both sides with full float32 matmuls: the GPU's default precision rounds float32 products to TF32, and
    remat changes which products run, so the two would differ by TF32 rounding, not by the policy."""
    params, tokens, mask, _ = reference
    check_remat_supported("offload")
    with jax.default_matmul_precision("highest"):
        want = _grads(CFG, "none", params, tokens, mask)
        got = _grads(CFG, "offload", params, tokens, mask)
    for w, g in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-5, atol=1e-7)


def test_offload_on_cpu_is_refused_clearly_or_falls_back_with_warning():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU backend's answer")
    ok, why = offload_supported()
    assert not ok and "cpu" in why
    with pytest.raises(RematUnsupportedError, match="offload.*not available.*save_attention_out"):
        check_remat_supported("offload")
    with pytest.raises(RematUnsupportedError):
        resolve_remat("offload")
    with pytest.warns(RuntimeWarning, match="Falling back to 'save_attention_out'"):
        assert resolve_remat("offload", fallback=True) == "save_attention_out"
    for name in ("none", "full", "dots_saveable", "save_attention_out"):
        assert resolve_remat(name) == name


def test_train_build_refuses_offload_on_cpu_before_compiling():
    if jax.default_backend() != "cpu":
        pytest.skip("checks the CPU backend's answer")
    from autoglm_jax.train.config import TrainConfig
    from autoglm_jax.train.loop import build
    with pytest.raises(RematUnsupportedError, match="offload"):
        build(CFG, TrainConfig(seq_len=8, batch_size=2, remat="offload"))


def test_unknown_policy_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown remat policy 'everything'.*allowed"):
        remat_policy("everything")
    with pytest.raises(ValueError, match="unknown remat policy"):
        ScannedGLM.create(CFG, remat="dots")
    assert REMAT_POLICIES == ("none", "full", "dots_saveable", "save_attention_out", "offload")


def _not_in_this_process(*args, **kwargs):
    raise AssertionError("measured in the benchmark's own process; each step must run in a fresh worker")


@pytest.mark.slow  # spawns a fresh JAX worker per measured step / policy: 20-50 s on CI's two cores
def test_remat_benchmark_measures_each_step_in_a_fresh_worker(monkeypatch):
    """experiments/remat_memory.py --gpu measures each (policy, seq) in its own process, so the peak it reports
    is that step's; a step that fails there is a gpu_error, not a crash of the benchmark."""
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1]))
    bench = importlib.import_module("experiments.remat_memory")
    monkeypatch.setattr(bench, "measure_gpu", _not_in_this_process)
    got = bench.measure_in_worker("tiny", "full", 16)
    assert "gpu_error" not in got and got["gpu_step_s"] > 0, got
    if jax.default_backend() == "cpu":
        assert got["gpu_peak_bytes"] is None  # no memory statistics on CPU
    else:
        assert got["gpu_peak_bytes"] >= got["gpu_bytes_in_use_before"] > 0
    bad = bench.measure_in_worker("tiny", "dots", 16)
    assert set(bad) == {"gpu_error"} and "unknown remat policy 'dots'" in bad["gpu_error"]
