"""Token batches for training and evaluation, deterministic from (seed, batch index).

Training reads a packed 1-D token stream (documents joined with an EOS between them) as windows of
``seq_len + 1`` tokens at stride ``seq_len``. Batch ``i`` takes samples ``i*B .. i*B + B - 1`` of a stream
that visits every window once per epoch in an order drawn from ``(seed, epoch)``: the data position that a
checkpoint stores is just ``i``, and resuming at ``i`` reproduces the uninterrupted run exactly.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np


def pack_documents(docs: Sequence[Sequence[int]], *, eos_id: int) -> np.ndarray:
    """Joins token lists into one int32 stream, each document followed by ``eos_id``."""
    parts = []
    for d in docs:
        parts.append(np.asarray(d, np.int32))
        parts.append(np.array([eos_id], np.int32))
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


class TokenBatches:
    """``batch(i) -> (tokens [B, T + 1] int32, mask [B, T + 1] float32)`` over a packed token stream."""

    def __init__(self, stream: np.ndarray, *, seq_len: int, batch_size: int, seed: int):
        stream = np.asarray(stream, np.int32)
        if stream.ndim != 1:
            raise ValueError(f"token stream must be 1-D, got shape {stream.shape}")
        self.num_windows = (len(stream) - 1) // seq_len
        if self.num_windows < 1:
            raise ValueError(f"token stream of {len(stream)} tokens is shorter than seq_len + 1 = {seq_len + 1}")
        self.stream, self.seq_len, self.batch_size, self.seed = stream, seq_len, batch_size, seed
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_windows)
            self._perm_epoch = epoch
        return self._perm

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        t = self.seq_len
        rows = []
        for s in range(index * self.batch_size, (index + 1) * self.batch_size):
            window = self._order(s // self.num_windows)[s % self.num_windows]
            rows.append(self.stream[window * t: window * t + t + 1])
        tokens = np.stack(rows)
        return tokens, np.ones(tokens.shape, np.float32)

    def epoch_of(self, index: int) -> float:
        return index * self.batch_size / self.num_windows


def eval_batches(stream: np.ndarray, *, seq_len: int, batch_size: int, pad_id: int = 0
                 ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every window of a held-out stream once, in order; the last batch is padded with masked rows/tokens, so
    each target token of the stream (after the first) is counted exactly once."""
    stream = np.asarray(stream, np.int32)
    n = max(1, -(-(len(stream) - 1) // seq_len))
    for start in range(0, n, batch_size):
        tokens = np.full((batch_size, seq_len + 1), pad_id, np.int32)
        mask = np.zeros((batch_size, seq_len + 1), np.float32)
        for r, w in enumerate(range(start, min(start + batch_size, n))):
            piece = stream[w * seq_len: w * seq_len + seq_len + 1]
            tokens[r, :len(piece)] = piece
            mask[r, 1:len(piece)] = 1.0  # position 0 of a window is context only (counted in the window before)
        yield tokens, mask
