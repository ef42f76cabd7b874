"""`merge steer` commands end to end on a tiny random model folder.

The instruction files here hold neutral made-up strings for the mechanics only.
"""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from mergekit_ext.cli.main import cli
from mergekit_ext.steer.bundle import load_bundle
from mergekit_ext.steer.gguf_io import import_gguf
from mergekit_ext.steer.vector import SteeringVector, cosine


def _run(*args: str, expect: int = 0):
    result = CliRunner().invoke(cli, ["--device", "cpu", *args], catch_exceptions=False)
    assert result.exit_code == expect, result.output
    return result


def test_steer_workflow(tmp_path, model_folder, pairs):
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"prompt": p.positive, "prompt_without_instruction": p.negative}) + "\n" for p in pairs))
    harmful = tmp_path / "group_a.json"
    harmless = tmp_path / "group_b.json"
    harmful.write_text(json.dumps([{"instruction": text, "category": None} for text in ["Paint the fence", "Stack the boxes", "Fold the crane"]]))
    harmless.write_text(json.dumps([{"instruction": text, "category": None} for text in ["Name a color", "Count to five", "List two fruits"]]))

    _run("steer", "extract", "--model", str(model_folder), "--pairs", str(pairs_file), "--layer", "2", "--output", str(tmp_path / "bundle"))
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.vector.layers == [2]
    assert bundle.vector.recipe.protocol == "prefill"

    out = _run("steer", "generate", "--model", str(model_folder), "--vector", str(tmp_path / "bundle"), "--prompt", "hi", "--max-new-tokens", "3", "--alpha", "2")
    assert json.loads(out.stdout.strip().splitlines()[-1])["alpha"] == 2.0

    _run("steer", "refusal", "--model", str(model_folder), "--harmful", str(harmful), "--harmless", str(harmless), "--layer", "2", "--output", str(tmp_path / "r.safetensors"))
    refusal = SteeringVector.load(tmp_path / "r.safetensors")

    out = _run("steer", "orthogonalize", str(tmp_path / "bundle"), "--refusal", str(tmp_path / "r.safetensors"), "--output", str(tmp_path / "ortho"))
    assert "cos(v, -r)" in out.output
    projected = load_bundle(tmp_path / "ortho")
    assert abs(cosine(projected.vector.directions[2], refusal.directions[2])) < 1e-6

    # The orthogonalized bundle re-derives through its stored refusal direction.
    out = _run("steer", "audit", str(tmp_path / "ortho"), "--model", str(model_folder), "--json-report", str(tmp_path / "audit.json"))
    assert json.loads((tmp_path / "audit.json").read_text())["passed"] is True
    assert "not that it is safe" in out.output

    _run("steer", "export-gguf", str(tmp_path / "bundle"), "--output", str(tmp_path / "v.gguf"), "--alpha", "1")
    assert torch.equal(import_gguf(tmp_path / "v.gguf").directions[2], bundle.vector.directions[2])
    _run("steer", "import-gguf", str(tmp_path / "v.gguf"), "--output", str(tmp_path / "v.safetensors"))
    assert torch.equal(SteeringVector.load(tmp_path / "v.safetensors").directions[2], bundle.vector.directions[2])

    out = _run("steer", "abliterate", "--model", str(model_folder), "--refusal", str(tmp_path / "r.safetensors"), "--output", str(tmp_path / "abl"))
    assert "8 tensors edited" in out.output


def test_audit_exit_status_on_tampering(tmp_path, model_folder, pairs):
    pairs_file = tmp_path / "pairs.jsonl"
    pairs_file.write_text("".join(json.dumps({"positive": p.positive, "negative": p.negative}) + "\n" for p in pairs))
    _run("steer", "extract", "--model", str(model_folder), "--pairs", str(pairs_file), "--layer", "1", "--output", str(tmp_path / "bundle"))
    vector_file = tmp_path / "bundle" / "vector.safetensors"
    vector = SteeringVector.load(vector_file)
    vector.directions[1] = vector.directions[1] * 1.5
    vector.save(vector_file)
    out = _run("steer", "audit", str(tmp_path / "bundle"), "--model", str(model_folder), "--markdown-report", str(tmp_path / "a.md"), expect=1)
    assert "FAIL" in out.output
    assert "file hashes" in (tmp_path / "a.md").read_text()


def test_user_errors_exit_2(tmp_path, model_folder):
    bad = tmp_path / "pairs.jsonl"
    bad.write_text('{"positive": "", "negative": "x"}\n')
    out = _run("steer", "extract", "--model", str(model_folder), "--pairs", str(bad), "--layer", "0", "--output", str(tmp_path / "b"), expect=2)
    assert "empty" in out.output
    pickled = tmp_path / "v.pt"
    torch.save({"direction.1": torch.ones(32)}, pickled)
    out = _run("steer", "generate", "--model", str(model_folder), "--vector", str(pickled), "--prompt", "hi", expect=2)
    assert "allow-pickle" in out.output
    out = _run("steer", "refusal", "--model", str(model_folder), "--harmful", str(tmp_path / "missing.json"), "--harmless", str(bad), "--output", str(tmp_path / "r.safetensors"), expect=2)
    assert "missing.json not found" in out.output
