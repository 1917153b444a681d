"""Memory model: formulas checked against hand-computed numbers (the seed's KV example, GQA, int8, int4)."""

import pytest

from autoglm_jax.config import GLMConfig
from autoglm_jax.memory import (QuantSpec, format_memory_table, kv_bytes_per_token_per_layer, kv_cache_bytes,
                                memory_main, param_bytes, plan_memory, workspace_bytes)

SEED = GLMConfig(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, head_dim=128)
TINY = GLMConfig.from_preset("tiny")  # V=4096 D=256 F=688 layers=4 N=4 K=2 H=64, bias, untied


def test_seed_kv_example():
    # 2 x T x h x d values per layer, 32 layers, fp32: 2*2048*32*128*4*32 bytes, "about 2.15 GB".
    assert kv_cache_bytes(SEED, kv_dtype="float32", tokens=2048) == 2_147_483_648
    assert abs(kv_cache_bytes(SEED, kv_dtype="float32", tokens=2048) / 1e9 - 2.15) < 0.01


def test_gqa_and_int8_kv():
    glm = GLMConfig.from_preset("glm-4-9b")  # K=2, H=128, 40 layers
    assert kv_bytes_per_token_per_layer(glm, "bfloat16") == 2 * 2 * 128 * 2 == 1024
    # int8 values + a float32 scale per token per head for K and V: 512 + 16
    assert kv_bytes_per_token_per_layer(glm, "int8") == 528
    plan = plan_memory(glm, dtype="bfloat16", kv_dtype="int8", batch=32, context=8192, page_size=16)
    assert plan.page_bytes == 16 * 40 * 528
    assert plan.pages_per_seq == 512
    assert plan.kv_bytes_needed == (32 * 512 + 1) * 16 * 40 * 528


def test_float_params_match_parameter_count():
    for name in ("tiny", "glm-4-9b", "glm-4-9b-0414"):
        cfg = GLMConfig.from_preset(name)
        assert sum(param_bytes(cfg, dtype="float32").values()) == 4 * cfg.num_params()
        assert sum(param_bytes(cfg, dtype="bfloat16").values()) == 2 * cfg.num_params()
    tied = TINY.replace(tie_word_embeddings=True)
    assert param_bytes(tied, dtype="float16")["lm_head"] == 0


def test_int8_params_hand_computed():
    # per layer: qkv 256*512 + 512*4; o 256*256 + 256*4; gate_up 256*1376 + 1376*4; down 688*256 + 256*4;
    # bias 512*2; 2 norms 2*256*2.  Embed + lm_head bf16: 2 * 4096*256*2; final norm 256*2.
    per_layer = 133120 + 66560 + 357760 + 177152 + 1024 + 1024
    expected = 4 * per_layer + 2 * 4096 * 256 * 2 + 512
    assert sum(param_bytes(TINY, dtype="bfloat16", quant="int8").values()) == expected == 7_141_376


def test_int4_grouped_params_hand_computed():
    q = QuantSpec(method="int4", group_size=64, scale_dtype="float32", zero_point=True)
    # kernel bytes I*O/2 + ceil(I/64)*O*(4 scale + 4 zero); down_proj has I=688 -> 11 groups
    qkv = 256 * 512 // 2 + 4 * 512 * 8
    o = 256 * 256 // 2 + 4 * 256 * 8
    gate_up = 256 * 1376 // 2 + 4 * 1376 * 8
    down = 688 * 256 // 2 + 11 * 256 * 8
    per_layer = qkv + o + gate_up + down + 1024 + 1024
    assert sum(param_bytes(TINY, dtype="bfloat16", quant=q).values()) == 4 * per_layer + 4_194_304 + 512 == 6_017_536
    # quantizing the LM head too is a parameter
    q_head = QuantSpec(method="int8", targets=("lm_head",))
    assert param_bytes(TINY, dtype="bfloat16", quant=q_head)["lm_head"] == 256 * 4096 + 4096 * 4


def test_workspace_hand_computed():
    ws = workspace_bytes(TINY, dtype="bfloat16", batch=4, chunk=32)
    assert ws["resid"] == 2 * 32 * 256 * 2
    assert ws["attention"] == 32 * 512 * 2 + 32 * 256 * 2
    assert ws["mlp"] == 32 * 1376 * 2 + 32 * 688 * 2
    assert ws["head"] == 4 * 4096 * 6 + 4 * 4096 * 8
    assert ws["total"] == 32768 + 229376


def test_pages_from_free_memory():
    base = plan_memory(TINY, dtype="bfloat16", batch=4, context=64, page_size=16, chunk=32)
    free = base.param_bytes + base.workspace_bytes + 10 * base.page_bytes + base.page_bytes // 2
    plan = plan_memory(TINY, dtype="bfloat16", batch=4, context=64, page_size=16, chunk=32, free_bytes=free,
                       headroom=0.0)
    assert plan.num_pages == 10
    assert plan.max_seqs_at_context == 9 // 4 == 2
    assert plan.fits is False
    assert base.fits is None and base.num_pages is None


def test_table_and_cli(capsys):
    plan = plan_memory(TINY, dtype="bfloat16", kv_dtype="int8", batch=2, context=128, free_bytes=2 ** 30)
    table = format_memory_table(plan)
    assert "| params (total) |" in table and "KV pages to allocate" in table
    assert f"{plan.num_pages:,}" in table
    assert memory_main(["--model", "glm-4-9b", "--dtype", "bfloat16", "--kv-dtype", "int8", "--batch", "32",
                        "--context", "8192"]) == 0
    out = capsys.readouterr().out
    assert "kv per token per layer | 528 |" in out
    assert memory_main(["--model", "glm-4-9b", "--context", "999999999"]) == 2
    assert "max_position_embeddings" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    (dict(dtype="float64"), "dtype='float64' is unknown"),
    (dict(kv_dtype="int4"), "kv_dtype='int4' is unknown"),
    (dict(batch=0), "batch=0 must be a positive integer"),
    (dict(quant="int3"), "quantization method 'int3' is unknown"),
])
def test_bad_arguments(kwargs, match):
    args = dict(dtype="bfloat16", batch=1, context=64)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        plan_memory(TINY, **args)
