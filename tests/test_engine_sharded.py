"""The serving engine on a mesh (tensor parallelism) against the unsharded engine, on 8 virtual CPU devices.

Greedy tokens must equal the single-device engine's (float32; the sharded sums are only reordered): the
reference backend under shard_map, the GPU kernels' Pallas code in interpret mode, int8 pages. The pool must
really be split over KV heads, steady-state serving must not compile, and meshes that do not fit must raise
``MeshError`` before anything is sharded.
"""

from __future__ import annotations

import asyncio

import jax
import pytest
from flax import nnx

from autoglm_jax.engine import LLM, AsyncLLM, SamplingParams, num_compilations
from autoglm_jax.memory import kv_bytes_per_token_per_layer, param_bytes, plan_memory
from sharding import MeshError, make_mesh, per_device_bytes, shard_model
from .engine_fixtures import CFG, greedy, make_model, random_prompts

# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_tensor_parallel_engine_equals_unsharded[4-False]',
}


pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (conftest sets 8 CPU devices)")

# CFG: N = 4 query heads over K = 2 KV heads; tensor 4 repeats each KV head twice (K' = 4).
ENGINE = dict(page_size=8, max_num_seqs=4, max_num_batched_tokens=32, max_model_len=64, num_pages=40)
N_OUT = 5


@pytest.fixture(scope="module")
def model():
    return make_model()


@pytest.fixture(scope="module")
def prompts():
    shared = random_prompts((20,), seed=7)[0]  # a shared prefix: prefix hits, chunked prefill, decode steps
    return random_prompts((5, 41), seed=3) + [shared + [11, 12], shared + [13]]


@pytest.fixture(scope="module")
def unsharded(model, prompts):
    """Greedy tokens of the single-device engine: float pages and int8 pages."""
    out = {}
    for kv in (None, "int8"):
        llm = LLM(model, kv_dtype=kv, **ENGINE)
        out[kv] = [c.token_ids for c in llm.generate(prompts, greedy(N_OUT))]
    return out


def _check_pool(llm, t):
    """Every layer's pages (and scales) are split over the tensor axis: K'/t heads per device."""
    k = max(CFG.num_kv_heads, t)
    assert llm.cfg.num_kv_heads == k
    pages = llm.runner.pages
    for x in pages.k + pages.v:
        assert x.shape == (k, ENGINE["num_pages"], ENGINE["page_size"], CFG.head_dim)
        assert {s.data.shape for s in x.addressable_shards} == {(k // t,) + x.shape[1:]}
        assert len({s.device for s in x.addressable_shards}) == t
    for x in pages.k_scales + pages.v_scales:
        assert {s.data.shape for s in x.addressable_shards} == {(k // t,) + x.shape[1:]}
    # the memory model's per-device page bytes are what each device holds
    held = per_device_bytes(pages)
    assert set(held.values()) == {ENGINE["num_pages"] * llm.memory["page_bytes"]}


@pytest.mark.parametrize("t, interpret", [(2, False), (4, False), (4, True)])
def test_tensor_parallel_engine_equals_unsharded(model, prompts, unsharded, t, interpret):
    llm = LLM(model, mesh=make_mesh(tensor=t), interpret=interpret, **ENGINE)
    got = [c.token_ids for c in llm.generate(prompts, greedy(N_OUT))]
    assert got == unsharded[None]
    assert llm.stats().prefix_hit_rate > 0
    keys = llm.runner.shape_keys
    assert any(k[3] for k in keys) and any(not k[3] for k in keys)  # decode and ragged kernels both ran
    _check_pool(llm, t)
    assert llm.memory["tensor_parallel"] == t
    assert llm.memory["param_bytes"] == max(per_device_bytes(llm.runner.params).values())
    assert llm.memory["param_bytes"] < sum(x.nbytes for x in jax.tree.leaves(nnx.state(model))) / t * 1.1


def test_int8_pages_on_a_mesh(model, prompts, unsharded):
    llm = LLM(model, mesh=make_mesh(tensor=4), kv_dtype="int8", **ENGINE)
    got = [c.token_ids for c in llm.generate(prompts, greedy(N_OUT))]
    assert got == unsharded["int8"]
    assert llm.runner.pages.quantized
    _check_pool(llm, 4)


def test_no_compilation_after_warmup(model, prompts):
    llm = LLM(model, mesh=make_mesh(tensor=2), token_buckets=(32,), seq_buckets=(4,), **ENGINE)
    n_shapes = llm.warmup()
    before = num_compilations()
    sampled = SamplingParams(max_tokens=N_OUT, temperature=0.8, top_k=20, seed=1, ignore_eos=True)
    llm.generate(prompts, [greedy(N_OUT), sampled, greedy(N_OUT), sampled])
    full = random_prompts((3 * ENGINE["page_size"],), seed=9)[0]
    llm.generate(full, greedy(2))
    for _ in range(2):  # fully cached: the last page is copied on write (the copy program runs on the mesh)
        llm.add_request(full, greedy(2))
    copies = 0
    while llm.has_unfinished():
        plan, inputs = llm.schedule()
        copies += len(plan.copy_ops)
        llm.finish_step(plan, llm.run(plan, inputs))
    assert copies > 0
    assert llm.runner.shape_keys <= set(llm.runner.all_shape_keys()) and n_shapes == 4
    assert num_compilations() == before


def test_sharded_model_is_kept_and_its_mesh_inferred(model, prompts, unsharded):
    mesh = make_mesh(tensor=2)
    sm = shard_model(model, mesh)
    leaf = jax.tree.leaves(nnx.state(sm, nnx.Param))[0]
    llm = LLM(sm, **ENGINE)  # no mesh: the tensor-parallel model's own
    assert llm.mesh == mesh
    assert any(x is leaf for x in jax.tree.leaves(llm.runner.params))  # not sharded again
    assert [c.token_ids for c in llm.generate(prompts, greedy(N_OUT))] == unsharded[None]
    _check_pool(llm, 2)

    async def one(engine):
        async with engine:
            return [t for out in [o async for o in engine.generate(prompts[1], greedy(N_OUT))]
                    for t in out.new_token_ids]
    assert asyncio.run(one(AsyncLLM(sm, mesh=mesh, **ENGINE))) == unsharded[None][1]


def test_meshes_that_do_not_fit_fail_before_device_work(model):
    traced = num_compilations()
    with pytest.raises(MeshError, match=r"tensor parallelism only; got data=2 x fsdp=1 x tensor=2"):
        LLM(model, mesh=make_mesh(data=2, tensor=2), **ENGINE)
    with pytest.raises(MeshError, match=r"tensor parallelism only; got data=1 x fsdp=2"):
        LLM(model, mesh=make_mesh(fsdp=2, tensor=2), **ENGINE)
    with pytest.raises(MeshError, match=r"num_heads \(N\)=4 is not a multiple of the tensor degree 8"):
        LLM(model, mesh=make_mesh(tensor=8), **ENGINE)
    with pytest.raises(MeshError, match="needs a mesh from sharding.make_mesh"):
        LLM(model, mesh=jax.make_mesh((2,), ("x",), devices=jax.devices()[:2]), **ENGINE)
    sm = shard_model(model, make_mesh(tensor=2))
    with pytest.raises(MeshError, match="already tensor-parallel over another mesh"):
        LLM(sm, mesh=make_mesh(tensor=4), **ENGINE)
    assert num_compilations() == traced
    # the model given was left on its single device
    assert {len(x.sharding.device_set) for x in jax.tree.leaves(nnx.state(model))} == {1}


def test_memory_model_counts_per_device_bytes(model):
    # K = 2 heads over t = 4 devices: repeated to K' = 4, one head per device (bf16: 2 * 1 * H * 2 bytes)
    assert kv_bytes_per_token_per_layer(CFG, "bfloat16", tensor=4) == 2 * 1 * CFG.head_dim * 2
    assert kv_bytes_per_token_per_layer(CFG, "int8", tensor=2) == 2 * 1 * CFG.head_dim + 2 * 1 * 4
    assert kv_bytes_per_token_per_layer(CFG, "float32", tensor=1) == 2 * 2 * CFG.head_dim * 4
    for t in (2, 4):  # the float32 prediction is exactly what shard_model puts on each device
        held = per_device_bytes(nnx.state(shard_model(model, make_mesh(tensor=t))))
        assert set(held.values()) == {sum(param_bytes(CFG, dtype="float32", tensor=t).values())}
    one = plan_memory(CFG, dtype="float32", batch=4, context=64, chunk=32)
    two = plan_memory(CFG, dtype="float32", batch=4, context=64, chunk=32, tensor=2)
    assert two.page_bytes * 2 == one.page_bytes and two.workspace_bytes < one.workspace_bytes
    with pytest.raises(ValueError, match="tensor=0 must be a positive integer"):
        plan_memory(CFG, dtype="float32", batch=4, context=64, tensor=0)


def test_serve_tensor_parallel_shards_the_pool():
    from autoglm_jax.server.main import build_parser, build_server

    args = build_parser().parse_args(["--tensor-parallel", "2", "--warmup", "none", "--compilation-cache", "none",
                                      "--max-model-len", "64", "--max-num-seqs", "4", "--num-pages", "16"])
    app, report = build_server(args, log=lambda m: None)
    llm = app.state.server.engine.engine
    assert report["tensor_parallel"] == 2 and llm.mesh.shape["tensor"] == 2
    k = llm.runner.pages.k[0]
    assert {s.data.shape[0] for s in k.addressable_shards} == {k.shape[0] // 2}
    ids = llm.tokenizer.encode("Hello")
    assert len(llm.generate(ids, greedy(3))[0].token_ids) == 3
