"""Training-memory estimate: parameters, gradients, optimizer state and activations per remat policy.

The activation model lists the tensors one decoder layer produces per token (see ``layer_tensors``) and,
per policy, which of them the backward pass keeps for every layer (the scan stacks them over L) and which
exist only while one layer is recomputed. ``experiments/remat_memory.py`` checks it against XLA's
``compiled.memory_analysis()``; ``tests/test_train_memory.py`` holds it to 10% on a small config.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..config import GLMConfig
from ..model import resolve_dtype
from .config import TrainConfig

# Tensors kept per layer by each policy (names from ``layer_tensors``); "*" = every tensor the backward needs.
# A policy only allows saving: outputs the backward does not read are dropped anyway. The o_proj and
# down_proj outputs only feed residual adds, so dots_saveable keeps neither, and of the two tagged names
# save_attention_out keeps attention_out (the MLP's norm input is rebuilt from it) while mlp_out's sum is the
# next layer's input, which the scan keeps already.
SAVED = {
    "none": ("*",),
    "full": ("x_in",),
    "dots_saveable": ("x_in", "qkv", "gate_up"),
    "save_attention_out": ("x_in", "o"),
    "offload": ("x_in",),  # attention_out / mlp_out live in pinned host memory
}
OFFLOADED = {"offload": ("o",)}
# Tensors the backward pass of a layer needs when nothing is recomputed (JAX's residuals): the residual adds
# ("o", "down" as such) are not among them.
RESIDUALS = ("x_in", "norm1_f32", "norm1", "qkv", "q", "k", "v", "logits", "probs", "probs_c", "attn",
             "h2", "norm2_f32", "norm2", "gate_up", "silu", "act")


def layer_tensors(cfg: GLMConfig, seq_len: int, dtype) -> dict[str, int]:
    """Bytes per token of each activation one decoder layer makes (S = seq_len keys per query)."""
    c = np.dtype(resolve_dtype(dtype)).itemsize
    d, f, h, n, k = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    return {
        "x_in": d * c, "norm1_f32": d * 4, "norm1": d * c, "qkv": cfg.qkv_size * c,
        "q": n * h * c, "k": k * h * c, "v": k * h * c,
        "logits": n * seq_len * 4, "probs": n * seq_len * 4, "probs_c": n * seq_len * c,
        "attn": n * h * c, "o": d * c, "h2": d * c, "norm2_f32": d * 4, "norm2": d * c,
        "gate_up": 2 * f * c, "silu": f * c, "act": f * c, "down": d * c,
    }


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    params: int
    grads: int
    optimizer: int
    activations: int  # saved across layers + one layer's recompute working set + logits/loss
    saved_per_layer: int  # per layer, on the device
    host_offloaded: int  # whole step, in pinned host memory (``offload``)
    batch: int

    @property
    def state(self) -> int:
        """Persistent train state (params + optimizer), donated in and out of the step."""
        return self.params + self.optimizer

    @property
    def total(self) -> int:
        """Peak device bytes of a step: state + batch + gradients + activations."""
        return self.state + self.batch + self.grads + self.activations

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "state": self.state, "total": self.total}


def estimate_training_memory(cfg: GLMConfig, train: TrainConfig) -> MemoryEstimate:
    """Device bytes of one training step (float32 parameters, gradients and AdamW moments)."""
    p = cfg.num_params()
    b, t = train.micro_batch_size, train.seq_len
    tokens = b * t
    c = np.dtype(resolve_dtype(train.dtype)).itemsize
    per_token = layer_tensors(cfg, t, train.dtype)
    residual = sum(per_token[name] for name in RESIDUALS)
    names = SAVED[train.remat]
    saved = residual if names == ("*",) else sum(per_token[n] for n in names)
    offloaded = sum(per_token[n] for n in OFFLOADED.get(train.remat, ()))
    # One layer rebuilt in the backward pass: its attention block or its MLP block is live at a time.
    # Saved tensors are read back, not rebuilt, so they leave the working set.
    kept = set(names)
    attn_block = sum(per_token[n] for n in ("qkv", "q", "k", "v", "logits", "probs", "attn") if n not in kept)
    mlp_block = sum(per_token[n] for n in ("gate_up", "silu", "act") if n not in kept)
    recompute = 0 if train.remat == "none" else max(attn_block, mlp_block) + 2 * per_token["x_in"]
    # Logits [B, T, V] float32 and their gradient (softmax - one-hot), plus embeddings / final norm.
    head = tokens * (2 * cfg.vocab_size * 4 + 3 * cfg.hidden_size * c)
    activations = tokens * (cfg.num_layers * saved + recompute) + head
    grads = 4 * p * (2 if train.grad_accum_steps > 1 else 1)  # accumulation keeps a running sum too
    return MemoryEstimate(params=4 * p, grads=grads, optimizer=8 * p, activations=activations,
                          saved_per_layer=tokens * saved, host_offloaded=tokens * offloaded * cfg.num_layers,
                          batch=2 * train.batch_size * (t + 1) * 4)


def compiled_memory(compiled) -> dict:
    """Bytes from ``compiled.memory_analysis()``: arguments, outputs, aliased (donated), temporaries, and the
    peak they imply (arguments + outputs - aliased + temporaries)."""
    ma = compiled.memory_analysis()
    out = {"argument": ma.argument_size_in_bytes, "output": ma.output_size_in_bytes,
           "alias": ma.alias_size_in_bytes, "temp": ma.temp_size_in_bytes,
           "host_temp": getattr(ma, "host_temp_size_in_bytes", 0)}
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out
