"""HF <-> Orbax conversion: bit-exact round trip, identical logits, atomic writes, clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

pytest.importorskip("torch")

from autoglm_jax import from_pretrained  # noqa: E402
from autoglm_jax.checkpoint.convert import convert_hf_to_orbax, export_orbax_to_hf  # noqa: E402
from autoglm_jax.checkpoint.safetensors_io import CheckpointError, SafetensorsReader  # noqa: E402

from .hf_fixtures import make_hf_model, save_hf  # noqa: E402


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    model = make_hf_model(model_type="glm4", layers=2)
    # Sharded on purpose: several files plus model.safetensors.index.json.
    return save_hf(model.to(dtype=__import__("torch").bfloat16), tmp_path_factory.mktemp("hf"),
                   max_shard_size="20KB")


def test_sharded_fixture_has_index(hf_dir):
    assert (hf_dir / "model.safetensors.index.json").exists()
    assert len(list(hf_dir.glob("*.safetensors"))) > 1


def test_round_trip_is_bit_exact(hf_dir, tmp_path):
    convert_hf_to_orbax(hf_dir, tmp_path / "orbax", progress=False)
    export_orbax_to_hf(tmp_path / "orbax", tmp_path / "back", progress=False)
    a, b = SafetensorsReader(hf_dir), SafetensorsReader(tmp_path / "back")
    assert sorted(a.names()) == sorted(b.names())
    for name in a.names():
        x, y = a.read(name), b.read(name)
        assert x.dtype == y.dtype and x.shape == y.shape
        assert x.tobytes() == y.tobytes(), name


def test_hf_and_orbax_give_identical_logits(hf_dir, tmp_path):
    convert_hf_to_orbax(hf_dir, tmp_path / "orbax", progress=False)
    ids = np.random.default_rng(0).integers(1, 200, size=(2, 11))
    from_hf = np.asarray(from_pretrained(hf_dir, progress=False)(ids))
    from_orbax = np.asarray(from_pretrained(tmp_path / "orbax", progress=False)(ids))
    assert np.isfinite(from_hf).all()
    np.testing.assert_array_equal(from_hf, from_orbax)


def test_convert_to_other_dtype(hf_dir, tmp_path):
    convert_hf_to_orbax(hf_dir, tmp_path / "f32", dtype="float32", progress=False)
    model = from_pretrained(tmp_path / "f32", progress=False)
    assert model.embed[...].dtype == np.float32
    ref = SafetensorsReader(hf_dir).read("model.embed_tokens.weight").astype(np.float32)
    np.testing.assert_array_equal(np.asarray(model.embed[...]), ref)


def _broken_copy(src, dst, edit):
    shutil.copytree(src, dst)
    edit(dst)
    return dst


def test_missing_unexpected_and_misshaped_tensors_listed_together(hf_dir, tmp_path):
    from safetensors.numpy import save_file

    def edit(d):
        idx = json.loads((d / "model.safetensors.index.json").read_text())
        wm = idx["weight_map"]
        gone = "model.layers.1.mlp.down_proj.weight"
        # Remove one tensor from its file, add an unexpected one, and mis-shape another.
        files = {}
        reader = SafetensorsReader(d)
        for name in reader.names():
            files.setdefault(wm[name], {})[name] = reader.read(name).astype(np.float32)
        del files[wm[gone]][gone]
        files[wm["model.norm.weight"]]["model.extra.weight"] = np.ones(3, np.float32)
        files[wm["model.norm.weight"]]["model.norm.weight"] = np.ones(7, np.float32)
        for f, tensors in files.items():
            save_file(tensors, str(d / f))
        wm.pop(gone)
        wm["model.extra.weight"] = wm["model.norm.weight"]
        (d / "model.safetensors.index.json").write_text(json.dumps(idx))

    bad = _broken_copy(hf_dir, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as e:
        from_pretrained(bad, progress=False)
    msg = str(e.value)
    assert "model.layers.1.mlp.down_proj.weight" in msg and "missing" in msg
    assert "model.extra.weight" in msg and "unexpected" in msg
    assert "model.norm.weight: [7]" in msg
    with pytest.raises(CheckpointError):
        convert_hf_to_orbax(bad, tmp_path / "never", progress=False)
    assert not (tmp_path / "never").exists()


def test_interrupted_conversion_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    from autoglm_jax.checkpoint import orbax_io

    calls = {"n": 0}
    real = orbax_io.write_group

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("killed half way")
        return real(*a, **k)

    monkeypatch.setattr(orbax_io, "write_group", dying)
    with pytest.raises(KeyboardInterrupt):
        convert_hf_to_orbax(hf_dir, tmp_path / "out", progress=False)
    assert calls["n"] == 2
    assert list(tmp_path.iterdir()) == []


def test_existing_output_is_not_overwritten(hf_dir, tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError):
        convert_hf_to_orbax(hf_dir, tmp_path / "out", progress=False)
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


def test_orbax_with_wrong_config_is_rejected(hf_dir, tmp_path):
    convert_hf_to_orbax(hf_dir, tmp_path / "o", progress=False)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    cfg["intermediate_size"] += 8
    (tmp_path / "o" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="gate_up_proj"):
        from_pretrained(tmp_path / "o", progress=False)


def test_not_a_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="neither"):
        from_pretrained(tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="preset"):
        from_pretrained("no-such-model", progress=False)


def test_orbax_loads_into_another_float_dtype(hf_dir, tmp_path):
    convert_hf_to_orbax(hf_dir, tmp_path / "o", progress=False)  # stored as bfloat16
    up = from_pretrained(tmp_path / "o", dtype="float32", progress=False)
    ref = from_pretrained(hf_dir, dtype="float32", progress=False)
    assert up.embed[...].dtype == np.float32
    ids = np.random.default_rng(1).integers(1, 200, size=(1, 9))
    np.testing.assert_array_equal(np.asarray(up(ids)), np.asarray(ref(ids)))
