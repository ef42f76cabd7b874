"""Bundle format, vector files, orthogonalization and GGUF round trip."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mergekit_ext.errors import CheckpointError, InvalidTensorError, OutputError, PickleNotAllowedError, RecipeError
from mergekit_ext.steer.bundle import BundleIntegrityError, SteeringBundle, load_bundle, save_bundle, verify_bundle
from mergekit_ext.steer.extract import extract_steering_vector
from mergekit_ext.steer.gguf_io import export_gguf, import_gguf
from mergekit_ext.steer.orthogonalize import orthogonalize_vector, project_out
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.steer.vector import SteeringVector, cosine


@pytest.fixture()
def bundle(model, tokenizer, pairs):
    vector = extract_steering_vector(model, tokenizer, pairs, [1, 2], PromptTemplate.from_chat_template(tokenizer))
    return SteeringBundle(vector=vector, pairs=pairs)


def test_bundle_round_trip(tmp_path, bundle):
    folder = save_bundle(bundle, tmp_path / "b")
    manifest = json.loads((folder / "bundle.json").read_text())
    assert set(manifest["files"]) == {"vector.safetensors", "pairs.jsonl"}
    assert manifest["recipe"]["template_hash"] == bundle.vector.recipe.template_hash
    loaded = load_bundle(folder)
    assert loaded.pairs == bundle.pairs
    assert loaded.vector.recipe == bundle.vector.recipe
    for layer in (1, 2):
        assert torch.equal(loaded.vector.directions[layer], bundle.vector.directions[layer])


def test_bundle_hash_mismatch(tmp_path, bundle):
    folder = save_bundle(bundle, tmp_path / "b")
    with (folder / "pairs.jsonl").open("a") as handle:
        handle.write('{"positive": "extra row", "negative": "extra"}\n')
    with pytest.raises(BundleIntegrityError, match="pairs.jsonl"):
        verify_bundle(folder)
    with pytest.raises(BundleIntegrityError):
        load_bundle(folder)


def test_bundle_refuses_nonempty_target(tmp_path, bundle):
    target = tmp_path / "b"
    target.mkdir()
    (target / "keep.txt").write_text("user file")
    with pytest.raises(OutputError):
        save_bundle(bundle, target)
    assert (target / "keep.txt").read_text() == "user file"


def test_pickle_file_rejected(tmp_path):
    path = tmp_path / "vector.pt"
    torch.save({"direction.3": torch.ones(4)}, path)
    with pytest.raises(PickleNotAllowedError, match="allow-pickle"):
        SteeringVector.load(path)
    disguised = tmp_path / "vector.safetensors"
    disguised.write_bytes(path.read_bytes())
    with pytest.raises(PickleNotAllowedError):
        SteeringVector.load(disguised)
    loaded = SteeringVector.load(path, allow_pickle=True)
    assert torch.equal(loaded.directions[3], torch.ones(4))


def test_orthogonalize_single_direction():
    generator = torch.Generator().manual_seed(3)
    vector = SteeringVector(directions={2: torch.randn(64, generator=generator)})
    refusal = torch.randn(64, generator=generator) * 7.0
    vector.directions[2] = vector.directions[2] - 0.8 * refusal
    projected, rows = orthogonalize_vector(vector, {2: refusal})
    assert abs(cosine(projected.directions[2], refusal)) < 1e-6
    unit = refusal / refusal.norm()
    expected = vector.directions[2] - (vector.directions[2] @ unit) * unit
    assert torch.allclose(projected.directions[2], expected, atol=1e-5)
    assert rows[0].cos_negative_refusal_before == pytest.approx(cosine(vector.directions[2], -refusal))
    assert rows[0].cos_negative_refusal_before > 0.5
    assert rows[0].norm_after < rows[0].norm_before


def test_orthogonalize_subspace():
    generator = torch.Generator().manual_seed(4)
    vector = torch.randn(32, generator=generator)
    subspace = torch.randn(3, 32, generator=generator)
    projected = project_out(vector, subspace)
    assert torch.allclose(subspace @ projected, torch.zeros(3), atol=1e-5)
    # Removing a subspace twice changes nothing more.
    assert torch.allclose(project_out(projected, subspace), projected, atol=1e-6)


def test_orthogonalize_wrong_width():
    vector = SteeringVector(directions={0: torch.randn(8)})
    with pytest.raises(InvalidTensorError):
        orthogonalize_vector(vector, torch.randn(9))
    with pytest.raises(RecipeError, match="layer 0"):
        orthogonalize_vector(vector, {1: torch.randn(8)})


def test_gguf_round_trip_bit_exact(tmp_path, bundle):
    path = export_gguf(bundle.vector, tmp_path / "control.gguf")
    loaded = import_gguf(path)
    assert loaded.layers == [1, 2]
    for layer in (1, 2):
        assert torch.equal(loaded.directions[layer], bundle.vector.directions[layer])
    assert loaded.recipe.template_hash == bundle.vector.recipe.template_hash


def test_gguf_layer_index_rule(tmp_path):
    import gguf

    vector = SteeringVector(directions={5: torch.arange(4, dtype=torch.float32)})
    path = export_gguf(vector, tmp_path / "control.gguf", alpha=2.0)
    reader = gguf.GGUFReader(str(path))
    field = reader.get_field("general.architecture")
    assert bytes(field.parts[field.data[0]]).decode() == "controlvector"
    (tensor,) = reader.tensors
    # Our layer 5 (output of block 5) is llama.cpp's direction.5, stored pre-scaled.
    assert tensor.name == "direction.5"
    assert np.array_equal(np.asarray(tensor.data).reshape(-1), np.array([0.0, 2.0, 4.0, 6.0], dtype=np.float32))
    with pytest.raises(RecipeError, match="block 0"):
        export_gguf(SteeringVector(directions={0: torch.ones(4)}), tmp_path / "zero.gguf")


def test_gguf_rejects_other_architecture(tmp_path):
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), arch="llama")
    writer.add_tensor("direction.1", np.ones(4, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="controlvector"):
        import_gguf(path)
