"""Training configuration: a frozen keyword-only dataclass, validated before any device work."""

from __future__ import annotations

import dataclasses

from ..model.remat import REMAT_POLICIES


class TrainConfigError(ValueError):
    """A training configuration that cannot run; the message names the field and what is allowed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Optimizer, schedule, batch and checkpointing settings.

    ``batch_size`` is the global batch (sequences per optimizer step); it is split into
    ``grad_accum_steps`` microbatches of ``batch_size // grad_accum_steps`` sequences of ``seq_len`` tokens.
    """

    seq_len: int = 256  # T
    batch_size: int = 16  # B (global, per optimizer step)
    grad_accum_steps: int = 1
    total_steps: int = 1000
    learning_rate: float = 1e-3  # peak
    warmup_steps: int = 100
    min_lr_ratio: float = 0.1  # cosine decays to learning_rate * min_lr_ratio
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    grad_clip_norm: float = 1.0  # 0 = no clipping
    remat: str = "none"
    dtype: str = "float32"  # compute dtype (parameters and optimizer state stay float32)
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 0  # 0 = only at the end (when a checkpoint_dir is given)
    keep_checkpoints: int = 2

    def __post_init__(self):
        for key in ("seq_len", "batch_size", "grad_accum_steps", "total_steps", "log_every", "keep_checkpoints"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise TrainConfigError(f"{key}={value!r} must be a positive integer")
        for key in ("warmup_steps", "checkpoint_every", "seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise TrainConfigError(f"{key}={value!r} must be a non-negative integer")
        if self.batch_size % self.grad_accum_steps:
            raise TrainConfigError(
                f"batch_size={self.batch_size} is not divisible by grad_accum_steps={self.grad_accum_steps}; "
                f"each microbatch must hold the same number of sequences (allowed grad_accum_steps: "
                f"{[d for d in range(1, self.batch_size + 1) if self.batch_size % d == 0]})")
        if self.warmup_steps > self.total_steps:
            raise TrainConfigError(f"warmup_steps={self.warmup_steps} exceeds total_steps={self.total_steps}")
        if self.remat not in REMAT_POLICIES:
            raise TrainConfigError(f"unknown remat policy {self.remat!r}; allowed: {REMAT_POLICIES}")
        if self.dtype not in ("float32", "bfloat16"):
            raise TrainConfigError(f"dtype={self.dtype!r} is not supported for training; allowed: "
                                   "'float32', 'bfloat16'")
        if not self.learning_rate > 0:
            raise TrainConfigError(f"learning_rate={self.learning_rate} must be > 0")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise TrainConfigError(f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        if self.grad_clip_norm < 0:
            raise TrainConfigError(f"grad_clip_norm={self.grad_clip_norm} must be >= 0 (0 = no clipping)")
        if not (0.0 <= self.b1 < 1.0 and 0.0 <= self.b2 < 1.0):
            raise TrainConfigError(f"b1={self.b1}, b2={self.b2} must be in [0, 1)")

    @property
    def micro_batch_size(self) -> int:
        return self.batch_size // self.grad_accum_steps

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def replace(self, **changes) -> "TrainConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise TrainConfigError(f"unknown TrainConfig keys {sorted(unknown)}")
        return dataclasses.replace(self, **changes)
