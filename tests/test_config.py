"""GLMConfig from presets and both Hugging Face config.json layouts; clear errors for bad configs."""

from __future__ import annotations

import json

import pytest

from autoglm_jax.config import ConfigError, GLMConfig

GLM4_9B_HF = {  # the keys of THUDM/glm-4-9b-chat-hf's config.json that matter (older layout: rope at top level)
    "model_type": "glm", "vocab_size": 151552, "hidden_size": 4096, "intermediate_size": 13696,
    "num_hidden_layers": 40, "num_attention_heads": 32, "num_key_value_heads": 2, "head_dim": 128,
    "partial_rotary_factor": 0.5, "rope_theta": 10000.0, "rms_norm_eps": 1.5625e-07, "attention_bias": True,
    "hidden_act": "silu", "max_position_embeddings": 131072, "eos_token_id": [151329, 151336, 151338],
    "pad_token_id": 151329, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


def test_old_layout_matches_preset():
    cfg = GLMConfig.from_hf_dict(GLM4_9B_HF)
    assert cfg == GLMConfig.from_preset("glm-4-9b")
    assert (cfg.hidden_size, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (4096, 40, 32, 2, 128)
    assert cfg.rotary_dim == 64 and cfg.q_per_kv == 16


def test_new_layout_rope_parameters():
    hf = {k: v for k, v in GLM4_9B_HF.items() if k not in ("partial_rotary_factor", "rope_theta")}
    hf["rope_parameters"] = {"rope_type": "default", "rope_theta": 500000.0, "partial_rotary_factor": 1.0}
    cfg = GLMConfig.from_hf_dict(hf)
    assert cfg.rope_theta == 500000.0 and cfg.partial_rotary_factor == 1.0 and cfg.rotary_dim == 128


def test_glm4_has_post_norms():
    cfg = GLMConfig.from_hf_dict({**GLM4_9B_HF, "model_type": "glm4"})
    assert cfg.post_norms and not GLMConfig.from_hf_dict(GLM4_9B_HF).post_norms


def test_round_trip_through_hf_dict(tmp_path):
    cfg = GLMConfig.from_preset("glm-4-9b-0414")
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_hf_dict()))
    assert GLMConfig.from_json_file(path) == cfg


def test_num_params_glm4_9b():
    # 9.40 B parameters: embedding + LM head 2 x 151552 x 4096, 40 layers of attention + MLP.
    n = GLMConfig.from_preset("glm-4-9b").num_params()
    per_layer = 4096 * 4608 + 4608 + 4096 * 4096 + 4096 * 27392 + 13696 * 4096 + 2 * 4096
    assert n == 2 * 151552 * 4096 + 40 * per_layer + 4096


@pytest.mark.parametrize("change, words", [
    ({"model_type": "llama"}, ["model_type", "glm4"]),
    ({"num_attention_heads": 31}, ["num_heads=31", "num_kv_heads=2"]),
    ({"hidden_act": "gelu"}, ["hidden_act", "silu"]),
    ({"partial_rotary_factor": 0.01}, ["partial_rotary_factor", "even"]),
])
def test_bad_config_names_key(change, words):
    with pytest.raises(ConfigError) as e:
        GLMConfig.from_hf_dict({**GLM4_9B_HF, **change})
    for w in words:
        assert w in str(e.value)


def test_missing_key_is_named():
    hf = dict(GLM4_9B_HF)
    del hf["intermediate_size"]
    with pytest.raises(ConfigError, match="intermediate_size"):
        GLMConfig.from_hf_dict(hf)


def test_unknown_preset_and_override_key():
    with pytest.raises(ConfigError, match="allowed"):
        GLMConfig.from_preset("glm-5")
    with pytest.raises(ConfigError, match="unknown config keys \\['hiden_size'\\]"):
        GLMConfig.from_preset("tiny", hiden_size=3)
