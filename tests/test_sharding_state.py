"""Sharded state: Orbax save/restore across meshes, HF straight into a sharded layout, an FSDP training step
equal to the single-device step, and the paged-attention kernel per shard (shard_map)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from autoglm_jax.config import GLMConfig
from autoglm_jax.loading import from_pretrained, random_model
from sharding import (batch_sharding, from_pretrained_sharded, load_hf_sharded, make_mesh, param_shardings,
                      restore_sharded, save_sharded, shard_model, shardings_like)
from sharding.partition import canonical_state

# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_k_major_int8_sharded_logits[tensor8-xla_split]',
    'test_quantized_model_tensor_parallel[int8-4-False]',
}


pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (conftest sets 8 CPU devices)")

CFG = GLMConfig.from_preset("tiny").replace(num_heads=8, head_dim=32, num_layers=1, vocab_size=1024)


def _pure(model):
    return jax.tree.map(np.asarray, nnx.state(model).to_pure_dict())


def _assert_trees_equal(a, b):
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def test_sharded_save_restore_onto_other_meshes(tmp_path):
    model = random_model(CFG, dtype="float32", seed=5)
    sm = shard_model(model, make_mesh(tensor=4))
    path = save_sharded(sm, tmp_path / "ckpt")
    # canonical layout on disk: loads as a plain (unsharded) model too
    _assert_trees_equal(_pure(from_pretrained(path, progress=False)), _pure(model))
    for kw in (dict(fsdp=2, tensor=2), dict(tensor=8)):
        mesh = make_mesh(**kw)
        restored = (restore_sharded if kw.get("fsdp") else from_pretrained_sharded)(path, mesh)
        qkv = restored.layers[0].attn.qkv_proj.kernel[...]
        assert qkv.sharding.mesh == mesh and qkv.sharding.spec == P("fsdp" if "fsdp" in kw else None, "tensor")
        tree, cfg = canonical_state(restored)
        assert cfg == CFG
        _assert_trees_equal(tree, _pure(model))


def test_hf_checkpoint_straight_into_sharded_layout(tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from .hf_fixtures import make_hf_model, save_hf

    hf_dir = save_hf(make_hf_model(vocab=256, heads=8, kv_heads=2, head_dim=8, inter=96), tmp_path / "hf")
    single = from_pretrained(hf_dir, dtype="float32", progress=False)
    mesh = make_mesh(data=2, tensor=4)
    sm = load_hf_sharded(hf_dir, mesh, dtype="float32")
    emb = sm.embed[...]
    # the table [V=256, D=64] is split along D (rules.py: table_embed), 4 ways
    assert emb.sharding.spec == P(None, "tensor") and {s.data.shape for s in emb.addressable_shards} == {(256, 16)}
    ids = jnp.asarray(np.random.RandomState(1).randint(0, 256, (2, 6)), jnp.int32)
    ref = nnx.jit(lambda m, x: m(x))(single, ids)
    out = nnx.jit(lambda m, x: m(x))(sm, ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)


def _loss(graphdef, params, ids):
    logits = nnx.merge(graphdef, params)(ids[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def test_fsdp_training_step_equals_single_device():
    model = random_model(CFG, dtype="float32", seed=7, remat="full")
    graphdef, state = nnx.split(model)
    params = state.to_pure_dict()
    opt = optax.adamw(1e-2, eps=1e-4)  # eps >> grad reordering noise, so Adam's 1/sqrt(v) cannot amplify it
    ids = jnp.asarray(np.random.RandomState(2).randint(0, CFG.vocab_size, (8, 12)), jnp.int32)

    def step(params, opt_state, ids):
        loss, grads = jax.value_and_grad(lambda p: _loss(graphdef, p, ids))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss, grads

    ref_params, _, ref_loss, ref_grads = jax.jit(step)(params, opt.init(params), ids)

    mesh = make_mesh(data=2, fsdp=4)
    p_sh = param_shardings(model, mesh)
    o_sh = shardings_like(jax.eval_shape(opt.init, params), p_sh, mesh)
    kernel_sh = p_sh["layers"][0]["mlp"]["down_proj"]["kernel"]
    assert kernel_sh.spec == P(None, "fsdp")  # [F, D]: D over fsdp
    assert o_sh[0].mu["layers"][0]["mlp"]["down_proj"]["kernel"] == kernel_sh
    s_params = jax.device_put(params, p_sh)
    s_opt = jax.jit(opt.init, out_shardings=o_sh)(s_params)
    b_sh = batch_sharding(mesh, ids.shape)
    assert b_sh.spec == P(("data", "fsdp"))
    rep = NamedSharding(mesh, P())
    new_params, new_opt, loss, grads = jax.jit(step, in_shardings=(p_sh, o_sh, b_sh),
                                               out_shardings=(p_sh, o_sh, rep, p_sh))(
        s_params, s_opt, jax.device_put(ids, b_sh))
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    # per-device parameter bytes: the weight matrices are 1/4 (fsdp) of the total
    down = new_params["layers"][0]["mlp"]["down_proj"]["kernel"]
    assert {s.data.shape for s in down.addressable_shards} == {(CFG.intermediate_size, CFG.hidden_size // 4)}
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4,
                                                         atol=1e-5 * np.abs(np.asarray(b)).max()), grads, ref_grads)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5),
                 new_params, ref_params)


def test_paged_attention_per_shard_matches_unsharded():
    from kernels_pallas.paged_attention import paged_attention_reference
    from sharding.kernels import sharded_paged_attention

    rng = np.random.RandomState(0)
    b, n, k, h, pages, page_size, max_pages = 3, 8, 4, 16, 12, 4, 3
    q = jnp.asarray(rng.randn(b, n, h), jnp.float32)
    kp = jnp.asarray(rng.randn(k, pages, page_size, h), jnp.float32)
    vp = jnp.asarray(rng.randn(k, pages, page_size, h), jnp.float32)
    lengths = jnp.asarray([5, 12, 1], jnp.int32)
    table = jnp.asarray(rng.permutation(pages)[:b * max_pages].reshape(b, max_pages), jnp.int32)
    ref = paged_attention_reference(q, kp, vp, lengths, table)
    mesh = make_mesh(tensor=4)
    out = sharded_paged_attention(mesh, q, kp, vp, lengths, table, backend="reference")
    assert out.sharding.spec == P(None, "tensor", None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
    # the Pallas kernel itself (interpreted on CPU), one launch per shard
    out_k = sharded_paged_attention(make_mesh(tensor=2), q, kp, vp, lengths, table, interpret=True)
    np.testing.assert_allclose(np.asarray(out_k), np.asarray(ref), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="multiples of the tensor degree 8"):
        sharded_paged_attention(make_mesh(tensor=8), q, kp, vp, lengths, table, backend="reference")


@pytest.mark.parametrize("fmt,tensor,k_major", [("int8", 4, False), ("w8a8", 2, False), ("int4", 2, False),
                                                ("int4", 4, True)])
def test_quantized_model_tensor_parallel(fmt, tensor, k_major):
    """int8 / W8A8 (weight stored [O, I]) / int4 weights and their scales follow the same TP layout; K-major int4
    (packed [O, I/2], scale [O, I/group]) as the transpose."""
    from autoglm_jax.model.quantized_linear import quantize_model

    cfg = CFG.replace(intermediate_size=512, num_layers=1)
    model = random_model(cfg, dtype="float32", seed=11)
    quantize_model(model, fmt, group=64, k_major=k_major)
    if k_major:
        down = model.layers[0].mlp.down_proj
        assert down.k_major and down.qweight[...].shape == (256, 256) and down.scale[...].shape == (256, 8)
    ids = jnp.asarray(np.random.RandomState(4).randint(0, cfg.vocab_size, (2, 5)), jnp.int32)
    ref = nnx.jit(lambda m, x: m(x))(model, ids)
    mesh = make_mesh(tensor=tensor)
    sm = shard_model(model, mesh)
    q = sm.layers[0].mlp.gate_up_proj.qweight[...]
    assert len({str(s.index) for s in q.addressable_shards}) == tensor  # the integer weight itself is split
    out = nnx.jit(lambda m, x: m(x))(sm, ids)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
    tree, _ = canonical_state(sm)
    _assert_trees_equal(tree, _pure(model))


@pytest.mark.parametrize("mesh_kw,impl", [(dict(tensor=8), "xla_split"), (dict(fsdp=2, tensor=4), "auto")],
                         ids=["tensor8-xla_split", "fsdp2xtensor4-auto"])
def test_k_major_int8_sharded_logits(mesh_kw, impl):
    """K-major int8 (qweight [O, I], logical axes transposed) shards as the transpose of [I, O] and gives the
    logits of the unsharded model and of the sharded [I, O] model."""
    from autoglm_jax.model.quantized_linear import quantize_model

    cfg = CFG.replace(intermediate_size=512, num_layers=1)
    kn, nk = random_model(cfg, dtype="float32", seed=12), random_model(cfg, dtype="float32", seed=12)
    quantize_model(kn, "int8", impl=impl)
    quantize_model(nk, "int8", impl=impl, k_major=True)
    ids = jnp.asarray(np.random.RandomState(5).randint(0, cfg.vocab_size, (4, 6)), jnp.int32)
    fwd = nnx.jit(lambda m, x: m(x))
    ref = fwd(nk, ids)
    tol = dict(rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
    np.testing.assert_allclose(np.asarray(fwd(kn, ids)), np.asarray(ref), **tol)
    mesh = make_mesh(**mesh_kw)
    s_kn, s_nk = shard_model(kn, mesh), shard_model(nk, mesh)
    fsdp = "fsdp" if "fsdp" in mesh_kw else None
    mlp = s_nk.layers[0].mlp
    gate_up, down = mlp.gate_up_proj.qweight[...], mlp.down_proj.qweight[...]
    assert gate_up.shape == (1024, 256) and down.shape == (256, 512)  # [N, K]
    spec = lambda *axes: P(*axes[:1]) if axes[-1] is None else P(*axes)  # specs drop trailing Nones
    assert gate_up.sharding.spec == spec("tensor", fsdp) and down.sharding.spec == spec(fsdp, "tensor")
    assert s_kn.layers[0].mlp.gate_up_proj.qweight[...].sharding.spec == spec(fsdp, "tensor")  # the transpose
    out_nk, out_kn = fwd(s_nk, ids), fwd(s_kn, ids)
    np.testing.assert_allclose(np.asarray(out_nk), np.asarray(ref), **tol)
    np.testing.assert_allclose(np.asarray(out_nk), np.asarray(out_kn), **tol)
    tree, _ = canonical_state(s_nk)
    _assert_trees_equal(tree, _pure(nk))


@pytest.mark.parametrize("k_major", [False, True], ids=["kn", "nk"])
def test_int8_split_row_parallel_adds_no_collectives(k_major):
    """Under tensor parallelism the int8 ``xla_split`` path takes its activation step per device-local K block in
    the row-parallel layers (o_proj, down_proj): the compiled forward has the float model's all-reduces (one per
    row-parallel matmul), not an extra cross-device max before each."""
    import re

    from autoglm_jax.model.quantized_linear import quantize_model
    from sharding import mesh_of, use_mesh

    cfg = CFG.replace(intermediate_size=512, num_layers=2)
    ids = jnp.zeros((4, 1), jnp.int32)
    counts = {}
    for fmt in ("float", "int8"):
        model = random_model(cfg, dtype="bfloat16", seed=13)
        if fmt == "int8":
            quantize_model(model, "int8", impl="xla_split", k_major=k_major)
        sm = shard_model(model, make_mesh(tensor=2))
        if fmt == "int8":
            assert {sm.layers[0].attn.o_proj.k_blocks, sm.layers[1].mlp.down_proj.k_blocks} == {2}
            assert sm.layers[0].mlp.gate_up_proj.k_blocks == 1  # column-parallel: K is whole on each device
        with use_mesh(mesh_of(nnx.state(sm))):
            hlo = nnx.jit(lambda m, x: m(x)).lower(sm, ids).compile().as_text()
        counts[fmt] = len(re.findall(r" all-reduce(?:-start)?\(", hlo))
    assert counts["float"] == 2 * cfg.num_layers  # one per row-parallel matmul
    assert counts["int8"] == counts["float"], counts


@pytest.mark.parametrize("quantized", [False, True])
def test_ragged_paged_attention_per_shard_matches_unsharded(quantized):
    """Chunked prefill per shard; int8 pages carry their [K, P, L] scales on the same KV-head split."""
    from kernels_pallas.ragged_paged_attention import ragged_paged_attention_reference
    from sharding.kernels import sharded_ragged_paged_attention

    from .test_ragged_paged_attention import make_batch

    rng = np.random.default_rng(3)
    args, scales, _, _ = make_batch(rng, group=4, page_size=16, contexts=[40, 17, 5], chunks=[20, 1, 5],
                                    quantized=quantized, dtype=jnp.float32)
    scales = scales if quantized else {}
    ref = ragged_paged_attention_reference(*args, **scales)
    out = sharded_ragged_paged_attention(make_mesh(tensor=2), *args, **scales, backend="reference")
    assert out.sharding.spec == P(None, "tensor", None)
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
