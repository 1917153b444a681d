"""Sharded models equal the single-device model: logits, greedy tokens, parameter bytes, caches, errors.

Runs on 8 virtual CPU devices (tests/conftest.py). float32 everywhere; the sharded sums are reordered,
so logits match to ~1e-5 relative, and greedy tokens exactly.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoglm_jax.config import GLMConfig
from autoglm_jax.generate import GenerationConfig, generate
from autoglm_jax.kv_cache import DenseKVCache
from autoglm_jax.loading import random_model
from sharding import (MeshError, check_model_fits, logical_to_spec, make_mesh, per_device_bytes, shard_model,
                      use_mesh)
from sharding import layout as tp
from sharding.partition import canonical_state
from sharding.rules import UnknownLogicalAxis

# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_sharded_model_matches_single_device[tensor4]',
    'test_sharded_model_matches_single_device[tensor8]',
    'test_fused_decode_kernel_per_shard_matches_single_device[tensor4]',
}


pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (conftest sets 8 CPU devices)")

# N = 8 query heads over K = 2 KV heads, so tensor 4 and 8 exercise the KV-head repetition.
CFG = GLMConfig.from_preset("tiny").replace(num_heads=8, head_dim=32, num_layers=2, vocab_size=1024)
MESHES = {
    "tensor2": dict(tensor=2),
    "tensor4": dict(tensor=4),
    "tensor8": dict(tensor=8),
    "data2xtensor4": dict(data=2, tensor=4),
    "fsdp8": dict(fsdp=8),
}
PROMPTS = [[5, 17, 300, 2, 9, 11, 40], [7, 8, 1000, 3]]


def _ids(batch=4, t=9, seed=0):
    return jnp.asarray(np.random.RandomState(seed).randint(1, CFG.vocab_size, (batch, t)), jnp.int32)


@pytest.fixture(scope="module")
def model():
    return random_model(CFG, dtype="float32", seed=3)


@pytest.fixture(scope="module")
def reference(model):
    ids = _ids()
    logits = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    tokens = generate(model, PROMPTS, GenerationConfig(max_new_tokens=4, eos_token_ids=()))
    return ids, logits, tokens


def _total_bytes(model) -> int:
    return sum(x.nbytes for x in jax.tree.leaves(nnx.state(model)))


@pytest.mark.parametrize("name", sorted(MESHES))
def test_sharded_model_matches_single_device(name, model, reference):
    ids, ref_logits, ref_tokens = reference
    mesh = make_mesh(**MESHES[name])
    sm = shard_model(model, mesh)
    t = MESHES[name].get("tensor", 1)
    assert sm.cfg.num_kv_heads == max(CFG.num_kv_heads, t)
    with use_mesh(mesh):  # activation constraints active
        logits = np.asarray(nnx.jit(lambda m, x: m(x))(sm, ids))
    np.testing.assert_allclose(logits, ref_logits, rtol=1e-5, atol=1e-5 * np.abs(ref_logits).max())
    assert generate(sm, PROMPTS, GenerationConfig(max_new_tokens=4, eos_token_ids=())) == ref_tokens
    # every weight matrix is split over tensor * fsdp: per-device bytes are that fraction of the total
    # (plus the replicated norms; and the repeated KV columns when K < t)
    per_dev = per_device_bytes(nnx.state(sm))
    assert len(per_dev) == len(mesh.devices.flat)
    split = t * MESHES[name].get("fsdp", 1)
    # weight matrices split over tensor x fsdp, biases over tensor, norms replicated; K < t adds repeated KV heads
    expected = 0.0
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model).to_pure_dict())[0]:
        expected += leaf.nbytes / (split if leaf.ndim == 2 else t if path[-1].key == "bias" else 1)
    extra_heads = max(CFG.num_kv_heads, t) - CFG.num_kv_heads
    expected += CFG.num_layers * 2 * CFG.head_dim * extra_heads * 4 * (CFG.hidden_size / split + 1 / t)
    for b in per_dev.values():
        assert b == expected, (b, expected)


def test_sharded_generation_without_mesh_context_and_cache_sharding(model, reference):
    """generate.py's dense path on a tensor-8 model: the cache GSPMD picks has one KV head per device."""
    mesh = make_mesh(tensor=8)
    sm = shard_model(model, mesh)
    from autoglm_jax.generate import _prefill
    from autoglm_jax.model.static_graph import StaticGraph

    graph, state = StaticGraph.split(sm)
    ids = jnp.asarray([[5, 17, 300, 2]], jnp.int32)
    cache = DenseKVCache.create(sm.cfg, 1, 16, jnp.float32)
    pos = jnp.arange(4, dtype=jnp.int32)[None]
    logits, cache = _prefill(graph, state, ids, pos, cache, jnp.asarray([3]))
    k0 = cache.k[0]
    assert k0.shape == (1, 8, 16, CFG.head_dim)  # [B, K', S, H]: K' = 8 (each of the K = 2 heads repeated 4 times)
    assert {tuple(s.data.shape) for s in k0.addressable_shards} == {(1, 1, 16, CFG.head_dim)}
    ref = nnx.jit(lambda m, x: m(x))(model, ids)[:, -1]
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_tp_layout_round_trip_and_quantized_leaves():
    """to_tp_layout then from_tp_layout is the identity; every leaf under the fused modules (incl. int8
    qweight / per-column scale) moves by the same column permutation, so dequantization commutes."""
    cfg = CFG
    rng = np.random.RandomState(0)
    d, c, f = cfg.hidden_size, cfg.qkv_size, cfg.intermediate_size
    tree = {"layers": {0: {"attn": {"qkv_proj": {"qweight": rng.randint(-127, 128, (d, c)).astype(np.int8),
                                                 "scale": rng.rand(c).astype(np.float32)}},
                           "mlp": {"gate_up_proj": {"kernel": rng.randn(d, 2 * f).astype(np.float32)}}}}}
    for t in (2, 4, 8):
        plan = tp.plan(cfg, t)
        out = tp.to_tp_layout(tree, cfg, plan)
        q = out["layers"][0]["attn"]["qkv_proj"]
        deq = np.asarray(q["qweight"]).astype(np.float32) * np.asarray(q["scale"])
        deq_ref = tree["layers"][0]["attn"]["qkv_proj"]["qweight"].astype(np.float32) * \
            tree["layers"][0]["attn"]["qkv_proj"]["scale"]
        np.testing.assert_array_equal(deq, deq_ref[:, tp.qkv_columns(cfg, plan)])
        back = tp.from_tp_layout(out, cfg, plan)
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), back, tree)
        # group g of the layout holds query heads g*N/t.. and exactly the kv head(s) they read
        cols = tp.qkv_columns(cfg, plan).reshape(t, -1)
        g_q = cfg.num_heads // t
        for g in range(t):
            q_heads = sorted(set(cols[g, :g_q * cfg.head_dim] // cfg.head_dim))
            k_heads = sorted(set((cols[g, g_q * cfg.head_dim:] - cfg.num_heads * cfg.head_dim)
                                 // cfg.head_dim % cfg.num_kv_heads))
            assert q_heads == list(range(g * g_q, (g + 1) * g_q))
            assert set(k_heads) == {h // cfg.q_per_kv for h in q_heads}


def test_canonical_state_undoes_the_layout(model):
    sm = shard_model(model, make_mesh(tensor=4))
    tree, cfg = canonical_state(sm)
    assert cfg == model.cfg
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), tree,
                 nnx.state(model).to_pure_dict())


def test_rules_table_fallbacks():
    mesh = {"data": 2, "fsdp": 2, "tensor": 4}
    assert logical_to_spec(("batch", "sequence", "heads", None), (8, 5, 8, 3), mesh) == \
        jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
    # batch 2: (data, fsdp) does not divide, data does
    assert logical_to_spec(("batch", None), (2, 3), mesh) == jax.sharding.PartitionSpec("data")
    # K = 2 KV heads over tensor 4: replicated
    assert logical_to_spec(("batch", "sequence", "kv_heads", None), (2, 5, 2, 3), mesh) == \
        jax.sharding.PartitionSpec("data")
    # a mesh axis is used at most once per array (vocab takes tensor first)
    assert logical_to_spec(("vocab", "mlp"), (8, 8), mesh) == jax.sharding.PartitionSpec("tensor")
    with pytest.raises(UnknownLogicalAxis, match="'hedas' is not in the rules table"):
        logical_to_spec(("hedas",), (8,), mesh)


def test_clear_errors(model):
    with pytest.raises(MeshError, match=r"needs 16 devices; only 8 present"):
        make_mesh(data=2, tensor=8)
    with pytest.raises(MeshError, match="tensor=0 must be a positive integer"):
        make_mesh(tensor=0)
    with pytest.raises(MeshError, match=r"num_heads \(N\)=8 is not a multiple of the tensor degree 3"):
        check_model_fits(CFG, make_mesh(tensor=3))
    bad_mlp = CFG.replace(intermediate_size=690)
    with pytest.raises(MeshError, match=r"intermediate_size \(F\)=690 is not a multiple of the tensor degree 4"):
        check_model_fits(bad_mlp, make_mesh(tensor=4))
    with pytest.raises(MeshError, match=r"num_kv_heads \(K\)=3 and tensor degree 8: one must divide the other"):
        check_model_fits(CFG.replace(num_heads=24, num_kv_heads=3, vocab_size=1024 * 3,
                                     intermediate_size=96 * 8), make_mesh(tensor=8))
    with pytest.raises(MeshError):
        shard_model(model, make_mesh(tensor=3))  # raised before any device work
    with pytest.raises(ValueError, match="already in a tensor-parallel layout"):
        shard_model(shard_model(model, make_mesh(tensor=2)), make_mesh(tensor=2))


def test_generation_runs_the_model_under_its_mesh(model, monkeypatch):
    """decode_stream activates the sharded model's mesh around each jitted call (else every activation
    constraint is a no-op and XLA's propagation alone lays out the residual stream)."""
    import importlib

    gen = importlib.import_module("autoglm_jax.generate")  # the module (the package re-exports a function so named)
    seen = []
    real = gen._decode

    def spy(*args, **kw):
        seen.append(dict(jax.sharding.get_abstract_mesh().shape))
        return real(*args, **kw)

    monkeypatch.setattr(gen, "_decode", spy)
    sm = shard_model(model, make_mesh(tensor=2))
    generate(sm, PROMPTS, GenerationConfig(max_new_tokens=3, eos_token_ids=()))
    assert seen and all(s.get("tensor") == 2 for s in seen)
    assert jax.sharding.get_abstract_mesh().empty  # nothing left active between or after the calls
    seen.clear()
    generate(model, PROMPTS, GenerationConfig(max_new_tokens=3, eos_token_ids=()))
    assert seen and all(s == {} for s in seen)  # one device: no mesh


def test_tensor_parallel_decode_step_has_two_all_reduces_per_layer(model):
    """The compiled TP decode step: one all-reduce after o_proj and one after down_proj per layer, one for
    the embedding lookup at most, and no all-gather of a parameter-sized array (the embedding table
    split along V was once all-gathered whole every step on GPU; it is split along D now)."""
    import re

    from autoglm_jax.generate import decode_hlo
    from sharding import cache_shardings

    mesh = make_mesh(tensor=2)
    sm = shard_model(model, mesh)
    make = lambda: DenseKVCache.create(sm.cfg, 2, 64, jnp.float32)
    cache = jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), mesh))()
    hlo = decode_hlo(sm, cache, position=5)
    reduces = re.findall(r"= \S+ all-reduce(?:-start)?\(", hlo)
    assert 2 * CFG.num_layers <= len(reduces) <= 2 * CFG.num_layers + 1, len(reduces)
    table = CFG.vocab_size * CFG.hidden_size
    for shape in re.findall(r"= \(?\w+\[([\d,]+)\][^=]*all-gather(?:-start)?\(", hlo):
        assert np.prod([int(d) for d in shape.split(",")]) < table // 4, shape


@pytest.mark.parametrize("name", ["tensor2", "tensor4", "data2xtensor4"])
def test_fused_decode_kernel_per_shard_matches_single_device(name, model, reference, monkeypatch):
    """DenseKVCache(decode_kernel="pallas") under a mesh runs the fused decode kernel per shard
    (sharding.kernels.sharded_dense_decode_attention; interpret mode here): the single-device greedy tokens."""
    import autoglm_jax.kv_cache as kv_cache
    from autoglm_jax.generate import decode_stream
    from sharding import cache_shardings

    traced = []
    real = kv_cache.sharded_dense_decode_attention
    monkeypatch.setattr(kv_cache, "sharded_dense_decode_attention",
                        lambda mesh, *a, **kw: traced.append(dict(mesh.shape)) or real(mesh, *a, **kw))

    mesh = make_mesh(**MESHES[name])
    sm = shard_model(model, mesh)
    make = lambda: DenseKVCache.create(sm.cfg, len(PROMPTS), 128, jnp.float32, decode_kernel="pallas")
    cache = jax.jit(make, out_shardings=cache_shardings(jax.eval_shape(make), mesh))()
    steps = decode_stream(sm, PROMPTS, GenerationConfig(max_new_tokens=4, eos_token_ids=()), cache=cache)
    tokens = np.stack([np.asarray(t) for t in steps], axis=1).tolist()
    assert tokens == reference[2]
    # every traced decode step (a first and a steady-state one) ran it in each layer
    assert traced and len(traced) % CFG.num_layers == 0 and traced[0]["tensor"] == MESHES[name]["tensor"]


def test_quantized_layers_run_kernels_per_shard_on_a_gpu_mesh(monkeypatch):
    """On GPUs under a multi-device mesh a QuantizedLinear with a kernel impl runs the kernel per shard
    (``shard_plan``); where no per-shard kernel fits (int4 row-parallel, K / t not a multiple of the group) it takes
    an XLA path that XLA's partitioner splits (``xla_split`` for int8, ``xla`` otherwise); an explicit XLA impl, or
    one device, is left as set."""
    from autoglm_jax.model import quantized_linear as ql
    from autoglm_jax.model.linear import Linear

    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    col = Linear(256, 128, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    row = Linear(384, 128, axes=("mlp", "embed"), rngs=nnx.Rngs(0))
    int8, int4 = (ql.QuantizedLinear.from_linear(col, fmt, k_major=True) for fmt in ("int8", "int4"))
    int4_row = ql.QuantizedLinear.from_linear(row, "int4", group=64)  # 6 groups: 3 a device at t=2, not at t=4
    assert [q.shard_plan() for q in (int8, int4, int4_row)] == [None] * 3  # one device
    with use_mesh(make_mesh(tensor=2)):
        assert [q.shard_plan() for q in (int8, int4, int4_row)] == ["column", "column", "row"]
        assert int8.path() == int4.path() == int4_row.path() == "auto"
    with use_mesh(make_mesh(tensor=4)):
        assert int4_row.shard_plan() is None and int4_row.path() == "xla"
        int8_row = ql.QuantizedLinear.from_linear(Linear(384, 128, axes=("mlp", "embed"), rngs=nnx.Rngs(0)), "int8")
        assert int8_row.shard_plan() == "row"
        int8.impl = "xla_split"
        assert int8.shard_plan() is None and int8.path() == "xla_split"
