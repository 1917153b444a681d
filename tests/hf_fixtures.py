"""Builders for small random ``transformers`` GLM models (torch), saved as HF checkpoints."""

from __future__ import annotations

from pathlib import Path


def make_hf_model(*, model_type="glm", vocab=257, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16,
                  inter=96, partial=0.5, bias=True, tied=False, seed=0, std=0.15, old_layout=False):
    """A float32 GlmForCausalLM / Glm4ForCausalLM with every parameter random (norms and biases too)."""
    import torch
    import transformers

    torch.manual_seed(seed)
    kw = dict(vocab_size=vocab, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
              num_key_value_heads=kv_heads, head_dim=head_dim, intermediate_size=inter, attention_bias=bias,
              tie_word_embeddings=tied, max_position_embeddings=512, rms_norm_eps=1e-5, pad_token_id=0,
              eos_token_id=[vocab - 1], bos_token_id=None)
    kw["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": partial}
    if model_type == "glm":
        cfg, cls = transformers.GlmConfig(**kw), transformers.GlmForCausalLM
    else:
        cfg, cls = transformers.Glm4Config(**kw), transformers.Glm4ForCausalLM
    model = cls(cfg).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(std * torch.randn_like(p))
    return model


def save_hf(model, directory: Path, *, old_layout=False, max_shard_size=None) -> Path:
    """Saves with safetensors; ``old_layout`` rewrites config.json with rope keys at the top level."""
    import json

    kw = {"safe_serialization": True}
    if max_shard_size:
        kw["max_shard_size"] = max_shard_size
    model.save_pretrained(directory, **kw)
    if old_layout:
        path = directory / "config.json"
        cfg = json.loads(path.read_text())
        rope = cfg.pop("rope_parameters")
        cfg["rope_theta"] = rope["rope_theta"]
        cfg["partial_rotary_factor"] = rope["partial_rotary_factor"]
        path.write_text(json.dumps(cfg))
    return directory
