"""Calibration: stream token samples through a model and collect, for every linear layer, statistics of its
INPUT activations (``observers.ActStats``: a log-spaced |x| histogram, absmax, count) -- no activations kept.

Each ``Linear`` is wrapped, for the duration of the call, in a ``_Tap`` that passes its input through and
stores this batch's statistics in a ``CalibStat`` variable; a jitted forward returns those, and the host
merges them batch by batch (``tqdm`` bar). Padding positions (``mask`` 0) are not counted.
"""

from __future__ import annotations

import fnmatch
from typing import Iterable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from ..model.linear import Linear
from ..model.quantized_linear import QuantizedLinear
from .observers import ActStats, histogram_update


class CalibrationError(ValueError):
    """Calibration data that cannot be used; the message says why."""


class CalibStat(nnx.Variable):
    """Per-batch statistics written by a ``_Tap``."""


class _Tap(nnx.Module):
    def __init__(self, inner: nnx.Module):
        self.inner = inner
        self.mask = CalibStat(jnp.ones((1, 1), jnp.float32))
        self.hist = CalibStat(jnp.zeros((1,), jnp.float32))
        self.amax = CalibStat(jnp.zeros((), jnp.float32))
        self.count = CalibStat(jnp.zeros((), jnp.float32))

    def __call__(self, x, *, partials: bool = False, digits=None):
        """Records x's statistics, then the wrapped layer's y (``partials`` and ``digits`` are passed on: it may
        return partial sums, as ``Linear`` does, or take x's digits, as ``QuantizedLinear`` does)."""
        m = self.mask[...]
        weight = m.reshape(m.shape + (1,) * (x.ndim - m.ndim)) if m.shape == x.shape[:m.ndim] else None
        for var, value in zip((self.hist, self.amax, self.count), histogram_update(x, weight)):
            _assign(var, value)
        return self.inner(x, partials=partials, digits=digits)


def _assign(var: nnx.Variable, value) -> None:
    """Replace a variable's value (its shape may change)."""
    if hasattr(var, "set_value"):
        var.set_value(value)
    else:  # older flax
        var.value = value


def _children(module) -> Iterator[tuple[str, object, str, int | None, nnx.Module]]:
    for name, value in vars(module).items():
        if isinstance(value, nnx.Module) and not isinstance(value, nnx.List):
            yield name, module, name, None, value
        elif isinstance(value, (list, tuple, nnx.List)):
            for i, item in enumerate(value):
                if isinstance(item, nnx.Module):
                    yield f"{name}.{i}", module, name, i, item


def iter_linears(model: nnx.Module, types=(Linear, QuantizedLinear)):
    """Yields ``(dotted path, parent, attribute, list index or None, layer)`` for every linear layer."""
    def walk(module, prefix):
        for name, parent, attr, idx, child in list(_children(module)):
            path = f"{prefix}{name}"
            if isinstance(child, types):
                yield path, parent, attr, idx, child
            elif not isinstance(child, _Tap):
                yield from walk(child, path + ".")
    yield from walk(model, "")


def set_child(parent, attr: str, idx: int | None, new) -> None:
    if idx is None:
        setattr(parent, attr, new)
    else:
        getattr(parent, attr)[idx] = new


def matches(path: str, patterns: Sequence[str]) -> bool:
    """Glob ``patterns`` against the dotted path and its last name (``"lm_head"``, ``"layers.0.*"``)."""
    leaf = path.rsplit(".", 1)[-1]
    return any(fnmatch.fnmatch(path, p) or fnmatch.fnmatch(leaf, p) for p in patterns)


def batch_samples(samples: Iterable[Sequence[int]], *, seq_len: int, batch_size: int, max_samples: int | None
                  ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Token samples (each truncated to ``seq_len``) -> (ids [B, seq_len] int32, mask [B, seq_len]) batches;
    short samples and the last batch are padded with masked positions."""
    ids = np.zeros((batch_size, seq_len), np.int32)
    mask = np.zeros((batch_size, seq_len), np.float32)
    row = taken = 0
    for sample in samples:
        if max_samples is not None and taken >= max_samples:
            break
        s = np.asarray(sample, np.int32).reshape(-1)[:seq_len]
        if s.size == 0:
            continue
        ids[row, :s.size], mask[row, :s.size] = s, 1.0
        row, taken = row + 1, taken + 1
        if row == batch_size:
            yield ids, mask
            ids, mask, row = np.zeros_like(ids), np.zeros_like(mask), 0
    if row:
        yield ids, mask


def calibrate(model: nnx.Module, samples: Iterable[Sequence[int]], *, seq_len: int = 256, batch_size: int = 8,
              max_samples: int | None = 512, layers: Sequence[str] = ("*",), progress: bool = True
              ) -> dict[str, ActStats]:
    """Runs ``samples`` (token id sequences) through ``model`` and returns ``{layer path: ActStats}`` of the input
    of every linear layer whose path matches ``layers``. The model is unchanged afterwards."""
    if seq_len < 1 or batch_size < 1:
        raise CalibrationError(f"seq_len={seq_len} and batch_size={batch_size} must be >= 1")
    found = [t for t in iter_linears(model) if matches(t[0], layers)]
    if not found:
        raise CalibrationError(f"no linear layer matches {list(layers)}")
    taps = {}
    for path, parent, attr, idx, layer in found:
        taps[path] = _Tap(layer)
        set_child(parent, attr, idx, taps[path])
    stats = {path: ActStats.empty() for path in taps}
    try:
        graphdef, state = nnx.split(model)

        @jax.jit
        def step(state, ids, mask):
            m = nnx.merge(graphdef, state)
            for tap in _taps(m):
                _assign(tap.mask, mask)
            m(ids)
            return {p: (t.hist[...], t.amax[...], t.count[...]) for p, t in _taps_by_path(m).items()}

        total = None if max_samples is None else -(-max_samples // batch_size)
        bar = tqdm(desc="calibrating", total=total, disable=not progress, unit="batch")
        batches = 0
        for ids, mask in batch_samples(samples, seq_len=seq_len, batch_size=batch_size, max_samples=max_samples):
            out = jax.device_get(step(state, jnp.asarray(ids), jnp.asarray(mask)))
            for p, (h, a, c) in out.items():
                stats[p].merge(h, a, c)
            batches += 1
            bar.update(1)
        bar.close()
    finally:
        for path, parent, attr, idx, layer in found:
            set_child(parent, attr, idx, layer)
    if batches == 0:
        raise CalibrationError("the calibration data holds no tokens")
    return stats


def _taps(model) -> list[_Tap]:
    return list(_taps_by_path(model).values())


def _taps_by_path(model) -> dict[str, _Tap]:
    out = {}

    def walk(module, prefix):
        for name, _, _, _, child in _children(module):
            if isinstance(child, _Tap):
                out[f"{prefix}{name}"] = child
            else:
                walk(child, f"{prefix}{name}.")
    walk(model, "")
    return out
