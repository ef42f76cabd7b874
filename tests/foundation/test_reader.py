"""The lazy checkpoint reader: layouts, lazy loading and refusals."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from mergekit_ext.checkpoint import Checkpoint
from mergekit_ext.errors import CheckpointError, PickleNotAllowedError
from mergekit_ext.tiny import tiny_state_dict


def write_sharded(folder: Path, state: dict[str, torch.Tensor], shards: int = 2) -> Path:
    folder.mkdir(parents=True)
    names = list(state)
    weight_map = {}
    for index in range(shards):
        file_name = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        part = {name: state[name] for name in names[index::shards]}
        save_file(part, str(folder / file_name))
        weight_map.update({name: file_name for name in part})
    index_data = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index_data))
    return folder


def test_sharded_folder_lists_all_tensors(tmp_path: Path) -> None:
    state = tiny_state_dict("llama", seed=3)
    checkpoint = Checkpoint.open(write_sharded(tmp_path / "sharded", state))
    assert sorted(checkpoint.names) == sorted(state)
    assert len(checkpoint.files) == 2
    for name, tensor in state.items():
        assert checkpoint.info(name).shape == tuple(tensor.shape)
        assert torch.equal(checkpoint.load(name), tensor)


def test_single_file_and_folder_agree(tmp_path: Path) -> None:
    state = tiny_state_dict("gpt2", seed=1)
    folder = tmp_path / "single"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    from_folder = Checkpoint.open(folder)
    from_file = Checkpoint.open(folder / "model.safetensors")
    assert from_folder.names == from_file.names
    assert from_folder.sha256() == from_file.sha256()


def test_names_follow_file_offset_order(tmp_path: Path) -> None:
    folder = tmp_path / "ordered"
    folder.mkdir()
    save_file(tiny_state_dict("bert"), str(folder / "model.safetensors"))
    checkpoint = Checkpoint.open(folder)
    offsets = [checkpoint.info(name).offset for name in checkpoint.names]
    assert offsets == sorted(offsets)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found") as error:
        Checkpoint.open(tmp_path / "nowhere")
    assert "nowhere" in str(error.value)


def test_folder_without_weights(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model weights found"):
        Checkpoint.open(tmp_path / "empty")


def test_missing_shard_is_named(tmp_path: Path) -> None:
    folder = write_sharded(tmp_path / "sharded", tiny_state_dict("llama"))
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="model-00002-of-00002.safetensors is listed in the index but missing"):
        Checkpoint.open(folder)


def test_malformed_index(tmp_path: Path) -> None:
    folder = tmp_path / "bad-index"
    folder.mkdir()
    (folder / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(CheckpointError, match="malformed index"):
        Checkpoint.open(folder)


def test_several_files_without_index(tmp_path: Path) -> None:
    folder = tmp_path / "loose"
    folder.mkdir()
    save_file({"a": torch.ones(1)}, str(folder / "a.safetensors"))
    save_file({"b": torch.ones(1)}, str(folder / "b.safetensors"))
    with pytest.raises(CheckpointError, match="no model.safetensors.index.json"):
        Checkpoint.open(folder)


def test_pickle_needs_allow_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    state = {"w": torch.arange(4.0)}
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(PickleNotAllowedError, match="--allow-pickle"):
        Checkpoint.open(folder)
    checkpoint = Checkpoint.open(folder, allow_pickle=True)
    assert torch.equal(checkpoint.load("w"), state["w"])


class Payload:
    """An arbitrary object: weights_only loading must refuse to unpickle it."""


def test_pickle_with_objects_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(2), "payload": Payload()}, path)
    with pytest.raises(CheckpointError, match="cannot load pickled weights safely"):
        Checkpoint.open(path, allow_pickle=True)


def test_unknown_tensor_name(tmp_path: Path) -> None:
    folder = tmp_path / "m"
    folder.mkdir()
    save_file({"a": torch.ones(1)}, str(folder / "model.safetensors"))
    with pytest.raises(CheckpointError, match="'zzz' not found"):
        Checkpoint.open(folder).info("zzz")
