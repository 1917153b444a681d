"""Logits and greedy tokens equal Hugging Face ``transformers`` (GlmForCausalLM, Glm4ForCausalLM)."""

from __future__ import annotations

import numpy as np
import pytest

# Cases beyond the CPU subset (tests/conftest.py): on the CPU only with --runslow; on a GPU always.
FULL_GRID = {
    'test_padded_batch_logits_match[glm-gqa2-partial-bias]',
    'test_logits_match[glm-gqa2-partial-bias-7]',
    'test_logits_match[glm-gqa4-tied-7]',
}


torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from autoglm_jax import from_pretrained  # noqa: E402
from autoglm_jax.generate import GenerationConfig, generate  # noqa: E402

from .hf_fixtures import make_hf_model, save_hf  # noqa: E402

CASES = {
    "glm-gqa2-partial-bias": dict(model_type="glm", heads=4, kv_heads=2, partial=0.5, bias=True),
    "glm-gqa1-full-nobias": dict(model_type="glm", heads=4, kv_heads=4, partial=1.0, bias=False),
    "glm-gqa4-tied": dict(model_type="glm", heads=8, kv_heads=2, head_dim=8, partial=0.5, bias=True, tied=True),
    "glm4-gqa2-partial-bias": dict(model_type="glm4", heads=4, kv_heads=2, partial=0.5, bias=True),
    "glm4-gqa4-full-tied-nobias": dict(model_type="glm4", heads=8, kv_heads=2, head_dim=8, partial=1.0,
                                       bias=False, tied=True),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    hf = make_hf_model(**CASES[request.param])
    path = save_hf(hf, tmp_path_factory.mktemp(request.param))
    return hf, from_pretrained(path, dtype="float32", progress=False)


def _rel_err(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("length", [1, 7, 33])
def test_logits_match(pair, length):
    hf, ours = pair
    ids = np.random.default_rng(length).integers(1, hf.config.vocab_size - 1, size=(2, length))
    with torch.no_grad():
        want = hf(torch.tensor(ids)).logits.numpy()
    got = np.asarray(ours(ids))
    assert got.shape == want.shape
    assert _rel_err(got, want) < 1e-4


def test_padded_batch_logits_match(pair):
    hf, ours = pair
    ids = np.random.default_rng(5).integers(1, hf.config.vocab_size - 1, size=(2, 9))
    mask = np.ones_like(ids)
    mask[1, 6:] = 0  # right padding on row 1
    with torch.no_grad():
        want = hf(torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    got = np.asarray(ours(ids, attention_mask=mask))
    assert _rel_err(got[0], want[0]) < 1e-4
    assert _rel_err(got[1, :6], want[1, :6]) < 1e-4


def test_greedy_tokens_match_hf_generate(pair):
    hf, ours = pair
    prompt = np.random.default_rng(11).integers(1, hf.config.vocab_size - 1, size=(1, 12))
    with torch.no_grad():
        want = hf.generate(torch.tensor(prompt), max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0, min_new_tokens=32)[0, 12:].tolist()
    got = generate(ours, prompt.tolist(), GenerationConfig(max_new_tokens=32, eos_token_ids=()))[0]
    assert got == want
