"""Tile choice for ``quantized_matmul``: the ``TileConfig`` dataclass and the tuned table lookup.

The table (``kernels_pallas/tuned/quantized_matmul.json``) is written by ``experiments/tune_qmatmul.py``:
one entry per (device, format, M bucket, K, N) with the measured-fastest config, which may be ``"xla"``
(dequantize-then-dot through XLA) or, for int8 at M <= 32, ``"xla_split"`` (XLA's int8 x int8 dot of the
activations written as two int8 digits, ``quantized_matmul.int8_split_matmul``) where that beat every kernel.
The format key is the weight's ``name``: a K-major ``Int8Weight`` (``qweight[N, K]``) is ``"int8_kmajor"``,
tuned apart from ``"int8"`` ([K, N]); a K-major ``Int4Weight`` is ``"int4_g128_sym_kmajor"`` (etc.), tuned apart
from the ``[K/2, N]`` int4 formats (its ``gemv`` is another kernel, ``qmatmul_dp4a.py``).
No entry is written by hand (a run's ``*_sweep.json`` whose table was not kept goes in with the tuner's
``--from_sweep``). Lookup, among the format's rows of this device (per tuned problem, M bucket and shape;
else a sibling chip's, see ``tuned_device``): exact (K, N) at the smallest tuned M >= M (else the largest tuned M); then the nearest shape
(by K*N) with the same M bucket; an int4 variant with no entries uses another int4 variant's of the same layout
(same group first); else ``default_config``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os

from .tuned_device import device_key, rows_for  # noqa: F401 (device_key: the tuning scripts' key)

TABLE_PATH = os.path.join(os.path.dirname(__file__), "tuned", "quantized_matmul.json")
KERNELS = ("gemv", "dp4a", "dot", "xla", "xla_split", "mgpu")
XLA_KERNELS = ("xla", "xla_split")  # not Pallas: the tile fields are unused


@dataclasses.dataclass(frozen=True, kw_only=True)
class TileConfig:
    """kernel: "gemv" (one row of x, FMA on CUDA cores, split-K; for a K-major ``Int4Weight`` the integer-dot
    GEMV of ``qmatmul_dp4a.py``: block_n rows a program, block_k / group groups a step, split_k runs of K's steps),
    "dp4a" (that integer-dot GEMV for a K-major ``Int8Weight`` at one row, the same tile fields; for a K-major
    ``Int4Weight`` the same as "gemv"; anywhere else ``quantized_matmul.fit_config`` makes it "gemv"),
    "dot" (tensor-core tiles), "xla"
    (XLA's dequantize-then-dot), "xla_split" (Int8Weight only: XLA's int8 x int8 dot of two-digit activations) or
    "mgpu" (Hopper wgmma: W8A8 through ``qmatmul_w8a8_mgpu``, weight-only int8 and K-major group-128 int4 with
    bf16 x through ``qmatmul_mixed_mgpu``; block_m / block_n each compute warpgroup's tile, num_stages its slots in
    flight, fewer where a float32 output would overflow shared memory; weight_regs: the widened weight stays in
    registers as wgmma's A operand, a K-major weight only, int8 then stepping K by block_k 64 or 128; elsewhere it
    falls back to "dot").

    block_m rows of x per program (gemv: 1), block_n output columns, block_k rows of the weight per loop
    step (int4: a multiple of the group or a power-of-two part of one), split_k programs along K (partial sums
    reduced by XLA), num_warps / num_stages for the Triton compiler, fast_dequant: int -> float by exponent bit
    tricks instead of int-to-float converts, prefetch (gemv): load step i + 1 before the math of step i,
    asm_dequant (int4 only): nibbles -> bfloat16 pairs in PTX (``qmatmul_gpu._int4_planes``), scale_in_bf16
    (with asm_dequant, dot): the weights scaled to bfloat16 before the dot (one rounding per weight, ~1e-3
    relative, as XLA's path) instead of rescaling the float32 accumulator per group, unroll (0: a K loop;
    u > 0: the loop written out in Python with u tiles loaded ahead, where every split has the same number of
    steps, else ``quantized_matmul.fit_config`` sets 0; not on the TPU kernel).
    """

    kernel: str = "dot"
    block_m: int = 16
    block_n: int = 128
    block_k: int = 128
    split_k: int = 1
    num_warps: int = 4
    num_stages: int = 3
    fast_dequant: bool = True
    prefetch: bool = False
    asm_dequant: bool = False
    scale_in_bf16: bool = False
    unroll: int = 0
    weight_regs: bool = False

    def __post_init__(self):
        if self.kernel not in KERNELS:
            raise ValueError(f"TileConfig.kernel={self.kernel!r}; allowed: {KERNELS}")
        for name in ("block_m", "block_n", "block_k", "split_k", "num_warps", "num_stages"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TileConfig.{name}={v!r} must be a positive int")
        for name in ("block_n", "block_k", "block_m"):
            v = getattr(self, name)
            if v & (v - 1):
                raise ValueError(f"TileConfig.{name}={v} must be a power of two")
        if not isinstance(self.unroll, int) or self.unroll < 0:
            raise ValueError(f"TileConfig.unroll={self.unroll!r} must be a non-negative int")
        if self.scale_in_bf16 and not (self.asm_dequant and self.kernel == "dot"):
            raise ValueError("TileConfig.scale_in_bf16 needs asm_dequant=True and kernel='dot'")
        if self.weight_regs and self.kernel != "mgpu":
            raise ValueError("TileConfig.weight_regs needs kernel='mgpu'")
        if self.kernel in ("gemv", "dp4a") and self.block_m != 1:
            raise ValueError(f"TileConfig: the {self.kernel} kernel takes block_m=1")

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.weight_regs:  # the Mosaic GPU mixed kernel's option; absent = False (older tables)
            del d["weight_regs"]
        return d


def default_config(fmt: str, m: int) -> TileConfig:
    """The untuned fallback: gemv for one row (not W8A8), small dot tiles for decode, large ones for prefill;
    ``"int8_kmajor"``: XLA's split int8 dot; a K-major int4 format at one row: the integer-dot GEMV at the
    tile the H100 diagnosis found best on gate_up (two rows a program, 32 groups a step)."""
    if fmt == "int8_kmajor":
        return TileConfig(kernel="xla_split")
    if m == 1 and fmt.startswith("int4") and fmt.endswith("_kmajor"):
        return TileConfig(kernel="gemv", block_m=1, block_n=2, block_k=4096, split_k=1, num_warps=4, num_stages=1)
    if m == 1 and fmt != "w8a8":  # [block_k, block_n] float32 accumulator: keep it at 64 registers a thread
        return TileConfig(kernel="gemv", block_m=1, block_n=128, block_k=128 if fmt.startswith("int4") else 64,
                          split_k=8, num_warps=4, num_stages=3)
    if m <= 64:
        return TileConfig(kernel="dot", block_m=16 if m <= 16 else 32 if m <= 32 else 64, block_n=128,
                          block_k=128, split_k=4, num_warps=4, num_stages=4)
    return TileConfig(kernel="dot", block_m=128, block_n=128, block_k=64, split_k=1, num_warps=8,
                      num_stages=3)


@functools.lru_cache(maxsize=4)
def load_table(path: str = TABLE_PATH) -> tuple:
    """-> tuple of entries (dicts with device, format, m, k, n, config)."""
    if not os.path.exists(path):
        return ()
    with open(path) as f:
        data = json.load(f)
    return tuple(data.get("entries", ()))


def _device_rows(rows: list, device: str) -> list:
    """Per tuned problem (M bucket and shape): this device's rows, else a sibling chip's (``tuned_device.rows_for``),
    so a device tuned at M=1 alone still takes its sibling's prefill tiles, and one tuned for down_proj alone its
    sibling's tiles for the other shapes (per M bucket only, one H200 row for down at M=32 served every shape there)."""
    problems = sorted({(e["m"], e["k"], e["n"]) for e in rows})
    return [e for p in problems for e in rows_for([e for e in rows if (e["m"], e["k"], e["n"]) == p], device)]


def lookup(device: str, fmt: str, m: int, k: int, n: int, *, table: tuple | None = None,
           given: bool = False) -> TileConfig:
    """Tuned config for this problem, or ``default_config`` when the table has none. ``given``: the call has x's
    digits from its producer (``act_digits``): an entry's ``given_config``, where it has one, is the path timed
    fastest that way (a GEMV whose own digit prep made it no faster, but that wins without it)."""
    table = load_table() if table is None else table
    entries = _device_rows([e for e in table if e["format"] == fmt], device)
    if not entries and fmt.startswith("int4"):  # an untuned int4 variant borrows tuned int4 configs (same layout)
        kmajor = fmt.endswith("_kmajor")
        family = _device_rows([e for e in table if e["format"].startswith("int4")
                               and e["format"].endswith("_kmajor") == kmajor], device)
        same_group = [e for e in family if e["format"].split("_")[1] == fmt.split("_")[1]]
        entries = same_group or family
        entries = [e for e in entries if e["format"] == entries[0]["format"]]
    if not entries:
        return default_config(fmt, m)
    ms = sorted({e["m"] for e in entries})
    bucket = next((b for b in ms if b >= m), ms[-1])
    same_m = [e for e in entries if e["m"] == bucket]
    exact = [e for e in same_m if e["k"] == k and e["n"] == n]
    pick = exact[0] if exact else min(same_m, key=lambda e: abs(e["k"] * e["n"] - k * n))
    cfg = TileConfig(**pick[("given_config" if given and "given_config" in pick else "config")])
    if cfg.kernel in ("gemv", "dp4a") and m != 1:  # a GEMV entry only serves one row
        return default_config(fmt, m)
    return cfg
