"""``autoglm quantize``: quantized checkpoints round-trip exactly and load through ``from_pretrained``; bad input
is refused before any work and leaves nothing behind."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autoglm_jax import loading
from autoglm_jax.quant.cli import quantize_main


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    text = "\n\n".join(f"def f{i}(x):\n    return x * {i} + len(str(x))\n" for i in range(40))
    (d / "calib.txt").write_text(text)
    return d / "calib.txt"


def _no_output(out):
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.partial")]


def test_static_w8a8_checkpoint_round_trips_exactly(tmp_path, calib_file):
    out = tmp_path / "w8a8"
    assert quantize_main(["tiny", str(out), "--method", "w8a8", "--calib", str(calib_file), "--observer",
                          "percentile:99.9", "--calib-samples", "8", "--calib-seq-len", "64", "--quiet"]) == 0
    meta = loading.orbax_io.read_marker(out)
    assert meta["quantization"] == {"fmt": "w8a8", "group": 128, "symmetric": True, "keep_float": ["lm_head"],
                                    "static_activations": True}
    # what is on disk: int8 weights [O, I], float32 scales, no float kernel for a quantized layer
    import orbax.checkpoint as ocp
    stored = ocp.PyTreeCheckpointer().metadata(out / "params" / "layers.0").item_metadata.tree
    qkv = stored["attn"]["qkv_proj"]
    assert set(qkv) == {"qweight", "scale", "bias", "act_scale"}
    assert np.dtype(qkv["qweight"].dtype) == np.int8 and tuple(qkv["qweight"].shape) == (512, 256)
    model = loading.from_pretrained(out, progress=False)
    leaves = nnx.to_pure_dict(nnx.state(model))["layers"][0]["attn"]["qkv_proj"]
    assert leaves["qweight"].dtype == jnp.int8 and leaves["act_scale"].dtype == jnp.float32
    assert float(model.layers[1].mlp.down_proj.act_scale[...][0]) != 1.0  # calibrated, not the placeholder


def test_in_memory_model_equals_reloaded(tmp_path):
    from autoglm_jax.checkpoint.convert import save_pretrained
    from autoglm_jax.quant import PTQConfig, quantize
    model = loading.from_pretrained("tiny")
    report = quantize(model, PTQConfig(method="int4", group=64, symmetric=False, keep_indivisible=True))
    save_pretrained(model, tmp_path / "q", quantization=report.quantization)
    back = loading.from_pretrained(tmp_path / "q", progress=False)
    s1, s2 = nnx.to_pure_dict(nnx.state(model)), nnx.to_pure_dict(nnx.state(back))
    assert jax.tree.structure(s1) == jax.tree.structure(s2)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert back.layers[0].attn.qkv_proj.qweight[...].dtype == jnp.uint8
    ids = jnp.asarray([[5, 17, 300, 2, 99, 1000, 7, 8]], jnp.int32)
    run = lambda m: jax.jit(lambda s, i: nnx.merge(nnx.graphdef(m), s)(i))(nnx.state(m), ids)
    np.testing.assert_array_equal(np.asarray(run(model)), np.asarray(run(back)))


def test_generate_loads_quantized_checkpoint(tmp_path, capsys):
    from autoglm_jax.cli import main
    out = tmp_path / "int8"
    assert quantize_main(["tiny", str(out), "--method", "int8", "--quiet"]) == 0
    assert main(["generate", "--model", str(out), "--prompt", "def f(x):", "--max-new-tokens", "4"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote {out}") and printed.split("\n", 1)[1].startswith("def f(x):")


def test_int8_layouts_nk_and_auto_round_trip_and_load(tmp_path):
    from autoglm_jax.quant import PTQConfig, quantize
    kn_dir, nk_dir, auto_dir = tmp_path / "kn", tmp_path / "nk", tmp_path / "auto"
    assert quantize_main(["tiny", str(kn_dir), "--method", "int8", "--quiet"]) == 0
    assert quantize_main(["tiny", str(nk_dir), "--method", "int8", "--int8-layout", "nk", "--quiet"]) == 0
    assert quantize_main(["tiny", str(auto_dir), "--method", "int8", "--int8-layout", "auto", "--quiet"]) == 0
    # the layout is recorded only when K-major: a kn marker is what checkpoints before the option hold
    assert "k_major" not in loading.orbax_io.read_marker(kn_dir)["quantization"]
    meta = loading.orbax_io.read_marker(nk_dir)
    assert meta["quantization"]["k_major"] is True and meta["ptq"]["int8_layout"] == "nk"
    import orbax.checkpoint as ocp
    stored = ocp.PyTreeCheckpointer().metadata(nk_dir / "params" / "layers.0").item_metadata.tree
    assert tuple(stored["mlp"]["down_proj"]["qweight"].shape) == (256, 688)  # [N, K]: D=256 outputs, F=688 inputs
    kn, nk = (loading.from_pretrained(d, progress=False) for d in (kn_dir, nk_dir))
    assert not kn.layers[0].mlp.down_proj.k_major and nk.layers[0].mlp.down_proj.k_major
    # exact round trip: the reloaded nk model equals the in-memory one, and holds kn's values transposed
    ref = loading.from_pretrained("tiny")
    quantize(ref, PTQConfig(method="int8", k_major=True))
    s_ref, s_nk, s_kn = (nnx.to_pure_dict(nnx.state(m)) for m in (ref, nk, kn))
    assert jax.tree.structure(s_ref) == jax.tree.structure(s_nk) == jax.tree.structure(s_kn)
    flat = lambda s: jax.tree_util.tree_flatten_with_path(s)[0]
    for (path, a), (_, b), (_, c) in zip(flat(s_ref), flat(s_nk), flat(s_kn)):
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        transposed = getattr(path[-1], "key", None) == "qweight"
        np.testing.assert_array_equal(np.asarray(b), np.asarray(c).T if transposed else np.asarray(c))
    ids = jnp.asarray([[5, 17, 300, 2, 99, 1000, 7, 8]], jnp.int32)
    run = lambda m: jax.jit(lambda s, i: nnx.merge(nnx.graphdef(m), s)(i))(nnx.state(m), ids)
    np.testing.assert_array_equal(np.asarray(run(ref)), np.asarray(run(nk)))
    np.testing.assert_allclose(np.asarray(run(nk)), np.asarray(run(kn)), rtol=1e-4, atol=1e-4)
    # auto: recorded as "auto"; per layer nk unless K > N (the tiny down_proj 688 -> 256 stays kn)
    meta = loading.orbax_io.read_marker(auto_dir)
    assert meta["quantization"]["k_major"] == "auto" and meta["ptq"]["int8_layout"] == "auto"
    stored = ocp.PyTreeCheckpointer().metadata(auto_dir / "params" / "layers.0").item_metadata.tree
    assert tuple(stored["mlp"]["down_proj"]["qweight"].shape) == (688, 256)  # [K, N]
    assert tuple(stored["mlp"]["gate_up_proj"]["qweight"].shape) == (1376, 256)  # [N, K]
    auto = loading.from_pretrained(auto_dir, progress=False)
    lins = lambda layer: (layer.attn.qkv_proj, layer.attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj)
    for la, lk in zip(auto.layers, kn.layers):
        assert [lin.k_major for lin in lins(la)] == [True, True, True, False]
        for a, k in zip(lins(la), lins(lk)):  # kn's values, in each layer's own layout
            np.testing.assert_array_equal(np.asarray(a.weight().kn_qweight()), np.asarray(k.qweight[...]))
            np.testing.assert_array_equal(np.asarray(a.scale[...]), np.asarray(k.scale[...]))
    np.testing.assert_allclose(np.asarray(run(auto)), np.asarray(run(kn)), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("argv,message", [
    (["--method", "int8", "--int8-layout", "kmajor"], "--int8-layout 'kmajor' is not a layout; allowed: 'kn'"),
    (["--method", "int4", "--group-size", "64", "--int8-layout", "nk"], "is for --method int8 only"),
    (["--method", "w8a8", "--int8-layout", "auto"], "is for --method int8 only"),
    (["--method", "int8", "--int4-layout", "nk"], "is for --method int4 only"),
    (["--method", "int4", "--group-size", "64", "--int4-layout", "kmajor"], "--int4-layout 'kmajor' is not a layout"),
    (["--method", "int3"], "unknown quantization method 'int3'"),
    (["--method", "int4", "--group-size", "32"], "group size 32 is not supported"),
    (["--method", "int4", "--group-size", "128"], "does not divide K = I = 688"),
    (["--method", "int8", "--observer", "kl"], "unknown observer 'kl'"),
    (["--method", "w8a8", "--activations", "static"], "needs --calib"),
])
def test_bad_arguments_fail_before_work(tmp_path, capsys, argv, message):
    out = tmp_path / "q"
    with pytest.raises(SystemExit) as e:
        quantize_main(["tiny", str(out), *argv])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    _no_output(out)


def test_bad_calibration_files(tmp_path, capsys):
    out = tmp_path / "q"
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n")
    blank_jsonl = tmp_path / "c.jsonl"
    blank_jsonl.write_text('{"text": ""}\n""\n')
    for path, message in ((empty, "is empty"), (blank_jsonl, "holds no tokens"),
                          (tmp_path / "missing.txt", "does not exist")):
        with pytest.raises(SystemExit) as e:
            quantize_main(["tiny", str(out), "--method", "w8a8", "--calib", str(path)])
        assert e.value.code == 2 and message in capsys.readouterr().err
        _no_output(out)
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(SystemExit):
        quantize_main(["tiny", str(existing), "--method", "int8"])
    assert "already exists" in capsys.readouterr().err
