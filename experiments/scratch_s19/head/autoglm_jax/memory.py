"""Memory model: predicts device memory of a serving setup before anything is allocated.

Three parts (all in bytes; shape letters as in the README):

1. **Parameters.** Every tensor of ``GLMConfig``: embed [V, D]; per layer qkv_proj [D, (N+2K)H] (+ bias),
   o_proj [N*H, D], gate_up_proj [D, 2F], down_proj [F, D], 2 norms [D] (4 with post-norms); final norm [D];
   lm_head [D, V] unless tied. Float tensors take ``dtype`` bytes. Quantized linears (``QuantSpec.targets``,
   default the four per-layer projections; embeddings, LM head, norms and biases stay float unless listed):

   * int8 per output channel: ``I*O*1 + O*4`` (float32 scale per output channel);
   * int4 grouped along I (group g): ``ceil(I*O/2) + ceil(I/g)*O*s`` (+ the same again for zero points),
     s = bytes of the scale dtype.

2. **KV cache.** Per token per layer ``2 * K * H * b`` (b = KV dtype bytes); int8 KV adds a float32 scale
   per token per head for K and for V: ``+ 2 * K * 4``. A page holds L tokens of every layer:
   ``page_bytes = L * layers * kv_bytes_per_token_per_layer``. The seed's example (32 layers, K = 32,
   H = 128, T = 2048, float32) is 2 * 2048 * 32 * 128 * 4 * 32 = 2.147e9 bytes.

3. **Activation workspace** of one engine step with M = max(chunk, batch) tokens and R logits rows
   (default R = batch: the engine runs the LM head only on the rows it samples), a = ``dtype`` bytes::

       resid     = 2 * M * D * a                          residual stream + normed input
       attention = M * (N + 2K) * H * a + M * N * H * a   fused qkv output + attention output
       mlp       = M * 2F * a + M * F * a                 gate|up output + SwiGLU product
       head      = R * V * (a + 4) + R * V * (4 + 4)      logits (dtype + float32) + sort buffers for top-k/p
       workspace = resid + max(attention, mlp, head)

   Layers run one after another, so only one layer's intermediates live at a time. Attention itself is
   flash-style (paged kernel, no [T, S] scores). XLA's fusion may lower the peak; this is an upper estimate.

4. **Tensor parallelism** (``tensor=t``, the engine on a ``make_mesh(tensor=t)`` mesh): every number is per
   device. KV heads are first repeated to K' = max(K, t) (``sharding.shard_model``), then each device holds
   K'/t of them: ``kv_bytes_per_token_per_layer = 2 * (K'/t) * H * b`` (+ ``2 * (K'/t) * 4`` for int8).
   Weight matrices and biases are split t ways (column-parallel qkv / gate_up / LM head / embedding,
   row-parallel o_proj / down_proj, with K' KV heads in qkv), norms are replicated; quantized scales are
   counted split too (an estimate: row-parallel int4 scales are in fact replicated). Workspace: the
   residual stream is replicated, the attention and MLP intermediates and the logits are split t ways, the
   float32 sort buffers of top-k/p are counted whole.

From ``free_bytes`` the plan reserves ``headroom`` (fragmentation, compiler scratch), subtracts parameters
and workspace, and gives the rest to KV pages: ``num_pages = rest // page_bytes`` (page 0 is the null page).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Sequence

from .config import GLMConfig, PRESETS

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
KV_DTYPE_BYTES = {**DTYPE_BYTES, "int8": 1}
LINEARS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj", "lm_head", "embed")
DEFAULT_TARGETS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
GiB = 1024 ** 3


@dataclasses.dataclass(frozen=True, kw_only=True)
class QuantSpec:
    method: str                          # "int8" (per output channel) | "int4" (grouped along I)
    group_size: int = 128                # int4 only
    scale_dtype: str = "float32"         # int4 scales (int8 scales are always float32)
    zero_point: bool = False             # int4: asymmetric, zeros stored like scales
    targets: tuple[str, ...] = DEFAULT_TARGETS

    def __post_init__(self):
        if self.method not in ("int8", "int4"):
            raise ValueError(f"quantization method {self.method!r} is unknown; allowed: 'int8', 'int4'")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r} must be a positive integer")
        if self.scale_dtype not in DTYPE_BYTES:
            raise ValueError(f"scale_dtype={self.scale_dtype!r} is unknown; allowed: {sorted(DTYPE_BYTES)}")
        targets = tuple(self.targets)
        unknown = set(targets) - set(LINEARS)
        if unknown:
            raise ValueError(f"unknown quantization targets {sorted(unknown)}; allowed: {LINEARS}")
        object.__setattr__(self, "targets", targets)

    def linear_bytes(self, i: int, o: int) -> int:
        """Bytes of a quantized kernel [I, O] with its scales (and zeros)."""
        if self.method == "int8":
            return i * o + o * 4
        groups = math.ceil(i / self.group_size) * o
        return math.ceil(i * o / 2) + groups * DTYPE_BYTES[self.scale_dtype] * (2 if self.zero_point else 1)


def _quant(quant) -> QuantSpec | None:
    if quant is None or quant == "none":
        return None
    if isinstance(quant, QuantSpec):
        return quant
    if isinstance(quant, str):
        return QuantSpec(method=quant)
    raise ValueError(f"quant={quant!r} must be None, 'int8', 'int4' or a QuantSpec")


def _bytes_of(dtype: str, table: dict, what: str) -> int:
    if dtype not in table:
        raise ValueError(f"{what}={dtype!r} is unknown; allowed: {sorted(table)}")
    return table[dtype]


def _tensor(tensor) -> int:
    if not isinstance(tensor, int) or isinstance(tensor, bool) or tensor < 1:
        raise ValueError(f"tensor={tensor!r} must be a positive integer (the tensor-parallel degree)")
    return tensor


def _tp_config(cfg: GLMConfig, tensor: int) -> GLMConfig:
    """``cfg`` with its KV heads repeated to K' = max(K, t), as ``sharding.shard_model`` lays them out."""
    k = max(cfg.num_kv_heads, tensor)
    return cfg if k == cfg.num_kv_heads else cfg.replace(num_kv_heads=k)


def param_bytes(cfg: GLMConfig, *, dtype: str, quant=None, tensor: int = 1) -> dict[str, int]:
    """Parameter bytes per group: embed, attention, mlp, norms, lm_head (per device with ``tensor`` > 1)."""
    a = _bytes_of(dtype, DTYPE_BYTES, "dtype")
    q = _quant(quant)
    t = _tensor(tensor)
    cfg = _tp_config(cfg, t)
    d, f, v, h = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.head_dim
    n, layers = cfg.num_heads, cfg.num_layers

    def linear(name, i, o):
        return q.linear_bytes(i, o) if q is not None and name in q.targets else i * o * a

    attn = linear("qkv_proj", d, cfg.qkv_size) + linear("o_proj", n * h, d)
    attn += cfg.qkv_size * a if cfg.attention_bias else 0
    mlp = linear("gate_up_proj", d, 2 * f) + linear("down_proj", f, d)
    norms = (layers * (4 if cfg.post_norms else 2) + 1) * d * a
    # The embedding table [V, D] is quantized per row (channel = token), like a linear with I = D, O = V.
    embed = linear("embed", d, v)
    head = 0 if cfg.tie_word_embeddings else linear("lm_head", d, v)
    split = lambda x: -(-x // t)
    return {"embed": split(embed), "attention": layers * split(attn), "mlp": layers * split(mlp), "norms": norms,
            "lm_head": split(head)}


def kv_bytes_per_token_per_layer(cfg: GLMConfig, kv_dtype: str, *, tensor: int = 1) -> int:
    """K and V of one token in one layer (on each device with ``tensor`` > 1: K'/t heads)."""
    b = _bytes_of(kv_dtype, KV_DTYPE_BYTES, "kv_dtype")
    t = _tensor(tensor)
    heads = -(-_tp_config(cfg, t).num_kv_heads // t)
    per = 2 * heads * cfg.head_dim * b
    if kv_dtype == "int8":
        per += 2 * heads * 4  # a float32 scale per token per head, for K and for V
    return per


def kv_cache_bytes(cfg: GLMConfig, *, kv_dtype: str, tokens: int) -> int:
    """KV bytes of ``tokens`` tokens over all layers (no paging)."""
    return tokens * cfg.num_layers * kv_bytes_per_token_per_layer(cfg, kv_dtype)


def workspace_bytes(cfg: GLMConfig, *, dtype: str, batch: int, chunk: int, logits_rows: int | None = None,
                    tensor: int = 1) -> dict[str, int]:
    """Activation workspace of one step (see the module docstring); keys resid/attention/mlp/head/total."""
    a = _bytes_of(dtype, DTYPE_BYTES, "dtype")
    t = _tensor(tensor)
    cfg = _tp_config(cfg, t)
    m = max(chunk, batch)
    r = batch if logits_rows is None else logits_rows
    d, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    split = lambda x: -(-x // t)
    out = {
        "resid": 2 * m * d * a,
        "attention": split(m * cfg.qkv_size * a + m * cfg.num_heads * cfg.head_dim * a),
        "mlp": split(m * 2 * f * a + m * f * a),
        "head": split(r * v * (a + 4)) + r * v * (4 + 4),
    }
    out["total"] = out["resid"] + max(out["attention"], out["mlp"], out["head"])
    return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemoryPlan:
    model: str
    dtype: str
    quant: str
    kv_dtype: str
    batch: int
    context: int
    page_size: int
    chunk: int
    tensor: int                      # tensor-parallel degree: the byte counts below are per device
    param_bytes_by_group: tuple[tuple[str, int], ...]
    param_bytes: int
    kv_bytes_per_token_per_layer: int
    kv_bytes_per_token: int          # all layers
    page_bytes: int
    pages_per_seq: int               # ceil(context / page_size)
    kv_bytes_needed: int             # batch full contexts in pages, plus the null page
    workspace_by_part: tuple[tuple[str, int], ...]
    workspace_bytes: int
    total_needed: int                # params + workspace + kv_bytes_needed (before headroom)
    free_bytes: int | None = None
    headroom: float = 0.0
    num_pages: int | None = None     # pages to allocate from free_bytes (including the null page)
    max_seqs_at_context: int | None = None  # full-context sequences those pages hold at once
    fits: bool | None = None         # free_bytes holds params + workspace + batch full contexts


def plan_memory(cfg: GLMConfig, *, dtype: str = "bfloat16", quant=None, kv_dtype: str | None = None, batch: int,
                context: int, page_size: int = 16, chunk: int = 2048, free_bytes: int | None = None,
                headroom: float = 0.05, logits_rows: int | None = None, model: str = "", tensor: int = 1
                ) -> MemoryPlan:
    """The memory plan of a serving setup; with ``tensor`` = t > 1, bytes per device of a t-way
    tensor-parallel engine (``free_bytes``: one device's free memory)."""
    for key, val in (("batch", batch), ("context", context), ("page_size", page_size), ("chunk", chunk),
                     ("tensor", tensor)):
        if not isinstance(val, int) or isinstance(val, bool) or val < 1:
            raise ValueError(f"{key}={val!r} must be a positive integer")
    if not 0 <= headroom < 1:
        raise ValueError(f"headroom={headroom!r} must be in [0, 1)")
    if context > cfg.max_position_embeddings:
        raise ValueError(f"context={context} exceeds the model's max_position_embeddings={cfg.max_position_embeddings}")
    kv_dtype = dtype if kv_dtype is None else kv_dtype
    q = _quant(quant)
    groups = param_bytes(cfg, dtype=dtype, quant=q, tensor=tensor)
    params = sum(groups.values())
    per_tl = kv_bytes_per_token_per_layer(cfg, kv_dtype, tensor=tensor)
    page = page_size * cfg.num_layers * per_tl
    pages_per_seq = -(-context // page_size)
    kv_needed = (batch * pages_per_seq + 1) * page
    ws = workspace_bytes(cfg, dtype=dtype, batch=batch, chunk=chunk, logits_rows=logits_rows, tensor=tensor)
    num_pages = max_seqs = fits = None
    if free_bytes is not None:
        rest = int(free_bytes * (1 - headroom)) - params - ws["total"]
        num_pages = max(rest // page, 0)
        max_seqs = max(num_pages - 1, 0) // pages_per_seq
        fits = max_seqs >= batch
    qname = "none" if q is None else (q.method if q.method == "int8" else f"int4/g{q.group_size}")
    return MemoryPlan(
        model=model, dtype=dtype, quant=qname, kv_dtype=kv_dtype, batch=batch, context=context, page_size=page_size,
        chunk=chunk, tensor=tensor, param_bytes_by_group=tuple(groups.items()), param_bytes=params,
        kv_bytes_per_token_per_layer=per_tl, kv_bytes_per_token=per_tl * cfg.num_layers, page_bytes=page,
        pages_per_seq=pages_per_seq, kv_bytes_needed=kv_needed,
        workspace_by_part=tuple((k, v) for k, v in ws.items() if k != "total"), workspace_bytes=ws["total"],
        total_needed=params + ws["total"] + kv_needed, free_bytes=free_bytes, headroom=headroom,
        num_pages=num_pages, max_seqs_at_context=max_seqs, fits=fits)


def _gib(x: int) -> str:
    return f"{x / GiB:,.3f}"


def format_memory_table(plan: MemoryPlan) -> str:
    """A Markdown table of the plan (bytes and GiB)."""
    rows = [(f"params/{k}", v, "") for k, v in plan.param_bytes_by_group]
    rows.append(("params (total)", plan.param_bytes, f"dtype {plan.dtype}, quant {plan.quant}"))
    rows.append(("kv per token per layer", plan.kv_bytes_per_token_per_layer, f"2*K*H*b ({plan.kv_dtype})"))
    rows.append(("kv per token", plan.kv_bytes_per_token, "all layers"))
    rows.append(("kv page", plan.page_bytes, f"L={plan.page_size} tokens"))
    rows.append(("kv for batch x context", plan.kv_bytes_needed,
                 f"({plan.batch} x {plan.pages_per_seq} + 1 null) pages"))
    rows += [(f"workspace/{k}", v, "") for k, v in plan.workspace_by_part]
    rows.append(("workspace (peak)", plan.workspace_bytes, f"chunk {plan.chunk}, batch {plan.batch}"))
    rows.append(("total needed", plan.total_needed, "params + workspace + kv"))
    per_dev = f", tensor parallel {plan.tensor} (bytes per device)" if plan.tensor > 1 else ""
    lines = [f"Memory plan: {plan.model or 'model'}, batch {plan.batch}, context {plan.context}{per_dev}", "",
             "| item | bytes | GiB | note |", "| --- | ---: | ---: | --- |"]
    lines += [f"| {name} | {v:,} | {_gib(v)} | {note} |" for name, v, note in rows]
    if plan.free_bytes is not None:
        lines += [f"| free memory | {plan.free_bytes:,} | {_gib(plan.free_bytes)} | headroom {plan.headroom:.0%} |",
                  f"| KV pages to allocate | {plan.num_pages:,} | {_gib(plan.num_pages * plan.page_bytes)} | "
                  f"incl. null page; {plan.max_seqs_at_context} full contexts at once |",
                  "", f"fits: {'yes' if plan.fits else 'NO'}"]
    return "\n".join(lines)


def device_free_bytes(devices=None) -> int | None:
    """Free memory (``bytes_limit - bytes_in_use``) of the first jax device, or the least over ``devices``
    (e.g. a mesh's); None when unknown. With several processes, each reads its own devices and all agree on
    the least (so every process sizes the same page pool)."""
    import jax  # only here: the model itself is pure arithmetic
    mine = [d for d in ([jax.devices()[0]] if devices is None else list(devices))
            if d.process_index == jax.process_index()] or [jax.local_devices()[0]]
    free = []
    for dev in mine:
        stats = dev.memory_stats() or {}
        if "bytes_limit" not in stats:
            return None
        free.append(int(stats["bytes_limit"] - stats.get("bytes_in_use", 0)))
    if jax.process_count() > 1:
        import numpy as np
        from jax.experimental import multihost_utils
        return int(np.min(multihost_utils.process_allgather(np.array(min(free), np.int64))))
    return min(free)


def memory_main(argv: Sequence[str] | None = None) -> int:
    """``autoglm memory --model glm-4-9b --dtype bfloat16 --kv-dtype int8 --batch 32 --context 8192``."""
    p = argparse.ArgumentParser(prog="autoglm memory", description="Predict serving memory before allocating.")
    p.add_argument("--model", default="glm-4-9b", help=f"preset {sorted(PRESETS)} or a config.json path")
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_BYTES))
    p.add_argument("--quant", default="none", choices=["none", "int8", "int4"])
    p.add_argument("--group-size", type=int, default=128, help="int4 group size")
    p.add_argument("--kv-dtype", default=None, choices=sorted(KV_DTYPE_BYTES), help="default: --dtype")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--page-size", type=int, default=16)
    p.add_argument("--chunk", type=int, default=2048, help="max tokens per engine step")
    p.add_argument("--free-gib", type=float, default=None, help="free device memory (GiB)")
    p.add_argument("--device", action="store_true", help="read free memory from the first jax device")
    p.add_argument("--headroom", type=float, default=0.05)
    p.add_argument("--tensor-parallel", type=int, default=1, metavar="N", help="bytes per device of N-way "
                   "tensor parallelism (free memory is then one device's)")
    args = p.parse_args(argv)
    try:
        cfg = GLMConfig.from_preset(args.model) if args.model in PRESETS else GLMConfig.from_json_file(args.model)
        free = None if args.free_gib is None else int(args.free_gib * GiB)
        if args.device and free is None:
            free = device_free_bytes()
        quant = None if args.quant == "none" else QuantSpec(method=args.quant, group_size=args.group_size)
        plan = plan_memory(cfg, dtype=args.dtype, quant=quant, kv_dtype=args.kv_dtype, batch=args.batch,
                           context=args.context, page_size=args.page_size, chunk=args.chunk, free_bytes=free,
                           headroom=args.headroom, model=args.model, tensor=args.tensor_parallel)
    except (ValueError, OSError) as e:
        print(f"autoglm memory: error: {e}", file=sys.stderr)
        return 2
    print(format_memory_table(plan))
    return 0
