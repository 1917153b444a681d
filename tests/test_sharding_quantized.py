"""Quantized matmul kernels per shard (``sharding.kernels.sharded_quantized_matmul``): the Pallas kernel (interpreted
on CPU) on each device's slice of a column- or row-parallel weight, under tensor, fsdp x tensor and data meshes."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from autoglm_jax.config import GLMConfig
from autoglm_jax.loading import random_model
from autoglm_jax.model.quantized_linear import QuantizedLinear, quantize_model
from kernels_pallas.quant_formats import quantize
from kernels_pallas.quantized_matmul import quantized_matmul_reference
from sharding import MeshError, make_mesh, mesh_of, shard_model, use_mesh
from sharding.kernels import quantized_shard_plan, sharded_quantized_matmul

needs_8 = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (conftest sets 8 CPU devices)")

CFG = GLMConfig.from_preset("tiny").replace(num_heads=8, head_dim=32, num_layers=1, vocab_size=1024,
                                            intermediate_size=512)


def _weight(fmt, k, n, seed, **kw):
    w = jax.random.normal(jax.random.key(seed), (k, n), jnp.float32) * 0.05
    return quantize(w, fmt, **kw)


COLUMN, ROW = (("embed", "mlp"), "column"), (("mlp", "embed"), "row")


@needs_8
@pytest.mark.parametrize("fmt,kw,axes,plan", [
    ("int8", {}, *COLUMN), ("int8", dict(k_major=True), *ROW), ("int4", dict(group=64), *ROW),
    ("int4", dict(group=64, k_major=True), *COLUMN), ("w8a8", {}, *COLUMN), ("w8a8", {}, *ROW)],
    ids=["int8-column", "int8_nk-row", "int4-row", "int4_nk-column", "w8a8-column", "w8a8-row"])
def test_per_shard_matches_the_reference(fmt, kw, axes, plan):
    """Column-parallel (output over tensor) and row-parallel (input over tensor, float32 partials summed) calls of
    the interpreted GPU kernel on fresh random inputs equal the jnp reference of the whole weight; the output keeps
    its columns split in the column case."""
    k, n, b = 512, 256, 4
    qw = _weight(fmt, k, n, seed=1, **kw)
    x = jax.random.normal(jax.random.key(2), (b, 3, k), jnp.float32)
    bias = jax.random.normal(jax.random.key(3), (n,), jnp.float32)
    mesh = make_mesh(data=2, tensor=4)
    assert quantized_shard_plan(qw, axes, dict(mesh.shape)) == plan
    ref = quantized_matmul_reference(x, qw, bias=bias)
    out = jax.jit(lambda x, w, bias: sharded_quantized_matmul(mesh, x, w, axes, bias=bias, impl="pallas_gpu",
                                                              interpret=True))(x, qw, bias)
    assert out.shape == ref.shape
    assert out.sharding.spec == (P("data", None, "tensor") if plan == "column" else P("data"))
    # W8A8 row-parallel quantizes each device's slice of x with its own per-token scale: finer than one scale
    tol = 3e-2 if (fmt == "w8a8" and plan == "row") else 1e-4
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=tol, atol=tol * float(jnp.abs(ref).max()))


@needs_8
def test_plans_and_the_int4_group_bound():
    mesh = {"data": 1, "fsdp": 2, "tensor": 2}
    int4 = _weight("int4", 384, 128, seed=4, group=64)  # 6 groups of 64
    assert quantized_shard_plan(int4, ("mlp", "embed"), mesh) == "row"  # 3 groups a device
    assert quantized_shard_plan(int4, ("mlp", "embed"), {**mesh, "tensor": 4}) is None  # 1.5 groups a device
    assert quantized_shard_plan(int4, ("embed", None), mesh) == "replicated"  # only fsdp: gathered, batch split
    assert quantized_shard_plan(int4, ("embed", "vocab"), mesh) == "column"
    x = jnp.ones((2, 384), jnp.float32)
    with pytest.raises(MeshError, match="multiple of the group"):
        sharded_quantized_matmul(make_mesh(tensor=4), x, int4, ("mlp", "embed"), impl="pallas_gpu", interpret=True)
    layer = QuantizedLinear(int4, axes=("mlp", "embed"), interpret=True)
    with use_mesh(make_mesh(tensor=4)):
        assert layer.shard_plan() is None and layer.path() == "xla"  # XLA's partitioner splits that one
    with use_mesh(make_mesh(tensor=2)):
        assert layer.shard_plan() == "row" and layer.path() == "auto"
    assert layer.shard_plan() is None  # one device: the whole-array call


@needs_8
@pytest.mark.parametrize("fmt,mesh_kw", [("int4", dict(fsdp=2, tensor=2)), ("int8_nk", dict(data=2, tensor=2))])
def test_sharded_quantized_model_runs_kernels_per_shard(fmt, mesh_kw):
    """A quantized model (interpreted kernels) sharded over the mesh gives the logits of the unsharded model, and its
    compiled forward gathers no integer weight whole (a Pallas call left to XLA's partitioner would) and has the
    float model's all-reduces (one per row-parallel matmul); without fsdp, its all-gathers are the float model's."""
    ids = jnp.asarray(np.random.RandomState(6).randint(0, CFG.vocab_size, (4, 5)), jnp.int32)
    fwd = nnx.jit(lambda m, x: m(x))
    mesh = make_mesh(**mesh_kw)
    counts, gathers = {}, {}
    for quantized in (False, True):
        model = random_model(CFG, dtype="float32", seed=21)
        if quantized:
            quantize_model(model, fmt[:4], group=64, k_major=fmt.endswith("_nk"), interpret=True)
            ref = fwd(model, ids)
        sm = shard_model(model, mesh)
        with use_mesh(mesh_of(nnx.state(sm))):
            if quantized:
                layer = sm.layers[0]
                projections = (layer.attn.qkv_proj, layer.mlp.gate_up_proj, layer.attn.o_proj, layer.mlp.down_proj)
                assert [p.shard_plan() for p in projections] == ["column", "column", "row", "row"]
                whole = {"[" + ",".join(map(str, p.qweight[...].shape)) + "]" for p in projections}
                out = fwd(sm, ids)
            hlo = nnx.jit(lambda m, x: m(x)).lower(sm, ids).compile().as_text()
        gathers[quantized] = [line for line in hlo.splitlines() if re.search(r" all-gather(?:-start)?\(", line)]
        counts[quantized] = len(re.findall(r" all-reduce(?:-start)?\(", hlo))
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-4, atol=1e-4 * float(jnp.abs(ref).max()))
    assert not [g for g in gathers[True] if any(shape in g.split("all-gather")[0] for shape in whole)], whole
    assert counts[True] == counts[False] == 2 * CFG.num_layers
    if "fsdp" not in mesh_kw:
        assert len(gathers[True]) == len(gathers[False])


@needs_8
def test_layer_under_mesh_takes_no_producer_digits():
    """Under a multi-device mesh each shard's kernel computes its own activation digits from its slice of x."""
    layer = QuantizedLinear(_weight("int4", 256, 128, seed=5, group=64, k_major=True), axes=("embed", "mlp"),
                            interpret=True)
    x = jax.ShapeDtypeStruct((1, 256), jnp.float32)
    assert layer.digits_layout(x) is not None  # one device: the one-row integer-dot GEMV takes the norm's planes
    with use_mesh(make_mesh(tensor=2)):
        assert layer.digits_layout(x) is None
        y = jax.jit(lambda x: layer(x))(jax.device_put(jnp.ones((2, 256)), NamedSharding(make_mesh(tensor=2), P())))
    np.testing.assert_allclose(np.asarray(y), np.asarray(quantized_matmul_reference(jnp.ones((2, 256)),
                                                                                    layer.weight())),
                               rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(jax.device_count() < 2, reason="needs 2 GPUs")
@pytest.mark.parametrize("fmt,kw", [("int8", dict(k_major=True)), ("int4", dict(group=64, k_major=True)),
                                    ("int8", {})], ids=["int8_nk", "int4_nk", "int8"])
@pytest.mark.parametrize("m", [1, 32])
def test_per_shard_kernels_on_two_gpus(fmt, kw, m):
    """The compiled GPU kernels (not interpreted) per shard on a tensor-2 mesh of GPUs, column and row parallel, at
    GLM-4-9B widths (int4 in groups of 64: down_proj's 107 groups of 128 do not split in two): the jnp reference of
    the whole weight, and no NaN."""
    mesh = make_mesh(tensor=2)
    for axes, (k, n) in ((("embed", "mlp"), (4096, 27392)), (("mlp", "embed"), (13696, 4096))):
        qw = _weight(fmt, k, n, seed=7, **kw)
        x = jax.random.normal(jax.random.key(8), (m, k), jnp.bfloat16)
        ref = quantized_matmul_reference(x.astype(jnp.float32), qw)
        out = jax.jit(lambda x, w: sharded_quantized_matmul(mesh, x, w, axes, out_dtype=jnp.float32,
                                                            impl="pallas_gpu"))(x, qw)
        assert not bool(jnp.isnan(out).any())
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=2e-2, atol=2e-2 * float(jnp.abs(ref).max()))
