"""The one mapping between Hugging Face GLM tensor names and this project's parameter paths.

HF stores linear weights as ``[O, I]``; here kernels are ``[I, O]``. q/k/v projections are fused into
one ``qkv_proj`` (``[D, (N + 2K) H]``), so three HF tensors map to one parameter and back, bit-exact.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from ..config import GLMConfig

Path = tuple  # a parameter's path in the model state, e.g. ("layers", 3, "attn", "qkv_proj", "kernel")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass(frozen=True)
class TensorRule:
    path: Path
    sources: tuple[str, ...]  # HF names, concatenated in this order along the output axis
    transpose: bool  # HF [O, I] -> ours [I, O]
    hf_shapes: tuple[tuple[int, ...], ...]

    def to_ours(self, arrays: list[np.ndarray]) -> np.ndarray:
        parts = [a.T if self.transpose else a for a in arrays]
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=-1)

    def to_hf(self, array: np.ndarray) -> list[np.ndarray]:
        sizes = [s[0] for s in self.hf_shapes]
        parts = np.split(array, np.cumsum(sizes)[:-1], axis=-1) if len(sizes) > 1 else [array]
        return [np.ascontiguousarray(p.T if self.transpose else p) for p in parts]

    @property
    def group(self) -> str:
        """Checkpoint group: ``embed``, ``layers.<i>`` or ``head``; one group is saved and loaded at a time."""
        return f"layers.{self.path[1]}" if self.path[0] == "layers" else ("embed" if self.path[0] == "embed"
                                                                            else "head")


def hf_rules(cfg: GLMConfig) -> list[TensorRule]:
    """Every parameter of the model, in checkpoint order (embedding, layers, final norm, LM head)."""
    d, f, h = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    qo, ko = cfg.num_heads * h, cfg.num_kv_heads * h
    rules = [TensorRule(("embed",), ("model.embed_tokens.weight",), False, ((cfg.vocab_size, d),))]
    for i in range(cfg.num_layers):
        p, L = f"model.layers.{i}.", ("layers", i)
        norm = lambda ours, hf: TensorRule(L + (ours, "scale"), (p + hf + ".weight",), False, ((d,),))
        rules.append(norm("input_norm", "input_layernorm"))
        qkv = tuple(p + f"self_attn.{x}_proj" for x in "qkv")
        rules.append(TensorRule(L + ("attn", "qkv_proj", "kernel"), tuple(n + ".weight" for n in qkv), True,
                                ((qo, d), (ko, d), (ko, d))))
        if cfg.attention_bias:
            rules.append(TensorRule(L + ("attn", "qkv_proj", "bias"), tuple(n + ".bias" for n in qkv), False,
                                    ((qo,), (ko,), (ko,))))
        rules.append(TensorRule(L + ("attn", "o_proj", "kernel"), (p + "self_attn.o_proj.weight",), True,
                                ((d, qo),)))
        if cfg.post_norms:
            rules.append(norm("post_attn_norm", "post_self_attn_layernorm"))
        rules.append(norm("mlp_norm", "post_attention_layernorm"))
        rules.append(TensorRule(L + ("mlp", "gate_up_proj", "kernel"), (p + "mlp.gate_up_proj.weight",), True,
                                ((2 * f, d),)))
        rules.append(TensorRule(L + ("mlp", "down_proj", "kernel"), (p + "mlp.down_proj.weight",), True, ((d, f),)))
        if cfg.post_norms:
            rules.append(norm("post_mlp_norm", "post_mlp_layernorm"))
    rules.append(TensorRule(("final_norm", "scale"), ("model.norm.weight",), False, ((d,),)))
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule(("lm_head", "kernel"), ("lm_head.weight",), True, ((cfg.vocab_size, d),)))
    return rules


def check_hf_tensors(cfg: GLMConfig, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raises one error listing every missing, unexpected and mis-shaped tensor (before any device work)."""
    from .safetensors_io import CheckpointError

    expected = {n: s for r in hf_rules(cfg) for n, s in zip(r.sources, r.hf_shapes)}
    problems = []
    missing = sorted(set(expected) - set(shapes))
    if missing:
        problems.append(f"missing tensors ({len(missing)}): {missing[:20]}" + (" ..." if len(missing) > 20 else ""))
    tolerated = {"lm_head.weight"} if cfg.tie_word_embeddings else set()
    unexpected = sorted(n for n in set(shapes) - set(expected) - tolerated if not n.endswith(IGNORED_SUFFIXES))
    if unexpected:
        problems.append(f"unexpected tensors ({len(unexpected)}): {unexpected[:20]}"
                        + (" ..." if len(unexpected) > 20 else ""))
    bad = [f"{n}: {list(shapes[n])} (expected {list(s)})" for n, s in expected.items()
           if n in shapes and tuple(shapes[n]) != tuple(s)]
    if bad:
        problems.append(f"mis-shaped tensors ({len(bad)}): " + "; ".join(bad[:20]))
    if problems:
        raise CheckpointError("checkpoint does not match the config:\n  " + "\n  ".join(problems))
