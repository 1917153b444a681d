"""Ragged (chunked-prefill) paged attention: kernel vs reference vs plain causal dense attention.

Pools come from ``make_pool`` (shuffled page tables, unused entries outside the pool, NaN in unowned
slots); outputs are NaN-poisoned; each batch mixes chunks that cross pages, a whole-prompt chunk, a
one-token chunk and padding rows past query_start[num_seqs], plus an unused page-table row.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas.ragged_paged_attention import ragged_paged_attention, ragged_paged_attention_reference
from tests.test_paged_attention import H, dense_attention, make_pool, rel_err


# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_matches_reference[16-16-4-2-False-False]',
    'test_matches_reference[2-64-8-1-False-False]',
}


def make_batch(rng, *, group, page_size, contexts, chunks, padding=5, quantized=False, dtype=jnp.bfloat16):
    """contexts[b] cached tokens after the chunk; chunks[b] query tokens (the last ones of the context)."""
    pool = make_pool(rng, kv_heads=2, page_size=page_size, lengths=list(contexts) + [3], quantized=quantized,
                     dtype=dtype)
    starts = np.concatenate([[0], np.cumsum(chunks)]).astype(np.int32)
    query_start = np.concatenate([starts, [starts[-1]]]).astype(np.int32)  # the unused row: empty
    t_total = int(starts[-1]) + padding
    q = jnp.asarray(rng.standard_normal((t_total, 2 * group, H)), dtype)
    args = (q, pool["k_pages"], pool["v_pages"], pool["page_table"], pool["lengths"], jnp.asarray(query_start),
            jnp.asarray([len(chunks)], jnp.int32))
    return args, dict(k_scales=pool["k_scales"], v_scales=pool["v_scales"]), pool, starts


class RaggedCases:
    interpret = False

    @pytest.mark.parametrize("group,page_size,block_q,ppb,quantized,row_gather", [
        (16, 16, 4, 2, False, False), (2, 64, 8, 1, False, False), (1, 16, 16, 4, False, False),
        (16, 16, 2, 1, True, False), (16, 16, 4, 2, False, True), (2, 64, 8, 1, True, True)])
    def test_matches_reference(self, group, page_size, block_q, ppb, quantized, row_gather):
        rng = np.random.default_rng([group, page_size, block_q, int(quantized)])
        l = page_size
        contexts = [3 * l + 5, l + 1, 2 * l, 37]
        chunks = [l + 9, l + 1, 1, 37]  # crosses pages; starts mid-page; decode-like; whole prompt
        args, scales, pool, starts = make_batch(rng, group=group, page_size=page_size, contexts=contexts,
                                                chunks=chunks, quantized=quantized)
        out = ragged_paged_attention(*args, **scales, block_q=block_q, pages_per_block=ppb, row_gather=row_gather,
                                     interpret=self.interpret, _poison=True)
        ref = ragged_paged_attention_reference(*args, **scales)
        assert out.shape == args[0].shape
        assert bool(np.isfinite(np.asarray(out, np.float32)).all()), "unwritten (NaN-poisoned) rows"
        assert not np.any(np.asarray(out[int(starts[-1]):], np.float32)), "padding rows must be zero"
        assert rel_err(out[: int(starts[-1])], ref[: int(starts[-1])]) < 1e-2

    @pytest.mark.parametrize("quantized,row_gather", [(False, False), (True, False), (False, True), (True, True)])
    def test_chunks_after_long_cached_prefix(self, quantized, row_gather):
        """Most kv blocks lie wholly before every query of a block (the kernel's unmasked loop); the diagonal
        and the partial last page take the masked one. NaN in unowned slots would leak through either."""
        rng = np.random.default_rng([11, int(quantized)])
        l = 16
        contexts, chunks = [9 * l + 5, 6 * l, 2 * l + 3], [l + 3, 2 * l, 5]
        args, scales, _, starts = make_batch(rng, group=16, page_size=l, contexts=contexts, chunks=chunks,
                                             quantized=quantized)
        out = ragged_paged_attention(*args, **scales, block_q=4, pages_per_block=2, row_gather=row_gather,
                                     interpret=self.interpret, _poison=True)
        ref = ragged_paged_attention_reference(*args, **scales)
        assert bool(np.isfinite(np.asarray(out, np.float32)).all())
        assert rel_err(out[: int(starts[-1])], ref[: int(starts[-1])]) < 1e-2


@pytest.mark.gpu
class TestRaggedGPU(RaggedCases):
    interpret = False

    def test_512_token_chunks(self):
        rng = np.random.default_rng(9)
        args, scales, _, starts = make_batch(rng, group=16, page_size=16, contexts=[1024, 600, 512],
                                             chunks=[512, 512, 512], padding=0)
        out = ragged_paged_attention(*args, backend="triton", _poison=True)
        assert bool(np.isfinite(np.asarray(out, np.float32)).all())
        assert rel_err(out, ragged_paged_attention_reference(*args)) < 1e-2


class TestRaggedInterpret(RaggedCases):
    interpret = True


def test_reference_matches_causal_dense_attention():
    rng = np.random.default_rng(4)
    contexts, chunks = [40, 17, 5], [9, 17, 1]
    args, _, pool, starts = make_batch(rng, group=4, page_size=16, contexts=contexts, chunks=chunks,
                                       dtype=jnp.float32)
    out = np.asarray(ragged_paged_attention_reference(*args, scale=0.2))
    q = np.asarray(args[0])
    for b, (n, c) in enumerate(zip(contexts, chunks)):
        dense = dense_attention(q[starts[b]: starts[b + 1]], pool["k_logical"][b], pool["v_logical"][b], 0.2,
                                causal_offset=n - c)
        np.testing.assert_allclose(out[starts[b]: starts[b + 1]], dense, rtol=1e-5, atol=1e-5)
    assert not np.any(out[starts[-1]:])


@pytest.mark.parametrize("bad,match", [
    ("chunk_longer_than_context", "query tokens but context_lens"),
    ("query_start_decreasing", "non-decreasing"),
    ("heads", "multiple of kv heads"),
    ("table_oob", "outside the pool"),
])
def test_bad_input_raises_before_launch(bad, match):
    args, scales, _, _ = make_batch(np.random.default_rng(1), group=2, page_size=16, contexts=[20, 30],
                                    chunks=[4, 30])
    q, kp, vp, table, ctx, qs, ns = args
    if bad == "chunk_longer_than_context":
        ctx = ctx.at[0].set(3)
    elif bad == "query_start_decreasing":
        qs = qs.at[1].set(40)
    elif bad == "heads":
        q = q[:, :3]
    elif bad == "table_oob":
        table = table.at[1, 0].set(-2)
    with pytest.raises(ValueError, match=match):
        ragged_paged_attention(q, kp, vp, table, ctx, qs, ns, interpret=True)


def test_mosaic_tpu_kernel_interpret():
    """The Mosaic TPU prefill kernel (no TPU here: run through the Pallas interpreter), G=2."""
    rng = np.random.default_rng(22)
    args, scales, _, starts = make_batch(rng, group=2, page_size=16, contexts=[37, 17], chunks=[21, 17])
    out = ragged_paged_attention(*args, block_q=8, backend="mosaic_tpu", interpret=True, _poison=True)
    n = int(starts[-1])
    assert bool(np.isfinite(np.asarray(out, np.float32)).all()) and not np.any(np.asarray(out[n:], np.float32))
    assert rel_err(out[:n], ragged_paged_attention_reference(*args)[:n]) < 1e-2


def finite_unowned(args, value=30.0):
    """The pool with its unowned slots (NaN in ``make_pool``) set to a large finite value. The Mosaic GPU kernel
    needs finite values there: a masked key's zero weight still multiplies its V row. An unmasked unowned key
    would show as a large error."""
    q, kp, vp, *rest = args
    return (q, jnp.nan_to_num(kp, nan=value), jnp.nan_to_num(vp, nan=value), *rest)


class MosaicGpuCases:
    """The Mosaic GPU (Hopper) prefill kernel: 128-token blocks, 64-key blocks of 16-token pages (4 TMA copies a
    block) or 128-key pages (one), a chunk over two blocks, one that starts mid-page, a one-token chunk, padding
    rows and an unused page-table row. In interpret mode, unwritten outputs are NaN (the interpreter fills new
    buffers with NaN)."""
    interpret = False
    cases = [(1, 16, [200, 40, 17], [150, 23, 1], {})]

    def check(self, group, page_size, contexts, chunks, blocks):
        rng = np.random.default_rng([group, page_size, len(contexts)])
        args, _, _, starts = make_batch(rng, group=group, page_size=page_size, contexts=contexts, chunks=chunks)
        args = finite_unowned(args)
        out = ragged_paged_attention(*args, backend="mosaic_gpu", interpret=self.interpret, **blocks)
        n = int(starts[-1])
        assert out.shape == args[0].shape
        assert bool(np.isfinite(np.asarray(out, np.float32)).all()), "unwritten rows"
        assert not np.any(np.asarray(out[n:], np.float32)), "padding rows must be zero"
        assert rel_err(out[:n], ragged_paged_attention_reference(*args)[:n]) < 1e-2

    def test_matches_reference(self):
        for case in self.cases:
            self.check(*case)


# slow: jax's Mosaic GPU interpreter takes 75-100 s for this one case on CI's two cores; CI keeps the CUDA lowering
# of every GPU case (test_mosaic_gpu_lowers_for_cuda) and the GPU class runs them all on a Hopper GPU.
@pytest.mark.slow
class TestMosaicGpuInterpret(MosaicGpuCases):
    interpret = True


@pytest.mark.gpu
class TestMosaicGpuGPU(MosaicGpuCases):
    cases = MosaicGpuCases.cases + [
        (16, 16, [600, 300, 129, 64], [512, 300, 129, 1], {}), (2, 128, [1000, 257], [257, 257], {}),
        (8, 64, [4096], [512], {}), (16, 16, [600, 300, 129, 64], [512, 300, 129, 1], dict(block_q=256)),
        (16, 16, [1000, 70], [700, 70], dict(pages_per_block=8)), (16, 16, [1000, 70], [700, 70], dict(num_stages=3)),
        (16, 16, [1000, 70], [700, 70], dict(num_stages=4)), (16, 64, [9000], [300], {})]


@pytest.mark.parametrize("case", TestMosaicGpuGPU.cases, ids=str)
def test_mosaic_gpu_lowers_for_cuda(case):
    """Each GPU case lowered for CUDA on this machine (jax.export): Pallas -> Mosaic GPU, wgmma and register
    layouts included, which interpret mode skips. PTX, ptxas and the numbers still need a GPU."""
    group, page_size, contexts, chunks, blocks = case
    args, _, _, _ = make_batch(np.random.default_rng(0), group=group, page_size=page_size, contexts=contexts,
                               chunks=chunks)
    f = jax.jit(lambda *a: ragged_paged_attention(*a, backend="mosaic_gpu", **blocks))
    module = jax.export.export(f, platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in module and "wgmma.mma_async" in module


def test_mosaic_gpu_rejects_what_it_does_not_take():
    args, scales, _, _ = make_batch(np.random.default_rng(3), group=2, page_size=16, contexts=[20], chunks=[4],
                                    quantized=True)
    with pytest.raises(ValueError, match="int8 pages run on 'triton'"):
        ragged_paged_attention(*args, **scales, backend="mosaic_gpu", interpret=True)
    args, _, _, _ = make_batch(np.random.default_rng(3), group=2, page_size=16, contexts=[20], chunks=[4],
                               dtype=jnp.float32)
    with pytest.raises(ValueError, match="bfloat16 or float16"):
        ragged_paged_attention(*args, backend="mosaic_gpu", interpret=True)
    args, _, _, _ = make_batch(np.random.default_rng(3), group=2, page_size=16, contexts=[20], chunks=[4])
    with pytest.raises(ValueError, match="key blocks of 64, 128 or 256 keys"):
        ragged_paged_attention(*args, backend="mosaic_gpu", pages_per_block=2, interpret=True)
    with pytest.raises(ValueError, match=r"block_q in \(128, 256\)"):
        ragged_paged_attention(*args, backend="mosaic_gpu", block_q=64, interpret=True)
    with pytest.raises(ValueError, match="bytes of shared memory"):
        ragged_paged_attention(*args, backend="mosaic_gpu", pages_per_block=8, num_stages=3, interpret=True)
    args, _, _, _ = make_batch(np.random.default_rng(3), group=2, page_size=8, contexts=[66000], chunks=[4])
    with pytest.raises(ValueError, match="at most 8192 pages a sequence"):
        ragged_paged_attention(*args, backend="mosaic_gpu", interpret=True)


def test_hopper_default_picks_mosaic_gpu_where_it_fits(monkeypatch):
    """On a Hopper GPU (faked here) the dispatch runs the Mosaic GPU kernel with the first key block that fits
    shared memory (128 keys, then 64), and the Triton kernel for what the Mosaic GPU kernel does not take."""
    import kernels_pallas.ragged_paged_attention as rpa
    picked = []
    monkeypatch.setattr(rpa, "on_hopper", lambda: True)
    monkeypatch.setattr(rpa, "_ragged_paged_attention", lambda *a, **kw: picked.append(
        (kw["backend"], kw["pages_per_block"])))
    args, scales, _, _ = make_batch(np.random.default_rng(4), group=2, page_size=16, contexts=[40], chunks=[8])
    ragged_paged_attention(*args)
    ragged_paged_attention(*args, block_q=8)  # a Triton block size
    ragged_paged_attention(*args, row_gather=True)
    qargs, qscales, _, _ = make_batch(np.random.default_rng(4), group=2, page_size=16, contexts=[40], chunks=[8],
                                      quantized=True)
    ragged_paged_attention(*qargs, **qscales)
    q, kp, vp, table, *rest = args  # a page table of 8000 pages a sequence: 128-key blocks no longer fit
    ragged_paged_attention(q, kp, vp, jnp.zeros((table.shape[0], 8000), jnp.int32), *rest)
    fallback = ("triton" if jax.default_backend() == "gpu" else "reference", None)
    assert picked == [("mosaic_gpu", 8), fallback, fallback, fallback, ("mosaic_gpu", 4)]


def test_mosaic_gpu_kernels_lower_per_shard_for_cuda():
    """Tensor-parallel prefill and decode (shard_map over query / KV heads, a 2-device CPU mesh) with the Mosaic GPU
    kernels lower for CUDA: each shard runs the kernel on its 16 query heads and one KV head."""
    from sharding import make_mesh
    from sharding.kernels import sharded_paged_attention, sharded_ragged_paged_attention

    args, _, pool, _ = make_batch(np.random.default_rng(0), group=16, page_size=16, contexts=[600, 300],
                                  chunks=[512, 300])
    mesh = make_mesh(tensor=2)
    q1 = jnp.zeros((3, 32, H), jnp.bfloat16)
    calls = [(lambda *a: sharded_ragged_paged_attention(mesh, *a, backend="mosaic_gpu"), args),
             (lambda q, kp, vp, n, pt: sharded_paged_attention(mesh, q, kp, vp, n, pt, backend="mosaic_gpu"),
              (q1, args[1], args[2], pool["lengths"], pool["page_table"]))]
    for f, a in calls:
        module = jax.export.export(jax.jit(f), platforms=["cuda"])(*a).mlir_module()
        assert "wgmma.mma_async" in module and module.count("mosaic_gpu_v2") == 1
