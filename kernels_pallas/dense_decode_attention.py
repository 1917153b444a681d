"""Decode attention over a dense KV cache that also writes the new token's key and value into it, in one launch.

Public: ``dense_decode_attention`` (dispatch), ``dense_decode_attention_reference`` (plain jnp, the truth); from
whole projection rows, RoPE applied in the kernel: ``dense_decode_attention_rows`` (``..._rows_reference``).

One query token per sequence: q [B, N, H] at positions [B] (the new token's slot); k_new, v_new [B, K, H] (RoPE
applied, the cache's dtype); caches [B, K, S, H], slot ``s`` of row ``b`` holding position ``s``. Returns
``(out [B, N, H], cache_k, cache_v)`` with ``k_new``/``v_new`` written at slot ``positions[b]`` (positions are
>= 0; the write is dropped when ``positions[b] >= S``, and the new token then not attended), the query attending
to slots ``0..positions[b]``.

Rows: qkv [B, N + 2K, H] (q heads, k heads, v heads; bias added, RoPE not applied; the cache's dtype) and tables
rope_cos, rope_sin [B, H] (``autoglm_jax.model.rope.rope_tables``): q and k_new become ``rotate_pairs`` =
``x * cos + swap(x) * sin`` (swap exchanges features 2i and 2i+1; the sign lives in sin) in float32, rounded once;
so the model's projection ends in one XLA fusion (GEMM partials + bias) instead of three that rotate and split.

GPU kernel (Pallas, Triton lowering; grid (B, K, splits)): program (b, k, s) loads the G query heads of kv head k
once ([G, H], G padded to 16 rows for the tensor cores) and streams ``block_s`` cached keys/values at a time
from the s-th of ``splits`` equal parts of slots ``0..p-1`` (``p = positions[b]``), with an online softmax in
float32; the last split also takes the new token from ``k_new``/``v_new`` (registers, not the cache), so no
program reads the slot being written. Every split writes the new row into the cache through aliased outputs
(the same bytes, so the order does not matter). With one split the kernel writes the normalized output; with
several, each writes its normalized partial output and log-sum-exp and ``decode_combine.combine_reference`` merges them
in XLA (at one row, with ``digits``, ``decode_combine.combine_planes`` in one launch that writes o_proj's digit
planes too):
``out = sum_s e^(lse_s - M) o_s / sum_s e^(lse_s - M)``; an empty split carries lse = -1e30 and weighs nothing.
Replaces, in a GLM decode step, XLA's two cache scatters, two batched GEMMs and a three-kernel softmax. The rows
kernel loads its heads from row b of qkv (q: a masked 16-row tile when G < 16) and the pair-swapped copy of q and k
by a second load of the same bytes with column index ``c ^ 1`` (an L1 hit; building a 0/1 permutation matrix for a
product, as before, was a quarter of a batch-32 program's instructions).

Block sizes (keyword-only, static): splits, block_s, num_warps, num_stages; when None they come from
kernels_pallas/tuned/dense_decode_attention.json (written by experiments/tune_dense_decode_attention.py; nearest
batch on this device), else defaults (splits: about two programs per SM of an H100, at least 64 slots each;
block_s 64, 4 warps, 2 stages).
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

from .decode_combine import combine_planes, combine_reference
from .paged_attention import device_kind
from .tuned_device import rows_for

MASK_VALUE = -1e30  # finite: an empty split stays NaN-free
BACKENDS = ("triton", "reference")
_TARGET_PROGRAMS = 264  # about two per SM of an H100 (132 SMs)
TUNED_PATH = Path(__file__).with_name("tuned") / "dense_decode_attention.json"


@functools.lru_cache(maxsize=4)
def load_table(path: str = str(TUNED_PATH)) -> tuple:
    """-> the tuned entries (dicts with device, batch, max_len, blocks); () when there is no table."""
    try:
        return tuple(json.loads(Path(path).read_text()).get("entries", ()))
    except FileNotFoundError:
        return ()


def tuned_blocks(batch: int) -> dict:
    """The tuned block sizes of the nearest batch (log scale) on this device, or {} (then defaults apply)."""
    entries = rows_for(load_table(), device_kind())  # this device's rows, else a sibling chip's
    if not entries:
        return {}
    return dict(min(entries, key=lambda e: abs(math.log2(e["batch"]) - math.log2(max(batch, 1))))["blocks"])


def dense_decode_attention_reference(q, k_new, v_new, cache_k, cache_v, positions, *, scale: float):
    """Plain jnp: write k_new/v_new at ``positions`` (dropped out of range), then softmax attention of q over
    slots ``0..positions[b]`` in float32 (probabilities cast to the cache dtype for the second product, as the
    model's XLA path does)."""
    b, n, h = q.shape
    kh = cache_k.shape[1]
    rows = jnp.arange(b)
    ck = cache_k.at[rows, :, positions].set(k_new.astype(cache_k.dtype), mode="drop")
    cv = cache_v.at[rows, :, positions].set(v_new.astype(cache_v.dtype), mode="drop")
    qg = q.reshape(b, kh, n // kh, h)  # [B, K, G, H]
    logits = jnp.einsum("bkgh,bksh->bkgs", qg, ck.astype(q.dtype), preferred_element_type=jnp.float32) * scale
    mask = jnp.arange(ck.shape[2])[None, :] <= positions[:, None]  # [B, S]
    logits = jnp.where(mask[:, None, None, :], logits, MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1).astype(cv.dtype)
    out = jnp.einsum("bkgs,bksh->bkgh", probs, cv, preferred_element_type=jnp.float32)
    return out.reshape(b, n, h).astype(q.dtype), ck, cv


def rotate_pairs(x, cos, sin):
    """``x * cos + swap(x) * sin`` in float32, rounded once to x's dtype; ``swap`` exchanges features 2i and 2i+1
    of the last axis; cos / sin broadcast against x."""
    xf = x.astype(jnp.float32)
    swapped = xf.reshape(*x.shape[:-1], -1, 2)[..., ::-1].reshape(x.shape)
    return (xf * cos.astype(jnp.float32) + swapped * sin.astype(jnp.float32)).astype(x.dtype)


def dense_decode_attention_rows_reference(qkv, cache_k, cache_v, positions, rope_cos, rope_sin, *, scale: float):
    """Plain jnp: rotate the q and k heads of qkv [B, N + 2K, H] with the [B, H] tables (``rotate_pairs``), then
    ``dense_decode_attention_reference``."""
    kh = cache_k.shape[1]
    n = qkv.shape[1] - 2 * kh
    rot = rotate_pairs(qkv[:, :n + kh], rope_cos[:, None], rope_sin[:, None])
    return dense_decode_attention_reference(rot[:, :n], rot[:, n:], qkv[:, n + kh:], cache_k, cache_v, positions,
                                            scale=scale)


def _attend(q, kn, vn, p, kc_ref, vc_ref, o_ref, lse_ref, kc_out, vc_out, *, splits: int, block_s: int,
            max_len: int, scale: float):
    """The body of both kernels: q [G16, H] (the program's query heads), kn / vn [1, H] (the new row, the cache's
    dtype), p (the row's position)."""
    s = pl.program_id(2)
    length = jnp.clip(p, 0, max_len)  # cached slots 0..length-1 are attended from the cache
    lands = (p >= 0) & (p < max_len)  # the new row's write lands in the cache (else it is dropped)
    chunk = pl.cdiv(pl.cdiv(length, splits), block_s) * block_s  # block-aligned: no load crosses the cache end
    start = s * chunk
    end = jnp.minimum(start + chunk, length)
    steps = pl.cdiv(jnp.maximum(end - start, 0), block_s)
    gp, h = q.shape

    def body(i, carry):
        m, l, acc = carry
        first = start + i * block_s
        valid = first + jnp.arange(block_s) < end  # [BS]
        kt = pltriton.load(kc_ref.at[pl.ds(first, block_s), :], mask=valid[:, None], other=0)  # [BS, H]
        vt = pltriton.load(vc_ref.at[pl.ds(first, block_s), :], mask=valid[:, None], other=0)
        logits = lax.dot_general(q, kt.astype(q.dtype), (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32) * scale  # [G16, BS]
        logits = jnp.where(valid[None, :], logits, MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(logits, axis=1))
        prob = jnp.exp(logits - m_new[:, None])
        alpha = jnp.exp(m - m_new)
        acc = acc * alpha[:, None] + jnp.dot(prob.astype(vt.dtype), vt, preferred_element_type=jnp.float32)
        return m_new, l * alpha + jnp.sum(prob, axis=1), acc

    init = (jnp.full((gp,), MASK_VALUE, jnp.float32), jnp.zeros((gp,), jnp.float32),
            jnp.zeros((gp, h), jnp.float32))
    m, l, acc = lax.fori_loop(0, steps, body, init)
    # the new token, from registers: the last split only, and only when its write lands in the cache
    logit = jnp.sum(q.astype(jnp.float32) * kn.astype(jnp.float32), axis=1) * scale  # [G16]
    logit = jnp.where((s == splits - 1) & lands, logit, MASK_VALUE)
    m_new = jnp.maximum(m, logit)
    alpha, pn = jnp.exp(m - m_new), jnp.exp(logit - m_new)
    acc = acc * alpha[:, None] + pn[:, None] * vn.astype(jnp.float32)
    l = l * alpha + pn
    safe = jnp.maximum(l, 1e-30)
    o_ref[...] = (acc / safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l > 0, m_new + jnp.log(safe), MASK_VALUE)
    # the new row, written by every split (the same bytes); dropped past the cache
    row = jnp.full((1, h), lands)
    at = jnp.clip(p, 0, max_len - 1)
    pltriton.store(kc_out.at[pl.ds(at, 1), :], kn, mask=row)
    pltriton.store(vc_out.at[pl.ds(at, 1), :], vn, mask=row)


def _kernel(pos_ref, q_ref, kn_ref, vn_ref, kc_ref, vc_ref, *refs, poisoned: bool, **kw):
    outs = refs[2:] if poisoned else refs  # poisoned: two input views of o, lse first
    _attend(q_ref[...], kn_ref[...][None, :], vn_ref[...][None, :], pos_ref[pl.program_id(0)], kc_ref, vc_ref,
            *outs, **kw)


def _rows_kernel(pos_ref, qkv_ref, cos_ref, sin_ref, kc_ref, vc_ref, *refs, groups: int, padded: int,
                 kv_heads: int, poisoned: bool, **kw):
    outs = refs[2:] if poisoned else refs
    k = pl.program_id(1)
    n, h = groups * kv_heads, qkv_ref.shape[1]
    cos, sin = cos_ref[...].astype(jnp.float32)[None, :], sin_ref[...].astype(jnp.float32)[None, :]

    def rotated(first, rows, mask=None):
        """Rows first .. first + rows - 1 of qkv, RoPE applied (``rotate_pairs``): the pair-swapped copy is a second
        load of the same bytes with column index c ^ 1 (an L1 hit)."""
        at = jnp.broadcast_to(first + jnp.arange(rows)[:, None], (rows, h))
        swap = jnp.broadcast_to(jnp.arange(h)[None, :] ^ 1, (rows, h))
        other = None if mask is None else 0
        x = pltriton.load(qkv_ref.at[pl.ds(first, rows), :], mask=mask, other=other).astype(jnp.float32)
        xs = pltriton.load(qkv_ref.at[at, swap], mask=mask, other=other).astype(jnp.float32)
        return (x * cos + xs * sin).astype(qkv_ref.dtype)

    q = rotated(k * groups, padded, (jnp.arange(padded) < groups)[:, None])  # rows past the G heads: zeros (dropped)
    kn = rotated(n + k, 1)  # [1, H]
    vn = qkv_ref[pl.ds(n + kv_heads + k, 1), :]
    _attend(q, kn, vn, pos_ref[pl.program_id(0)], kc_ref, vc_ref, *outs, **kw)


def default_splits(batch: int, kv_heads: int, max_len: int) -> int:
    """Enough programs for about two per SM, with at least 64 slots per split."""
    want = max(1, round(_TARGET_PROGRAMS / (batch * kv_heads)))
    return max(1, min(want, max_len // 64))


def _check_caches(cache_k, cache_v, positions, b: int, h: int, given: str) -> None:
    if cache_k.ndim != 4 or cache_k.shape != cache_v.shape or cache_k.dtype != cache_v.dtype:
        raise ValueError(f"cache_k and cache_v must be equal [B, K, S, H] arrays; got {cache_k.dtype} "
                         f"{cache_k.shape} and {cache_v.dtype} {cache_v.shape}")
    if cache_k.shape[0] != b or cache_k.shape[3] != h:
        raise ValueError(f"caches [B, K, S, H] = {cache_k.shape} do not match {given}")
    if positions.shape != (b,) or not jnp.issubdtype(positions.dtype, jnp.integer):
        raise ValueError(f"positions must be an integer [B] = ({b},) array; got {positions.dtype} {positions.shape}")
    if h & (h - 1) or h < 16:
        raise ValueError(f"head_dim H={h} must be a power of two >= 16 for the GPU kernel")


def check_inputs(q, k_new, v_new, cache_k, cache_v, positions) -> None:
    """Raise ValueError naming the mismatch, before any device work."""
    if q.ndim != 3:
        raise ValueError(f"q must be [B, N, H]; got shape {q.shape}")
    b, n, h = q.shape
    _check_caches(cache_k, cache_v, positions, b, h, f"q [B, N, H] = {q.shape}")
    kh = cache_k.shape[1]
    if n % kh:
        raise ValueError(f"query heads N={n} must be a multiple of the cache's KV heads K={kh}")
    for name, x in (("k_new", k_new), ("v_new", v_new)):
        if x.shape != (b, kh, h):
            raise ValueError(f"{name} must be [B, K, H] = {(b, kh, h)}; got {x.shape}")


def check_rows_inputs(qkv, cache_k, cache_v, positions, rope_cos, rope_sin) -> None:
    """Raise ValueError naming the mismatch, before any device work."""
    if qkv.ndim != 3:
        raise ValueError(f"qkv must be [B, N + 2K, H]; got shape {qkv.shape}")
    b, r, h = qkv.shape
    _check_caches(cache_k, cache_v, positions, b, h, f"qkv [B, N + 2K, H] = {qkv.shape}")
    kh = cache_k.shape[1]
    if r % kh or r < 3 * kh:
        raise ValueError(f"qkv must hold N + 2K heads with N = G * K query heads (G >= 1) for the cache's K={kh} "
                         f"KV heads: a multiple of {kh}, at least {3 * kh}; got {r}")
    if qkv.dtype != cache_k.dtype:
        raise ValueError(f"qkv must be in the cache's dtype {cache_k.dtype}; got {qkv.dtype}")
    for name, t in (("rope_cos", rope_cos), ("rope_sin", rope_sin)):
        if t.shape != (b, h) or not jnp.issubdtype(t.dtype, jnp.floating):
            raise ValueError(f"{name} must be a float [B, H] = {(b, h)} array; got {t.dtype} {t.shape}")


@functools.partial(jax.jit, static_argnames=("rows", "groups", "scale", "splits", "block_s", "num_warps",
                                             "num_stages", "interpret", "poison", "planes"))
def _triton(heads, cache_k, cache_v, positions, *, rows, groups, scale, splits, block_s, num_warps, num_stages,
            interpret, poison, planes=False):
    """heads: (q, k_new, v_new), or with ``rows`` (qkv, rope_cos, rope_sin); planes (``planes_apply``): the split
    outputs are combined by ``decode_combine.combine_planes``, which writes out's digit planes too (a fourth
    result; None without)."""
    b, kh, s_len, h = cache_k.shape
    gp = max(16, 1 << (groups - 1).bit_length())  # query rows per program: the tensor cores' smallest tile
    if rows:
        kernel = functools.partial(_rows_kernel, groups=groups, padded=gp, kv_heads=kh)
        table_spec = pl.BlockSpec((None, h), lambda i, k, s: (i, 0))
        head_specs = [pl.BlockSpec((None, *heads[0].shape[1:]), lambda i, k, s: (i, 0, 0)), table_spec, table_spec]
        dtype = heads[0].dtype
    else:
        q, k_new, v_new = heads
        qg = jnp.pad(q.reshape(b, kh, groups, h), ((0, 0), (0, 0), (0, gp - groups), (0, 0)))  # [B, K, G16, H]
        heads, kernel, dtype = (qg, k_new.astype(cache_k.dtype), v_new.astype(cache_v.dtype)), _kernel, q.dtype
        new_spec = pl.BlockSpec((None, None, h), lambda i, k, s: (i, k, 0))
        head_specs = [pl.BlockSpec((None, None, gp, h), lambda i, k, s: (i, k, 0, 0)), new_spec, new_spec]
    cache_spec = pl.BlockSpec((None, None, s_len, h), lambda i, k, s: (i, k, 0, 0))
    in_specs = [pl.BlockSpec(), *head_specs, cache_spec, cache_spec]  # positions whole
    out_specs = [pl.BlockSpec((None, None, None, gp, h), lambda i, k, s: (i, k, s, 0, 0)),
                 pl.BlockSpec((None, None, None, gp), lambda i, k, s: (i, k, s, 0)), cache_spec, cache_spec]
    out_shape = [jax.ShapeDtypeStruct((b, kh, splits, gp, h), dtype if splits == 1 and not planes else jnp.float32),
                 jax.ShapeDtypeStruct((b, kh, splits, gp), jnp.float32),
                 jax.ShapeDtypeStruct(cache_k.shape, cache_k.dtype), jax.ShapeDtypeStruct(cache_v.shape, cache_v.dtype)]
    args = [positions.astype(jnp.int32), *heads, cache_k, cache_v]
    aliases = {4: 2, 5: 3}
    if poison:  # tests: NaN-filled output buffers that the kernel must overwrite everywhere
        args += [jnp.full(o.shape, jnp.nan, o.dtype) for o in out_shape[:2]]
        in_specs += out_specs[:2]
        aliases.update({6: 0, 7: 1})
    kernel = functools.partial(kernel, splits=splits, block_s=block_s, max_len=s_len, scale=scale, poisoned=poison)
    o, lse, ck, cv = pl.pallas_call(
        kernel, grid=(b, kh, splits), in_specs=in_specs, out_specs=out_specs, out_shape=out_shape,
        input_output_aliases=aliases,
        compiler_params=pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret, name="dense_decode_attention_rows" if rows else "dense_decode_attention",
    )(*args)
    if planes:  # b == 1, gp == groups
        out, digits = combine_planes(o, lse, dtype=dtype, interpret=interpret)
        return out, ck, cv, digits
    out = o[:, :, 0] if splits == 1 else combine_reference(o, lse).astype(dtype)  # [B, K, G16, H]
    return out[:, :, :groups].reshape(b, kh * groups, h), ck, cv, None


def planes_apply(batch: int, groups: int, head_dim: int, digits: int | None) -> bool:
    """Whether the kernel's combine writes its output's digit planes of group ``digits``: one row, the G query
    heads of a KV head filling the 16-row tile exactly and G in powers of two (so a program's rows are whole
    heads), and the planes' group one head (``digits == H``)."""
    return digits is not None and batch == 1 and groups >= 16 and not groups & (groups - 1) and digits == head_dim


def _blocks(cache_k, backend, splits, block_s, num_warps, num_stages, interpret: bool) -> dict | None:
    """The launch's block sizes (those given, else tuned, else defaults; validated), or None for the reference."""
    if backend is None:
        backend = "triton" if (interpret or jax.default_backend() == "gpu") else "reference"
    if backend not in BACKENDS:
        raise ValueError(f"backend={backend!r}; allowed: {BACKENDS}")
    if backend == "reference":
        return None
    b, kh, s_len, _ = cache_k.shape
    tuned = {} if interpret else tuned_blocks(b)
    splits = tuned.get("splits", default_splits(b, kh, s_len)) if splits is None else splits
    block_s = tuned.get("block_s", 64) if block_s is None else block_s
    num_warps = tuned.get("num_warps", 4) if num_warps is None else num_warps
    num_stages = tuned.get("num_stages", 2) if num_stages is None else num_stages
    if not isinstance(splits, int) or splits < 1 or block_s < 16 or block_s & (block_s - 1):
        raise ValueError(f"splits must be a positive int and block_s a power of two >= 16; got splits={splits}, "
                         f"block_s={block_s}")
    if s_len % 16:
        raise ValueError(f"the GPU kernel needs the cache length S={s_len} to be a multiple of 16")
    while s_len % block_s:  # block-aligned splits must tile the cache exactly
        block_s //= 2
    return dict(splits=splits, block_s=block_s, num_warps=num_warps, num_stages=num_stages,
                interpret=interpret)


def dense_decode_attention(q, k_new, v_new, cache_k, cache_v, positions, *, scale: float | None = None,
                           backend: str | None = None, splits: int | None = None, block_s: int | None = None,
                           num_warps: int | None = None, num_stages: int | None = None, interpret: bool = False,
                           _poison: bool = False):
    """Decode attention over a dense [B, K, S, H] cache plus the write of the new token (module docstring).

    backend: "triton" (default on GPU, or with ``interpret=True``) or "reference" (default elsewhere).
    Donate the caches to the enclosing jit so the written caches reuse their buffers. _poison (tests): the
    kernel writes its outputs into NaN-filled buffers, so unwritten elements show.
    """
    check_inputs(q, k_new, v_new, cache_k, cache_v, positions)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    blocks = _blocks(cache_k, backend, splits, block_s, num_warps, num_stages, interpret)
    if blocks is None:
        return dense_decode_attention_reference(q, k_new, v_new, cache_k, cache_v, positions, scale=scale)
    return _triton((q, k_new, v_new), cache_k, cache_v, positions, rows=False, groups=q.shape[1] // cache_k.shape[1],
                   scale=scale, poison=_poison, **blocks)[:3]


def dense_decode_attention_rows(qkv, cache_k, cache_v, positions, rope_cos, rope_sin, *, scale: float | None = None,
                                backend: str | None = None, splits: int | None = None, block_s: int | None = None,
                                num_warps: int | None = None, num_stages: int | None = None,
                                interpret: bool = False, digits: int | None = None, _poison: bool = False):
    """``dense_decode_attention`` from whole projection rows qkv [B, N + 2K, H], q and k_new rotated in the kernel
    with the rope_cos / rope_sin [B, H] tables (module docstring); the rotated k_new is what the cache gets.
    Returns ``(out [B, N, H] in qkv's dtype, cache_k, cache_v)``; the other arguments as there. ``digits``: the
    planes group that out's consumer takes (``act_digits``): a fourth result, out's ``ActDigits`` viewed [B, N H]
    written by the combine (``decode_combine.combine_planes``) where ``planes_apply`` holds, else None."""
    check_rows_inputs(qkv, cache_k, cache_v, positions, rope_cos, rope_sin)
    scale = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
    blocks = _blocks(cache_k, backend, splits, block_s, num_warps, num_stages, interpret)
    groups = qkv.shape[1] // cache_k.shape[1] - 2
    if blocks is None:
        res = dense_decode_attention_rows_reference(qkv, cache_k, cache_v, positions, rope_cos, rope_sin,
                                                    scale=scale)
        return res if digits is None else (*res, None)
    planes = planes_apply(qkv.shape[0], groups, qkv.shape[2], digits)
    res = _triton((qkv, rope_cos, rope_sin), cache_k, cache_v, positions, rows=True, groups=groups, scale=scale,
                  poison=_poison, planes=planes, **blocks)
    return res[:3] if digits is None else res
