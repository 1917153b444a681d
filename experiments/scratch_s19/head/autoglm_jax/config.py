"""Model configuration: a frozen dataclass built from a Hugging Face ``config.json`` or a preset.

Two checkpoint families are read:

* ``model_type == "glm"``: GLM-4-9B(-chat)-hf (``GlmForCausalLM``): pre-norm decoder layers.
* ``model_type == "glm4"``: the GLM-4-0414 family (``Glm4ForCausalLM``): the same layer plus a
  post-norm after attention and after the MLP (``post_norms=True``).

Both ``config.json`` layouts are read: older files keep ``partial_rotary_factor`` and ``rope_theta`` at
the top level, newer ``transformers`` writes them inside ``rope_parameters``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

MODEL_TYPES = ("glm", "glm4")


class ConfigError(ValueError):
    """A configuration that cannot describe a GLM model; the message names the key and what is allowed."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class GLMConfig:
    """Architecture of a GLM-4 decoder. Shape letters in brackets (see README, "Shape vocabulary")."""

    model_type: str = "glm"
    vocab_size: int  # V
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    partial_rotary_factor: float = 0.5
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1.5625e-07
    attention_bias: bool = True
    tie_word_embeddings: bool = False
    post_norms: bool = False  # glm4: post_self_attn_layernorm and post_mlp_layernorm
    max_position_embeddings: int = 131072
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self):
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type={self.model_type!r} is not supported; allowed: {MODEL_TYPES}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{key}={value!r} must be a positive integer")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} "
                "(grouped-query attention shares each KV head among G = N / K query heads)")
        if not 0.0 < self.partial_rotary_factor <= 1.0:
            raise ConfigError(f"partial_rotary_factor={self.partial_rotary_factor} must be in (0, 1]")
        if self.rotary_dim % 2 or self.rotary_dim < 2:
            raise ConfigError(
                f"head_dim * partial_rotary_factor = {self.head_dim} * {self.partial_rotary_factor} "
                f"= {self.head_dim * self.partial_rotary_factor} must be an even integer >= 2")
        if self.rms_norm_eps <= 0:
            raise ConfigError(f"rms_norm_eps={self.rms_norm_eps} must be > 0")
        object.__setattr__(self, "eos_token_ids", tuple(int(i) for i in self.eos_token_ids))

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)  # truncated, as transformers does

    @property
    def q_per_kv(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    @property
    def qkv_size(self) -> int:
        """Output width of the fused q/k/v projection: (N + 2K) * H."""
        return (self.num_heads + 2 * self.num_kv_heads) * self.head_dim

    def num_params(self) -> int:
        d, f, v, h = self.hidden_size, self.intermediate_size, self.vocab_size, self.head_dim
        n = self.num_heads
        attn = d * self.qkv_size + (self.qkv_size if self.attention_bias else 0) + n * h * d
        mlp = d * 2 * f + f * d
        norms = d * (4 if self.post_norms else 2)
        per_layer = attn + mlp + norms
        head = 0 if self.tie_word_embeddings else d * v
        return v * d + self.num_layers * per_layer + d + head

    def replace(self, **changes) -> "GLMConfig":
        unknown = set(changes) - {f.name for f in dataclasses.fields(self)}
        if unknown:
            raise ConfigError(f"unknown config keys {sorted(unknown)}; allowed: {sorted(_field_names())}")
        return dataclasses.replace(self, **changes)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "GLMConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
        return PRESETS[name].replace(**overrides) if overrides else PRESETS[name]

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "GLMConfig":
        """Builds a config from the contents of a Hugging Face ``config.json``."""
        model_type = hf.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"config.json model_type={model_type!r} is not supported; allowed: {MODEL_TYPES}")

        def need(key):
            if hf.get(key) is None:
                raise ConfigError(f"config.json is missing required key {key!r} (model_type={model_type!r})")
            return hf[key]

        rope = hf.get("rope_parameters") or {}
        if rope and rope.get("rope_type", "default") != "default":
            raise ConfigError(f"rope_parameters.rope_type={rope.get('rope_type')!r} is not supported; "
                              "allowed: 'default'")
        partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor", 0.5))
        theta = rope.get("rope_theta", hf.get("rope_theta"))
        if theta is None:
            raise ConfigError("config.json has no 'rope_theta' (looked at the top level and in 'rope_parameters')")
        num_heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        head_dim = hf.get("head_dim") or hidden // num_heads
        eos = hf.get("eos_token_id")
        eos = () if eos is None else (tuple(eos) if isinstance(eos, (list, tuple)) else (eos,))
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"config.json hidden_act={act!r} is not supported; allowed: 'silu'")
        return cls(
            model_type=model_type,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=int(need("num_hidden_layers")),
            num_heads=num_heads,
            num_kv_heads=int(hf.get("num_key_value_heads") or num_heads),
            head_dim=int(head_dim),
            partial_rotary_factor=float(partial),
            rope_theta=float(theta),
            rms_norm_eps=float(need("rms_norm_eps")),
            attention_bias=bool(hf.get("attention_bias", False)),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            post_norms=model_type == "glm4",
            max_position_embeddings=int(hf.get("max_position_embeddings", 131072)),
            eos_token_ids=eos,
            pad_token_id=hf.get("pad_token_id"),
            initializer_range=float(hf.get("initializer_range", 0.02)),
        )

    @classmethod
    def from_json_file(cls, path: str | os.PathLike) -> "GLMConfig":
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict[str, Any]:
        """The ``config.json`` that ``transformers`` reads for this architecture (new layout)."""
        arch = "Glm4ForCausalLM" if self.model_type == "glm4" else "GlmForCausalLM"
        eos = list(self.eos_token_ids)
        return {
            "architectures": [arch],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": self.attention_bias,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta,
                                "partial_rotary_factor": self.partial_rotary_factor},
            "partial_rotary_factor": self.partial_rotary_factor,
            "rope_theta": self.rope_theta,
            "eos_token_id": eos if len(eos) != 1 else eos[0],
            "pad_token_id": self.pad_token_id,
            "initializer_range": self.initializer_range,
            "attention_dropout": 0.0,
            "use_cache": True,
        }


def _field_names():
    return {f.name for f in dataclasses.fields(GLMConfig)}


_GLM4_9B = dict(
    vocab_size=151552, hidden_size=4096, intermediate_size=13696, num_layers=40, num_heads=32,
    num_kv_heads=2, head_dim=128, partial_rotary_factor=0.5, rope_theta=10000.0, attention_bias=True,
    pad_token_id=151329,
)

PRESETS: dict[str, GLMConfig] = {
    "glm-4-9b": GLMConfig(model_type="glm", rms_norm_eps=1.5625e-07, max_position_embeddings=131072,
                          eos_token_ids=(151329, 151336, 151338), **_GLM4_9B),
    "glm-4-9b-0414": GLMConfig(model_type="glm4", rms_norm_eps=1e-05, max_position_embeddings=32768,
                               post_norms=True, eos_token_ids=(151329, 151336, 151338), **_GLM4_9B),
    "tiny": GLMConfig(model_type="glm", vocab_size=4096, hidden_size=256, intermediate_size=688, num_layers=4,
                      num_heads=4, num_kv_heads=2, head_dim=64, partial_rotary_factor=0.5, rope_theta=10000.0,
                      rms_norm_eps=1e-05, attention_bias=True, max_position_embeddings=2048,
                      eos_token_ids=(0,), pad_token_id=0),
}
