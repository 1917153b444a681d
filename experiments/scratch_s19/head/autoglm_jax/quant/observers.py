"""Observers: choose a quantization range (clip) from data -- weights directly, activations from streamed stats.

Three kinds (``Observer(kind=...)``, or ``parse_observer("percentile:99.9")``):

* ``absmax`` -- the largest magnitude seen (min/max for asymmetric weights): no clipping.
* ``percentile`` -- the ``percentile``-th percentile of ``|x|`` (weights: of each channel/group; asymmetric
  weights: the ``100 - p`` and ``p`` percentiles of the values): outliers beyond it saturate.
* ``mse`` -- the clip ``r * absmax`` over ``ratios`` that minimizes the mean squared quantization error
  (rounding inside the range + saturation outside), per channel/group for weights, per tensor for activations.

Activation statistics (``ActStats``) are a log-spaced histogram of ``|x|`` (``BINS_PER_OCTAVE`` bins per
factor of two, about 1.1% wide, from 2^LOG2_MIN to 2^LOG2_MAX), the exact absmax and a count: small, mergeable
across batches, and enough for every observer -- no activations are kept.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from .fake_quant import fake_quant_weight, group_view, weight_qparams, weight_range

KINDS = ("absmax", "percentile", "mse")
LOG2_MIN, LOG2_MAX, BINS_PER_OCTAVE = -40, 24, 64
NUM_BINS = (LOG2_MAX - LOG2_MIN) * BINS_PER_OCTAVE
DEFAULT_RATIOS = tuple(float(r) for r in np.round(np.linspace(0.30, 1.0, 36), 4))


class ObserverError(ValueError):
    """An observer that cannot be built or used; the message says what is allowed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class Observer:
    kind: str = "absmax"
    percentile: float = 99.99  # for kind="percentile", in (0, 100]
    ratios: tuple[float, ...] = DEFAULT_RATIOS  # for kind="mse": candidate clips as fractions of absmax

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ObserverError(f"unknown observer {self.kind!r}; allowed: {list(KINDS)}")
        if not 0.0 < self.percentile <= 100.0:
            raise ObserverError(f"percentile={self.percentile} must be in (0, 100]")
        if not self.ratios or not all(0.0 < r <= 1.0 for r in self.ratios):
            raise ObserverError(f"mse ratios must be non-empty fractions in (0, 1]; got {self.ratios}")

    @property
    def name(self) -> str:
        return f"percentile:{self.percentile:g}" if self.kind == "percentile" else self.kind


def parse_observer(text: str | Observer) -> Observer:
    """``"absmax"``, ``"mse"``, ``"percentile"`` (99.99) or ``"percentile:99.9"`` -> ``Observer``."""
    if isinstance(text, Observer):
        return text
    kind, _, arg = str(text).partition(":")
    if kind == "percentile" and arg:
        try:
            return Observer(kind=kind, percentile=float(arg))
        except ValueError as e:
            raise ObserverError(f"bad observer {text!r}: {e}") from None
    if arg:
        raise ObserverError(f"observer {kind!r} takes no argument; got {text!r}")
    return Observer(kind=kind)


# ---- weights ---------------------------------------------------------------------------------------------

def weight_clip_range(w: jax.Array, obs: Observer, fmt: str, *, group: int = 128, symmetric: bool = True
                      ) -> tuple[jax.Array, jax.Array]:
    """Float ``w[I, O]`` -> the range ``(lo, hi) [G, O]`` to quantize each channel (int8/w8a8) or group (int4)
    with; feed it to ``fake_quant.weight_qparams``."""
    wg = group_view(jnp.asarray(w, jnp.float32), fmt, group)  # [G, n, O]
    lo, hi = weight_range(wg, symmetric)
    if obs.kind == "absmax":
        return lo, hi
    if obs.kind == "percentile":
        p = obs.percentile
        if symmetric:
            c = jnp.percentile(jnp.abs(wg), p, axis=-2)
            return -c, c
        return jnp.percentile(wg, 100.0 - p, axis=-2), jnp.percentile(wg, p, axis=-2)
    best_err, best_r = None, None
    for r in obs.ratios:  # a running minimum: memory stays at a few copies of w
        s, z = weight_qparams(lo * r, hi * r, fmt, symmetric)
        err = jnp.sum(jnp.square(group_view(fake_quant_weight(w, s, z, fmt, group), fmt, group) - wg), axis=-2)
        if best_err is None:
            best_err, best_r = err, jnp.full(err.shape, r, jnp.float32)
        else:
            better = err < best_err
            best_err, best_r = jnp.where(better, err, best_err), jnp.where(better, r, best_r)
    return lo * best_r, hi * best_r


# ---- activations -------------------------------------------------------------------------------------------

@dataclasses.dataclass
class ActStats:
    """Streamed statistics of one tensor's values: ``hist[NUM_BINS]`` counts of ``|x|`` by log2 bin (zeros and
    values below 2^LOG2_MIN in bin 0), ``amax`` and ``count`` (numbers of values seen)."""

    hist: np.ndarray
    amax: float = 0.0
    count: float = 0.0

    @classmethod
    def empty(cls) -> "ActStats":
        return cls(hist=np.zeros(NUM_BINS, np.float64))

    def merge(self, hist, amax, count) -> None:
        self.hist += np.asarray(hist, np.float64)
        self.amax = max(self.amax, float(amax))
        self.count += float(count)

    def to_json(self) -> dict:
        return {"amax": self.amax, "count": self.count}


def histogram_update(x: jax.Array, weight: jax.Array | None = None):
    """Jittable: ``x[...]`` (and an optional 0/1 ``weight`` broadcastable to x) -> (hist [NUM_BINS] float32,
    amax, count) of this batch, to merge into an ``ActStats`` on the host."""
    a = jnp.abs(x.astype(jnp.float32))
    w = jnp.ones_like(a) if weight is None else jnp.broadcast_to(weight.astype(jnp.float32), a.shape)
    pos = jnp.log2(jnp.maximum(a, 2.0 ** LOG2_MIN))
    idx = jnp.clip(jnp.floor((pos - LOG2_MIN) * BINS_PER_OCTAVE), 0, NUM_BINS - 1).astype(jnp.int32)
    hist = jnp.zeros((NUM_BINS,), jnp.float32).at[idx.reshape(-1)].add(w.reshape(-1))
    return hist, jnp.max(jnp.where(w > 0, a, 0.0)), jnp.sum(w)


def _bin_upper_edges() -> np.ndarray:
    return 2.0 ** (LOG2_MIN + (np.arange(NUM_BINS) + 1) / BINS_PER_OCTAVE)


def _bin_centers() -> np.ndarray:
    return 2.0 ** (LOG2_MIN + (np.arange(NUM_BINS) + 0.5) / BINS_PER_OCTAVE)


def activation_clip(stats: ActStats, obs: Observer, *, qmax: int = 127) -> float:
    """The symmetric clip ``c`` (scale = c / qmax) this observer picks from streamed statistics."""
    if stats.count <= 0:
        raise ObserverError("no activation statistics were collected (empty calibration data?)")
    if stats.amax <= 0:
        return 1.0
    if obs.kind == "absmax":
        return stats.amax
    hist = stats.hist
    if obs.kind == "percentile":
        cum = np.cumsum(hist)
        k = int(np.searchsorted(cum, obs.percentile / 100.0 * cum[-1]))
        return float(min(_bin_upper_edges()[min(k, NUM_BINS - 1)], stats.amax))
    x = np.minimum(_bin_centers(), stats.amax)
    nz = hist > 0
    x, n = x[nz], hist[nz]
    best, best_err = stats.amax, np.inf
    for r in obs.ratios:
        c = r * stats.amax
        step = c / qmax
        err = np.where(x <= c, step * step / 12.0, np.square(x - c))
        total = float(np.sum(n * err))
        if total < best_err:
            best, best_err = c, total
    return float(best)
