"""Paged decode attention, page writes and int8 pages: kernel vs reference vs plain dense attention.

Every kernel case runs through the Pallas kernel with a NaN-poisoned output (``_poison=True``), shuffled
non-contiguous page tables whose unused tail entries point outside the pool, and NaN in every pool
slot no sequence owns, so unwritten outputs, wrong pages and leaked stale slots all fail.
"""

from __future__ import annotations

import numpy as np
import pytest
import jax
import jax.numpy as jnp

from kernels_pallas.kv_pages import dequantize_kv, quantize_kv, validate_page_table, write_kv_pages
from kernels_pallas.paged_attention import paged_attention, paged_attention_reference

# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_int8_pages[2-64-False-False]',
    'test_int8_pages[16-16-True-False]',
    'test_matches_reference[16-64-None-None]',
    'test_matches_reference[16-16-3-False]',
}


H = 128


def make_pool(rng, *, kv_heads, page_size, lengths, dtype=jnp.bfloat16, quantized=False, spare_pages=3,
              head_dim=H):
    """Random pool with the given sequence lengths. Returns dict with pages, scales, page_table, and
    the logical per-sequence k/v (float32 numpy [B][S_b, K, H]) that the pages hold."""
    pages_per_seq = [-(-n // page_size) for n in lengths]
    max_pages = max(pages_per_seq) + 1
    num_pages = sum(pages_per_seq) + spare_pages
    perm = rng.permutation(num_pages)
    table = np.full((len(lengths), max_pages), num_pages + 1000, np.int32)  # unused entries: outside the pool
    owned = np.zeros((num_pages, page_size), bool)
    start = 0
    for b, n in enumerate(lengths):
        table[b, : pages_per_seq[b]] = perm[start: start + pages_per_seq[b]]
        start += pages_per_seq[b]
        for t in range(n):
            owned[table[b, t // page_size], t % page_size] = True
    shape = (kv_heads, num_pages, page_size, head_dim)
    k = rng.standard_normal(shape).astype(np.float32)
    v = rng.standard_normal(shape).astype(np.float32)
    out = dict(page_table=jnp.asarray(table), lengths=jnp.asarray(lengths, jnp.int32))
    if quantized:
        (kq, ks), (vq, vs) = quantize_kv(jnp.asarray(k)), quantize_kv(jnp.asarray(v))
        k, v = np.asarray(dequantize_kv(kq, ks)), np.asarray(dequantize_kv(vq, vs))
        nan = np.where(owned[None], 0.0, np.nan).astype(np.float32)
        out.update(k_pages=kq, v_pages=vq, k_scales=jnp.asarray(np.asarray(ks) + nan),
                   v_scales=jnp.asarray(np.asarray(vs) + nan))
    else:
        k, v = k.astype(jnp.dtype(dtype)).astype(np.float32), v.astype(jnp.dtype(dtype)).astype(np.float32)
        nan = np.where(owned[None, :, :, None], 0.0, np.nan).astype(np.float32)
        out.update(k_pages=jnp.asarray(k + nan, dtype), v_pages=jnp.asarray(v + nan, dtype), k_scales=None,
                   v_scales=None)
    out["k_logical"] = [k[:, table[b, np.arange(n) // page_size], np.arange(n) % page_size].transpose(1, 0, 2)
                        for b, n in enumerate(lengths)]
    out["v_logical"] = [v[:, table[b, np.arange(n) // page_size], np.arange(n) % page_size].transpose(1, 0, 2)
                        for b, n in enumerate(lengths)]
    return out


def dense_attention(q, k, v, scale, causal_offset=None):
    """Plain float64 attention: q [T, N, H], k, v [S, K, H]; query t sees keys <= causal_offset + t."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)
    logits = np.einsum("tnh,snh->nts", q, k) * scale
    if causal_offset is not None:
        logits = np.where(np.arange(k.shape[0])[None, :] <= causal_offset + np.arange(q.shape[0])[:, None],
                          logits, -np.inf)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("nts,snh->tnh", p / p.sum(-1, keepdims=True), v)


def rel_err(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


class PagedAttentionCases:
    interpret = False

    @pytest.mark.parametrize("group,page_size,num_splits,row_gather", [
        (1, 16, None, None), (2, 64, 2, False), (16, 16, 1, False), (16, 16, 3, False), (16, 64, None, None),
        (16, 16, 3, True), (2, 64, 2, True), (1, 16, 1, True)])
    def test_matches_reference(self, group, page_size, num_splits, row_gather):
        rng = np.random.default_rng([group, page_size, num_splits or 0])
        lengths = [1, page_size, page_size + 1, 5 * page_size + 7]
        pool = make_pool(rng, kv_heads=2, page_size=page_size, lengths=lengths)
        q = jnp.asarray(rng.standard_normal((len(lengths), 2 * group, H)), jnp.bfloat16)
        args = (q, pool["k_pages"], pool["v_pages"], pool["lengths"], pool["page_table"])
        out = paged_attention(*args, num_splits=num_splits, pages_per_block=2, row_gather=row_gather,
                              interpret=self.interpret, _poison=True)
        ref = paged_attention_reference(*args)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert bool(jnp.isfinite(out).all()), "unwritten (NaN-poisoned) or non-finite outputs"
        assert rel_err(out, ref) < 1e-2

    @pytest.mark.parametrize("group,page_size,row_gather,int8_qk", [
        (16, 16, False, False), (2, 64, False, False), (16, 16, True, False), (16, 16, True, True),
        (2, 64, False, True)])
    def test_int8_pages(self, group, page_size, row_gather, int8_qk):
        rng = np.random.default_rng([7, group, page_size])
        lengths = [page_size + 1, 1, 3 * page_size]
        pool = make_pool(rng, kv_heads=2, page_size=page_size, lengths=lengths, quantized=True)
        q = jnp.asarray(rng.standard_normal((len(lengths), 2 * group, H)), jnp.bfloat16)
        args = (q, pool["k_pages"], pool["v_pages"], pool["lengths"], pool["page_table"])
        scales = dict(k_scales=pool["k_scales"], v_scales=pool["v_scales"])
        out = paged_attention(*args, **scales, num_splits=2, pages_per_block=1, row_gather=row_gather,
                              int8_qk=int8_qk, interpret=self.interpret, _poison=True)
        ref = paged_attention_reference(*args, **scales)
        assert bool(jnp.isfinite(out).all())
        assert rel_err(out, ref) < 1e-2
        if int8_qk:  # q.K^T from q's int8 digits: within 1e-3 of the bf16 product, and not the same computation
            other = paged_attention(*args, **scales, num_splits=2, pages_per_block=1, row_gather=row_gather,
                                    int8_qk=False, interpret=self.interpret)
            assert rel_err(out, other) < 1e-3 and not np.array_equal(np.asarray(out), np.asarray(other))
        # The dequantized cache is what it attends over: compare with dense attention on it as well.
        for b, n in enumerate(lengths):
            dense = dense_attention(q[b:b + 1].astype(jnp.float32), pool["k_logical"][b], pool["v_logical"][b],
                                    H ** -0.5)
            assert rel_err(out[b:b + 1], dense) < 2e-2

    @pytest.mark.parametrize("v_gain", [1e-6, 1e7])
    def test_int8_pages_tiny_and_huge_values(self, v_gain):
        # P times the V scales feeds a 16-bit P.V product: V scales of any magnitude must neither sink into
        # subnormals nor overflow (a float16 product without a per-block rescale failed both cases).
        rng = np.random.default_rng([13, int(np.log10(v_gain)) + 6])
        lengths = [40, 3 * 16 + 5]
        pool = make_pool(rng, kv_heads=2, page_size=16, lengths=lengths, quantized=True)
        q = jnp.asarray(rng.standard_normal((len(lengths), 32, H)), jnp.bfloat16)
        args = (q, pool["k_pages"], pool["v_pages"], pool["lengths"], pool["page_table"])
        scales = dict(k_scales=pool["k_scales"], v_scales=pool["v_scales"] * v_gain)
        out = paged_attention(*args, **scales, num_splits=2, pages_per_block=2, interpret=self.interpret,
                              _poison=True)
        assert bool(jnp.isfinite(out).all())
        assert rel_err(out, paged_attention_reference(*args, **scales)) < 1e-2


@pytest.mark.gpu
class TestPagedAttentionGPU(PagedAttentionCases):
    interpret = False

    def test_long_context_many_splits(self):
        rng = np.random.default_rng(11)
        lengths = [8192, 3000, 17]
        pool = make_pool(rng, kv_heads=2, page_size=16, lengths=lengths)
        q = jnp.asarray(rng.standard_normal((3, 32, H)), jnp.bfloat16)
        args = (q, pool["k_pages"], pool["v_pages"], pool["lengths"], pool["page_table"])
        out = paged_attention(*args, _poison=True)
        assert bool(jnp.isfinite(out).all())
        assert rel_err(out, paged_attention_reference(*args)) < 1e-2


class TestPagedAttentionInterpret(PagedAttentionCases):
    interpret = True


# ------------------------------------------------------------------- reference, pages, validation (CPU)
def test_reference_matches_dense_attention():
    rng = np.random.default_rng(3)
    lengths = [1, 16, 17, 90]
    pool = make_pool(rng, kv_heads=2, page_size=16, lengths=lengths, dtype=jnp.float32)
    q = jnp.asarray(rng.standard_normal((4, 8, H)), jnp.float32)
    out = paged_attention_reference(q, pool["k_pages"], pool["v_pages"], pool["lengths"], pool["page_table"],
                                    scale=0.3)
    for b in range(4):
        dense = dense_attention(q[b:b + 1], pool["k_logical"][b], pool["v_logical"][b], 0.3)
        np.testing.assert_allclose(np.asarray(out[b:b + 1]), dense, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("quantized", [False, True])
def test_write_kv_pages_places_tokens_and_skips_negative_slots(quantized):
    rng = np.random.default_rng(5)
    kv_heads, num_pages, page_size = 2, 6, 16
    dtype = jnp.int8 if quantized else jnp.float32
    k_pages = jnp.asarray(rng.integers(-5, 5, (kv_heads, num_pages, page_size, H)), dtype)
    v_pages = k_pages + 1
    scales = {}
    if quantized:
        scales = dict(k_scales=jnp.ones((kv_heads, num_pages, page_size)), v_scales=jnp.ones((kv_heads, num_pages, page_size)))
    slots = np.array([3 * 16 + 0, -1, 5 * 16 + 15, 0 * 16 + 9], np.int32)
    k_new = rng.standard_normal((4, kv_heads, H)).astype(np.float32)
    v_new = rng.standard_normal((4, kv_heads, H)).astype(np.float32)
    res = write_kv_pages(k_pages, v_pages, jnp.asarray(k_new), jnp.asarray(v_new), jnp.asarray(slots), **scales)
    exp_k, exp_v = np.asarray(k_pages, np.float32).copy(), np.asarray(v_pages, np.float32).copy()
    written = np.zeros((num_pages, page_size), bool)
    for t, s in enumerate(slots):
        if s >= 0:
            exp_k[:, s // 16, s % 16], exp_v[:, s // 16, s % 16] = k_new[t], v_new[t]
            written[s // 16, s % 16] = True
    if quantized:
        got_k = np.asarray(dequantize_kv(res[0], res[2]))
        got_v = np.asarray(dequantize_kv(res[1], res[3]))
        np.testing.assert_allclose(got_k[:, written], exp_k[:, written], atol=np.abs(k_new).max() / 127)
        np.testing.assert_allclose(got_v[:, written], exp_v[:, written], atol=np.abs(v_new).max() / 127)
        np.testing.assert_array_equal(np.asarray(res[0])[:, ~written], np.asarray(k_pages)[:, ~written])
    else:
        np.testing.assert_array_equal(np.asarray(res[0]), exp_k)
        np.testing.assert_array_equal(np.asarray(res[1]), exp_v)


def test_quantize_kv_error_bound_and_zero_rows():
    x = jnp.asarray(np.random.default_rng(2).standard_normal((3, 5, H)), jnp.float32).at[0, 0].set(0.0)
    q, s = quantize_kv(x)
    assert q.dtype == jnp.int8 and s.shape == (3, 5) and s.dtype == jnp.float32
    err = np.abs(np.asarray(dequantize_kv(q, s)) - np.asarray(x))
    assert np.all(err <= np.asarray(s)[..., None] / 2 + 1e-7)
    assert float(s[0, 0]) == 1.0 and not np.any(np.asarray(q[0, 0]))


def _small_args(rng=None, n=32, kv_heads=2):
    rng = rng or np.random.default_rng(0)
    pool = make_pool(rng, kv_heads=kv_heads, page_size=16, lengths=[5, 40])
    q = jnp.asarray(rng.standard_normal((2, n, H)), jnp.bfloat16)
    return q, pool


@pytest.mark.parametrize("bad,match", [
    ("heads", "multiple of kv heads"),
    ("table_oob", "outside the pool"),
    ("too_long", "outside 0"),
    ("lengths_dtype", "lengths must be int32"),
    ("scales_missing", "need k_scales"),
])
def test_bad_input_raises_before_launch(bad, match):
    q, pool = _small_args()
    lengths, table = pool["lengths"], pool["page_table"]
    kw = {}
    k_pages, v_pages = pool["k_pages"], pool["v_pages"]
    if bad == "heads":
        q = q[:, :31]
    elif bad == "table_oob":
        table = table.at[1, 2].set(10_000)
    elif bad == "too_long":
        lengths = lengths.at[0].set(table.shape[1] * 16 + 1)
    elif bad == "lengths_dtype":
        lengths = lengths.astype(jnp.int16)
    elif bad == "scales_missing":
        k_pages, v_pages = k_pages.astype(jnp.int8), v_pages.astype(jnp.int8)
    with pytest.raises(ValueError, match=match):
        paged_attention(q, k_pages, v_pages, lengths, table, interpret=True, **kw)


def test_validate_page_table_ignores_unused_entries():
    table = np.array([[2, 0, -1, 99]], np.int32)
    validate_page_table(table, np.array([20], np.int32), num_pages=3, page_size=16)  # uses 2 pages: fine
    with pytest.raises(ValueError, match=r"page_table\[0, 2\] = -1"):
        validate_page_table(table, np.array([33], np.int32), num_pages=3, page_size=16)


def test_traced_inputs_skip_host_checks_but_run():
    q, pool = _small_args()
    f = jax.jit(lambda q, l, t: paged_attention(q, pool["k_pages"], pool["v_pages"], l, t, interpret=True))
    out = f(q, pool["lengths"], pool["page_table"])
    ref = paged_attention_reference(q, pool["k_pages"], pool["v_pages"], pool["lengths"], pool["page_table"])
    assert rel_err(out, ref) < 1e-2


def test_mosaic_tpu_kernel_interpret():
    """The Mosaic TPU kernel (no TPU here: run through the Pallas interpreter), int8 pages, G=2."""
    rng = np.random.default_rng(21)
    lengths = [1, 16, 17, 50]
    pool = make_pool(rng, kv_heads=2, page_size=16, lengths=lengths, quantized=True)
    q = jnp.asarray(rng.standard_normal((4, 4, H)), jnp.bfloat16)
    args = (q, pool["k_pages"], pool["v_pages"], pool["lengths"], pool["page_table"])
    scales = dict(k_scales=pool["k_scales"], v_scales=pool["v_scales"])
    out = paged_attention(*args, **scales, backend="mosaic_tpu", interpret=True, _poison=True)
    assert bool(jnp.isfinite(out).all())
    assert rel_err(out, paged_attention_reference(*args, **scales)) < 1e-2


def test_tuned_table_lookup_carries_programs_and_tokens(monkeypatch):
    from kernels_pallas import paged_attention as pa
    table = {"decode": {"dev": [{"key": dict(batch=8, context=32768, page_size=16, quantized=False, group=16),
                                 "blocks": dict(num_splits=16, pages_per_block=4, num_warps=8, num_stages=2)}]}}
    monkeypatch.setattr(pa, "_tuned_table", lambda: table)
    monkeypatch.setattr(pa, "device_kind", lambda: "dev")
    # Batch 2 at page size 64: same programs in flight (8*16 = 2*64) and tokens per block (4*16 = 1*64).
    blocks = pa.decode_blocks(2, 2, 16, 512, 64, False)
    assert blocks["num_splits"] == 64 and blocks["pages_per_block"] == 1 and blocks["num_warps"] == 8
    assert blocks["pages_per_split"] * blocks["num_splits"] >= 512
    # No entry for int8: the default, still clamped to the pages there are.
    blocks = pa.decode_blocks(1, 2, 16, 3, 16, True)
    assert blocks["num_splits"] * blocks["pages_per_split"] >= 3 and blocks["num_splits"] <= 3
    assert not blocks["int8_qk"]
    # int8_qk is for int8 pages only: asked for on bf16 pages it stays off
    assert pa.decode_blocks(1, 2, 16, 3, 16, True, int8_qk=True)["int8_qk"]
    assert not pa.decode_blocks(1, 2, 16, 3, 16, False, int8_qk=True)["int8_qk"]


def test_committed_decode_table_entries_are_served_as_tuned(monkeypatch):
    """Each decode entry of kernels_pallas/tuned/paged_attention.json, looked up at its own point on its own device
    (GLM-4-9B's 2 kv heads), gives the blocks the tuner timed (its blocks passed explicitly, as the tuner passes
    them): a hand edit or a tuner bug that wrote a key the lookup cannot match, or blocks it cannot take, fails here."""
    from kernels_pallas import paged_attention as pa
    table = pa._tuned_table()
    assert table.get("decode"), "the committed paged-attention table has no decode entries"
    for device, entries in table["decode"].items():
        monkeypatch.setattr(pa, "device_kind", lambda device=device: device)
        for e in entries:
            key = e["key"]
            point = (key["batch"], 2, key["group"], key["context"] // key["page_size"], key["page_size"],
                     key["quantized"])
            timed = pa.decode_blocks(*point, **{"int8_qk": False, **e["blocks"]})  # all seven given: no lookup
            assert pa.decode_blocks(*point) == timed, (device, key)


class MosaicGpuDecodeCases:
    """The Mosaic GPU (Hopper) decode kernel (``paged_attention_mgpu.py``): G = 8 or 16 query heads a KV head
    packed into one wgmma tile, one split writing the output or several merged by XLA, a sequence of one token,
    one that ends mid-page, 64- and 128-key blocks. Unowned page slots hold a large finite value (the kernel needs
    finite values there); an unmasked one would show as a large error."""
    interpret = False
    cases = [(16, 16, [37, 1, 130], dict(num_splits=1)), (16, 16, [37, 130], dict(num_splits=3)),
             (8, 64, [200, 65], dict(num_splits=2))]

    def check(self, group, page_size, lengths, blocks):
        rng = np.random.default_rng([group, page_size, len(lengths)])
        pool = make_pool(rng, kv_heads=2, page_size=page_size, lengths=lengths)
        q = jnp.asarray(rng.standard_normal((len(lengths), 2 * group, H)), jnp.bfloat16)
        kp, vp = (jnp.nan_to_num(pool[k], nan=30.0) for k in ("k_pages", "v_pages"))
        args = (q, kp, vp, pool["lengths"], pool["page_table"])
        out = paged_attention(*args, backend="mosaic_gpu", interpret=self.interpret, **blocks)
        assert out.shape == q.shape and bool(np.isfinite(np.asarray(out, np.float32)).all())
        assert rel_err(out, paged_attention_reference(*args)) < 1e-2

    def test_matches_reference(self):
        for case in self.cases:
            self.check(*case)


# slow: the Mosaic GPU interpreter takes 40-50 s for these two cases on CI's two cores; CI keeps the CUDA lowering of
# every GPU case below, and the GPU class runs them all on a Hopper GPU.
@pytest.mark.slow
class TestMosaicGpuDecodeInterpret(MosaicGpuDecodeCases):
    interpret = True
    # one split and a merge of two (the three-split case runs on the GPU and is lowered for CUDA below)
    cases = [MosaicGpuDecodeCases.cases[0], MosaicGpuDecodeCases.cases[2]]


@pytest.mark.gpu
class TestMosaicGpuDecodeGPU(MosaicGpuDecodeCases):
    cases = MosaicGpuDecodeCases.cases + [
        (16, 16, [4096, 2000, 17, 1], {}), (16, 16, [4096, 2000, 17, 1], dict(pages_per_block=8)),
        (16, 16, [4096, 2000, 17, 1], dict(num_stages=4)),
        (16, 64, [8192], {}), (16, 16, [2048] * 32, {})]


@pytest.mark.parametrize("case", MosaicGpuDecodeCases.cases + TestMosaicGpuDecodeGPU.cases[3:4], ids=str)
def test_mosaic_gpu_decode_lowers_for_cuda(case):
    """Lowered for CUDA on this machine (jax.export): the wgmma and layout code that interpret mode skips."""
    group, page_size, lengths, blocks = case
    pool = make_pool(np.random.default_rng(0), kv_heads=2, page_size=page_size, lengths=lengths)
    q = jnp.zeros((len(lengths), 2 * group, H), jnp.bfloat16)
    args = (q, pool["k_pages"], pool["v_pages"], pool["lengths"], pool["page_table"])
    f = jax.jit(lambda *a: paged_attention(*a, backend="mosaic_gpu", **blocks))
    module = jax.export.export(f, platforms=["cuda"])(*args).mlir_module()
    assert "mosaic_gpu" in module and "wgmma.mma_async" in module


def test_mosaic_gpu_decode_rejects_what_it_does_not_take():
    rng = np.random.default_rng(1)
    pool = make_pool(rng, kv_heads=2, page_size=16, lengths=[20], quantized=True)
    q = jnp.zeros((1, 32, H), jnp.bfloat16)
    with pytest.raises(ValueError, match="int8 pages run on 'triton'"):
        paged_attention(q, pool["k_pages"], pool["v_pages"], pool["lengths"], pool["page_table"],
                        k_scales=pool["k_scales"], v_scales=pool["v_scales"], backend="mosaic_gpu")
    pool = make_pool(rng, kv_heads=2, page_size=16, lengths=[20])
    args = (pool["k_pages"], pool["v_pages"], pool["lengths"], pool["page_table"])
    with pytest.raises(ValueError, match="G = N / K a multiple of 8"):
        paged_attention(jnp.zeros((1, 8, H), jnp.bfloat16), *args, backend="mosaic_gpu")
    with pytest.raises(ValueError, match="key blocks of 64, 128 or 256 keys"):
        paged_attention(q, *args, pages_per_block=2, backend="mosaic_gpu")


@pytest.mark.parametrize("quantized,blocks", [(False, dict(row_gather=True, num_splits=2)),
                                              (False, dict(row_gather=False, num_splits=1)),
                                              (True, dict(row_gather=True, num_splits=2, int8_qk=True))], ids=str)
def test_triton_decode_lowers_for_cuda(quantized, blocks):
    """The Triton decode kernel's GPU-only code (the masked gather of V rows, the ex2.approx inline PTX), which
    interpret mode replaces, lowered for CUDA on this machine (jax.export: Pallas -> Triton IR)."""
    pool = make_pool(np.random.default_rng(0), kv_heads=2, page_size=16, lengths=[37, 130], quantized=quantized)
    args = (jnp.zeros((2, 32, H), jnp.bfloat16), pool["k_pages"], pool["v_pages"], pool["lengths"],
            pool["page_table"], pool["k_scales"], pool["v_scales"])
    f = jax.jit(lambda q, kp, vp, lengths, table, ks, vs: paged_attention(
        q, kp, vp, lengths, table, k_scales=ks, v_scales=vs, backend="triton", pages_per_block=2, num_warps=4,
        num_stages=2, prefetch_ids=True, **blocks))
    check = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")  # lowered, never serialized
    module = jax.export.export(f, platforms=["cuda"], disabled_checks=[check])(*args).mlir_module()
    assert module.count("xla.gpu.triton") == (1 if blocks["num_splits"] == 1 else 2)  # the kernel (+ combine)


def test_keys_minor_v_experiment_matches_reference_and_lowers():
    """``experiments/diag_int8_vt_decode.py`` (the decode kernel's experimental ``v_keys_minor`` option, V pages
    [K, P, H, L]): interpret mode against the reference, and its GPU form lowered for CUDA."""
    from experiments.diag_int8_vt_decode import check, decode_vt, keys_minor

    assert all(row["rel_err"] < 1e-2 for row in check(interpret=True))
    pool = make_pool(np.random.default_rng(1), kv_heads=2, page_size=64, lengths=[130, 64], quantized=True)
    args = (jnp.zeros((2, 32, H), jnp.bfloat16), pool["k_pages"], keys_minor(pool["v_pages"]), pool["lengths"],
            pool["page_table"], pool["k_scales"], pool["v_scales"])
    f = jax.jit(lambda *a: decode_vt(*a, num_splits=2))
    check_ = jax.export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    module = jax.export.export(f, platforms=["cuda"], disabled_checks=[check_])(*args).mlir_module()
    assert "_vkm" in module
    from kernels_pallas.paged_attention import _decode_triton

    blocks = dict(pages_per_block=2, pages_per_split=2, num_splits=1, num_warps=4, num_stages=2, prefetch_ids=True,
                  row_gather=False, int8_qk=True, v_keys_minor=True)
    with pytest.raises(ValueError, match="v_keys_minor .* pages_per_block 1"):  # a block of one page only
        _decode_triton(*args, scale=1.0, blocks=blocks, interpret=True, poison=False)
