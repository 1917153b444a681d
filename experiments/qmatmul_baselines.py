"""Third-party baselines for ``bench_qmatmul.py``: Qwix's quantized ``dot_general`` and tokamax's quantized matmul.

Issue 3 asks for both where they run: Qwix (the JAX quantization library) for the int8 path, tokamax (the Pallas
kernel library) where it has the same operation. Neither is a dependency of this project; the device image has
neither, so ``fetch_baseline_wheels.sh`` downloads them (and what they need) as wheels to carry there.

* ``qwix``: ``qwix.dot_general(x, QArray)``. With bf16 activations Qwix dequantizes the weight and lets XLA fuse
  that into the dot (its "slow" path, chosen whenever an operand is float), so it reads like the bench's ``xla``
  column, reached through Qwix.
* ``tokamax``: ``tokamax.ragged_dot(x, QArray[1, K, N], group_sizes=[M], implementation="mosaic")``, one group
  holding every row: on Hopper its Mosaic GPU kernel for a quantized right-hand side (bf16 x, int8 or int4
  weights, per-K-tile scales, no zero points), the same operation as our weight-only kernels. Its Hopper kernel
  takes scales over K tiles that its K step divides (128, 256 or 512 rows; one scale over all of K = 13696 is
  refused), so an int8 weight's per-channel scale is handed to it repeated over 128-row tiles (the same products;
  K / 128 times the scale bytes, 1.6% more than the int8 weight reads at K = 13696, counted in its time).
  tokamax 0.0.17 (it requires jax >= 0.11.1; 0.0.12 calls ``plgpu.untile_ref`` and ``plgpu.kernel(out_shape=)``,
  both gone in the device's jax 0.11.2) imports ``xprof``'s kernel-stats tool for its own benchmarking helpers,
  which this bench does not use; where xprof is absent, ``baseline_stubs/xprof`` (a module whose one function
  raises) stands in so that tokamax imports.

A weight in this project's formats becomes a QArray holding the same integers and scales (``as_qarray``):
``Int8Weight`` -> int8 ``[K, N]`` with scale ``[1, N]``; a symmetric ``Int4Weight`` -> int4 ``u - 8`` ``[K, N]`` with
scale ``[K / G, N]``. Asymmetric int4 and W8A8 have no entry here (tokamax's kernel takes no zero points and no
quantized x on Hopper). The conversion happens before timing; each baseline is checked against this project's
reference on the first layer before it is timed.
"""

from __future__ import annotations

import importlib
import os
import sys

import jax
import jax.numpy as jnp

from kernels_pallas.quant_formats import Int4Weight, Int8Weight

BASELINES = ("qwix", "tokamax")
TOKAMAX_SCALE_ROWS = 128  # tokamax's Hopper kernel: a scale tile its K step (>= 128 rows for 8-bit weights) divides
STUBS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "baseline_stubs")


def _import(name: str):
    """``import name``; for tokamax, with ``baseline_stubs/xprof`` on the path where xprof itself is missing."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if name != "tokamax" or not (e.name or "").startswith("xprof") or STUBS in sys.path:
            raise
        sys.path.append(STUBS)
        for mod in [m for m in sys.modules if m == "tokamax" or m.startswith("tokamax.")]:
            del sys.modules[mod]  # the half-imported package
        return importlib.import_module(name)


def available() -> dict[str, str | None]:
    """name -> its version where it imports, else None."""
    out = {}
    for name in BASELINES:
        try:
            mod = _import(name)
            out[name] = str(getattr(mod, "__version__", "importable"))
        except ImportError:
            out[name] = None
    return out


def as_qarray(w, *, groups_axis: bool = False, int8_scale_rows: int = 0):
    """This project's weight -> a ``qwix.QArray`` of the same integers and scales, ``[K, N]`` (``[1, K, N]`` with
    ``groups_axis``, tokamax's ragged layout); None for the formats no baseline takes (asymmetric int4, W8A8).
    ``int8_scale_rows = r``: an int8 weight's per-channel scale repeated over K / r tiles of r rows."""
    import qwix

    if isinstance(w, Int8Weight):
        q, s = w.kn_qweight(), w.scale.astype(jnp.bfloat16)[None, :]
        if int8_scale_rows:
            s = jnp.repeat(s, w.in_features // int8_scale_rows, axis=0)
    elif isinstance(w, Int4Weight) and w.zero is None:
        w = w.with_layout(False)  # scales [K / G, N] (a K-major weight stores them [N, K / G])
        q = (w.unpack() - 8).astype(jnp.int4)
        s = w.scale.astype(jnp.bfloat16)  # [K / G, N]
    else:
        return None
    if groups_axis:
        q, s = q[None], s[None]
    return qwix.QArray(qvalue=q, scale=s, zero_point=None, qtype=q.dtype)


def qwix_matmul(x, qa):
    import qwix

    return qwix.dot_general(x, qa, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)


def tokamax_matmul(x, qa):
    tokamax = _import("tokamax")
    from absl import flags

    if not flags.FLAGS.is_parsed():  # tokamax's config reads absl flags, parsing sys.argv (the bench's argparse
        flags.FLAGS.mark_as_parsed()  # arguments) on first use: keep its flags at their defaults instead

    sizes = jnp.array([x.shape[0]], jnp.int32)
    impl = "mosaic" if jax.default_backend() == "gpu" else None
    return tokamax.ragged_dot(x, qa, group_sizes=sizes, preferred_element_type=x.dtype, implementation=impl)


def baseline(name: str):
    """-> (convert(weight) -> operand or None, fn(x, operand) -> y)."""
    if name == "qwix":
        return (lambda w: as_qarray(w)), qwix_matmul
    if name == "tokamax":
        return (lambda w: as_qarray(w, groups_axis=True, int8_scale_rows=TOKAMAX_SCALE_ROWS)), tokamax_matmul
    raise ValueError(f"unknown baseline {name!r}; allowed: {BASELINES}")
