"""The tensor-parallel layout of GLM's fused projections, and its inverse.

The model fuses q/k/v into one ``qkv_proj`` ``[D, (N + 2K) H]`` with columns ``[q | k | v]`` and gate/up into
one ``gate_up_proj`` ``[D, 2F]`` = ``[gate | up]``. Sharding those columns contiguously over a tensor degree t
would cut across q/k/v (and gate/up), so GSPMD would gather the projection output every layer. Instead,
for tensor degree t the columns are permuted (on device, once, by ``shard_model``) into t groups:

    qkv:     [q_0 | k_0 | v_0 | q_1 | k_1 | v_1 | ... ]   q_g: query heads g*N/t .. (g+1)*N/t - 1
    gate_up: [gate_0 | up_0 | gate_1 | up_1 | ... ]        gate_g, up_g: MLP columns g*F/t .. (g+1)*F/t - 1

so shard g holds exactly the columns it needs (column-parallel, no communication) and the model's
``qkv_groups`` / ``gate_up_groups`` attribute tells it to split per group (``attention.py``, ``mlp.py``).

KV heads: when K < t (GLM-4-9B: K = 2, t = 4 or 8) every KV head is repeated r = t / K times, giving
K' = t KV heads; group g holds KV head g // r of the original model. A GQA model whose KV heads are
repeated this way computes exactly the same function (query head n uses KV head n // (N/K') = (n // (N/K))
repeated), so the sharded model is an ordinary GLM with ``num_kv_heads = K'``: caches sized from its
config get K' heads, one (or K'/t) per device -- each device holds only the KV head its queries read.
The cost is r-fold KV-projection columns (GLM-4-9B, t = 8: 768 instead of 576 qkv columns per device)
and KV-cache entries equal to "K heads replicated" per device (1 instead of 2 heads per device here).

Every leaf under a ``qkv_proj`` / ``gate_up_proj`` module is permuted along its output axis -- the one its
``logical_axes`` name ``qkv`` / ``mlp`` (kernel [I, O], bias [O]; quantized int8/int4 ``qweight``/``packed``
[I(/2), O] and ``scale``/``zero`` [O] or [I/group, O]; W8A8's and K-major int8's transposed ``qweight`` [O, I],
K-major int4's ``packed`` [O, I/2] and ``scale``/``zero`` [O, I/group])
-- so quantized weights and their scales stay consistent.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

QKV, GATE_UP = "qkv_proj", "gate_up_proj"


@dataclasses.dataclass(frozen=True)
class TPLayout:
    tensor: int  # t
    kv_repeat: int  # r: each original KV head appears r times
    num_kv_heads: int  # K of the canonical model


def plan(cfg, tensor: int) -> TPLayout:
    k = cfg.num_kv_heads
    r = tensor // k if (k < tensor and tensor % k == 0) else 1
    return TPLayout(tensor=tensor, kv_repeat=r, num_kv_heads=k)


def tp_config(cfg, layout: TPLayout):
    return cfg.replace(num_kv_heads=layout.num_kv_heads * layout.kv_repeat)


def qkv_columns(cfg, layout: TPLayout) -> np.ndarray:
    """For each column of the TP layout, the canonical column it copies. cfg: the canonical config."""
    n, k, h, t, r = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, layout.tensor, layout.kv_repeat
    kp = k * r
    head_cols = lambda base, head: base + head * h + np.arange(h)
    cols = []
    for g in range(t):
        for head in range(g * n // t, (g + 1) * n // t):
            cols.append(head_cols(0, head))
        for base in (n * h, n * h + k * h):  # k then v
            for j in range(g * kp // t, (g + 1) * kp // t):
                cols.append(head_cols(base, j // r))
    return np.concatenate(cols).astype(np.int32)


def gate_up_columns(f: int, tensor: int) -> np.ndarray:
    c = f // tensor
    return np.concatenate([np.concatenate([np.arange(g * c, (g + 1) * c), f + np.arange(g * c, (g + 1) * c)])
                           for g in range(tensor)]).astype(np.int32)


def inverse(columns: np.ndarray, width: int) -> np.ndarray:
    """Canonical column c -> the first TP-layout column holding it."""
    inv = np.full(width, -1, np.int64)
    for pos in range(len(columns) - 1, -1, -1):
        inv[columns[pos]] = pos
    assert (inv >= 0).all()
    return inv.astype(np.int32)


def _map_tree(tree: dict, fn, path=()):
    out = {}
    for key, value in tree.items():
        p = path + (key,)
        out[key] = _map_tree(value, fn, p) if isinstance(value, dict) else fn(p, value)
    return out


def _permute(tree: dict, qkv_idx: np.ndarray, gu_idx: np.ndarray, axes: dict | None) -> dict:
    def fn(path, leaf):
        for module, name, idx in ((QKV, "qkv", qkv_idx), (GATE_UP, "mlp", gu_idx)):
            if module in path:
                names = (axes or {}).get(tuple(path))
                axis = names.index(name) if names and name in names else -1
                return jnp.take(leaf, idx, axis=axis)
        return leaf
    return _map_tree(tree, fn)


def to_tp_layout(tree: dict, cfg, layout: TPLayout, axes: dict | None = None) -> dict:
    """Pure-dict model state (canonical) -> the TP layout (cfg: canonical config). ``axes``: {path: logical
    axes}; a leaf is permuted along its ``qkv`` / ``mlp`` axis (W8A8 and K-major int8 store [O, I]), else its
    last axis."""
    return _permute(tree, qkv_columns(cfg, layout), gate_up_columns(cfg.intermediate_size, layout.tensor), axes)


def from_tp_layout(tree: dict, cfg, layout: TPLayout, axes: dict | None = None) -> dict:
    """Inverse of ``to_tp_layout`` (cfg: canonical config)."""
    qkv = inverse(qkv_columns(cfg, layout), cfg.qkv_size)
    gu = inverse(gate_up_columns(cfg.intermediate_size, layout.tensor), 2 * cfg.intermediate_size)
    return _permute(tree, qkv, gu, axes)
