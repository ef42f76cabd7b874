"""Model cards: Hub front matter, input names, Evo-L2S members, fronts and MASS artifacts."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import yaml

from mergekit_ext import __version__
from mergekit_ext.checkpoint.card import (
    CardInput,
    EvoFront,
    EvoMember,
    ModelCard,
    card_input_for,
    evo_member_card,
    front_summary_card,
    hub_id_of,
    is_repo_id,
    markdown_table,
    mass_artifact_card,
    read_front_matter,
)
from mergekit_ext.engine import MergeOptions, run_recipe
from mergekit_ext.mass.config import MassConfig, RouterConfig, StorageReport
from mergekit_ext.recipe import parse_recipe

SHA_A = "a" * 64
SHA_B = "b" * 64


def front_matter(markdown: str) -> dict:
    match = re.match(r"\A---\n(.*?)\n---\n", markdown, re.DOTALL)
    assert match, "card has no front matter"
    return yaml.safe_load(match.group(1))


def yaml_blocks(markdown: str) -> list[dict]:
    return [yaml.safe_load(block) for block in re.findall(r"```yaml\n(.*?)\n```", markdown, re.DOTALL)]


def test_classic_card_metadata() -> None:
    card = ModelCard(
        "my merge",
        "ties",
        [CardInput("base", SHA_A, "base", repo_id="org/base-7b"), CardInput("/home/alice/models/ft", SHA_B)],
        {"parameters": {"density": 0.5}},
        7,
        "apache-2.0",
    )
    markdown = card.render()
    metadata = front_matter(markdown)

    assert metadata["base_model"] == ["org/base-7b", "ft"]
    assert metadata["base_model_relation"] == "merge"
    assert metadata["tags"] == ["merge", "mergekit-ext", "ties"]
    assert metadata["library_name"] == "transformers"
    assert metadata["license"] == "apache-2.0"
    assert "/home/alice" not in markdown
    assert f"| base | org/base-7b | `{SHA_A}` |" in markdown
    assert f"| model | ft | `{SHA_B}` |" in markdown
    assert "- **Seed:** `7`" in markdown
    assert f"mergekit-ext {__version__}" in markdown
    assert yaml_blocks(markdown) == [{"merge_method": "ties", "parameters": {"density": 0.5}}]
    assert "`merge --seed 7 run merge_recipe.yaml --output OUT`" in markdown
    assert "point them at copies of the same inputs" in markdown


def test_input_names_without_repo_id() -> None:
    assert CardInput("Qwen/Qwen2.5-Math-1.5B", SHA_A).hub_name == "Qwen/Qwen2.5-Math-1.5B"
    assert CardInput("/data/models/ft-7b", SHA_A).hub_name == "ft-7b"
    assert CardInput("ft-7b", SHA_A).hub_name == "ft-7b"
    assert CardInput("/data/org/ft", SHA_A, repo_id="org/ft").hub_name == "org/ft"


def test_card_without_license_omits_key() -> None:
    metadata = front_matter(ModelCard("m", "linear", [CardInput("a", SHA_A)]).render())
    assert "license" not in metadata
    assert metadata["base_model"] == ["a"]


def test_duplicate_inputs_listed_once() -> None:
    inputs = [CardInput("x", SHA_A, repo_id="org/m"), CardInput("y", SHA_B, repo_id="org/m")]
    assert front_matter(ModelCard("m", "linear", inputs).render())["base_model"] == ["org/m"]


def test_repo_id_form() -> None:
    assert is_repo_id("meta-llama/Llama-3.1-8B")
    assert is_repo_id("org/name_with.dots")
    for text in ("name-only", "/abs/path", "./rel/path", "a/b/c", "org/bad..name", "org/x--y", "org/-x"):
        assert not is_repo_id(text), text


def test_hub_id_from_cache_layout(tmp_path: Path) -> None:
    snapshot = tmp_path / "hub" / "models--Qwen--Qwen2.5-Math-1.5B" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    assert hub_id_of(snapshot) == "Qwen/Qwen2.5-Math-1.5B"


def test_hub_id_from_config(tmp_path: Path) -> None:
    cases = {
        "org/model-a": "org/model-a",
        "/data/models/model-a": None,
        "./model-a": None,
        "model-a": None,
    }
    for name_or_path, expected in cases.items():
        (tmp_path / "config.json").write_text(json.dumps({"_name_or_path": name_or_path}))
        assert hub_id_of(tmp_path) == expected, name_or_path


def test_card_input_for_local_folder(tmp_path: Path) -> None:
    folder = tmp_path / "my-finetune"
    folder.mkdir()
    entry = card_input_for(folder, SHA_A, role="base")
    assert entry == CardInput(name="my-finetune", sha256=SHA_A, role="base", repo_id=None)
    (folder / "config.json").write_text(json.dumps({"_name_or_path": "org/finetune"}))
    assert card_input_for(folder, SHA_A).hub_name == "org/finetune"


def test_engine_card_has_no_local_paths(merged_folder: Path, tiny_inputs: Path) -> None:
    markdown = (merged_folder / "README.md").read_text()
    metadata = front_matter(markdown)
    assert str(tiny_inputs) not in markdown
    assert str(Path.home()) not in markdown
    assert metadata["base_model"] == ["base", "a", "b"]
    # The base model's card sets license apache-2.0, and the merge carries it over.
    assert metadata["license"] == "apache-2.0"
    assert "ties" in metadata["tags"]


def test_read_front_matter_invalid(tmp_path: Path) -> None:
    readme = tmp_path / "README.md"
    readme.write_text("# no front matter\n")
    assert read_front_matter(readme) is None
    readme.write_text("---\n: [unclosed\n---\n")
    assert read_front_matter(readme) is None
    assert read_front_matter(tmp_path / "missing.md") is None


def test_markdown_table_cells() -> None:
    table = markdown_table([{"name": "a|b", "value": 0.123456}, {"name": "c", "tokens": 1655.4}])
    assert table.splitlines() == [
        "| name | value | tokens |",
        "|---|---|---|",
        "| a\\|b | 0.1235 |  |",
        "| c |  | 1655 |",
    ]


def example_front() -> EvoFront:
    members = [
        EvoMember(0, {"weight": 0.3}, {"accuracy": 0.62, "mean_tokens": 3100.0}),
        EvoMember(1, {"weight": 0.6}, {"accuracy": 0.58, "mean_tokens": 1900.0}),
        EvoMember(2, {"weight": 0.9}, {"accuracy": 0.41, "mean_tokens": 700.0}),
    ]
    return EvoFront(
        run_name="l2s-1.5b",
        members=members,
        objective_goals={"accuracy": "max", "mean_tokens": "min"},
        generations=10,
        population=20,
        evaluated=200,
        hypervolume=0.4321,
        settings={"seed": 42},
    )


def evo_inputs() -> list[CardInput]:
    return [
        CardInput("long", SHA_A, "base", repo_id="deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B"),
        CardInput("short", SHA_B, repo_id="Qwen/Qwen2.5-Math-1.5B"),
    ]


def test_evo_member_card() -> None:
    front = example_front()
    evaluation = [{"benchmark": "gsm8k", "accuracy": 0.71, "mean_tokens": 812.0, "items": 50}]
    card = evo_member_card(
        front.members[1],
        front,
        evo_inputs(),
        method="task_arithmetic",
        parameters={"models": [{"model": "short", "parameters": {"weight": 0.6}}]},
        seed=42,
        evaluation=evaluation,
    )
    markdown = card.render()
    metadata = front_matter(markdown)

    assert metadata["base_model"] == ["deepseek-ai/DeepSeek-R1-Distill-Qwen-1.5B", "Qwen/Qwen2.5-Math-1.5B"]
    assert metadata["tags"] == ["merge", "mergekit-ext", "task_arithmetic", "evo-l2s", "pareto-front"]
    assert "member 1 of the 3-member Pareto front of the Evo-L2S run `l2s-1.5b`" in markdown
    assert "| accuracy | 0.58 | max |" in markdown
    assert "| mean_tokens | 1900 | min |" in markdown
    assert {"weight": 0.6} in yaml_blocks(markdown)
    assert "| **1 (this model)** | 0.58 | 1900 | 0.6 |" in markdown
    assert "| 0 | 0.62 | 3100 | 0.3 |" in markdown
    assert "| gsm8k | 0.71 | 812 | 50 |" in markdown
    details = [block for block in yaml_blocks(markdown) if "algorithm" in block][0]
    assert details == {
        "algorithm": "NSGA-II",
        "generations": 10,
        "population": 20,
        "evaluated": 200,
        "hypervolume": 0.4321,
        "objectives": {"accuracy": "max", "mean_tokens": "min"},
        "seed": 42,
    }


def test_front_summary_links_members() -> None:
    front = example_front()
    linked = EvoFront(
        run_name=front.run_name,
        members=[
            EvoMember(m.index, m.genome, m.objectives, repo_id="org/l2s", revision=f"member-{m.index:02d}")
            for m in front.members
        ],
    )
    markdown = front_summary_card(linked, evo_inputs(), license="mit")
    metadata = front_matter(markdown)
    assert metadata["license"] == "mit"
    assert "evo-l2s" in metadata["tags"]
    assert "pareto-front" in metadata["tags"]
    for index in range(3):
        assert f"[{index}](https://huggingface.co/org/l2s/tree/member-{index:02d})" in markdown
    assert "(this model)" not in markdown


def mass_config(model_kind: str = "hf-encoder") -> MassConfig:
    return MassConfig(
        model_kind=model_kind,
        task_names=["sst2", "ag_news", "trec"],
        router=RouterConfig(
            layer=3,
            site="encoder.layer.3.intermediate.dense",
            weight="encoder.layer.3.intermediate.dense.weight",
            token_rule="mean",
        ),
        storage=StorageReport(shared_bytes=1000, factor_bytes=900, head_bytes=100, one_model_bytes=1000),
        seed=5,
    )


def test_mass_card() -> None:
    card = mass_artifact_card(mass_config(), [CardInput("base", SHA_A, "base", repo_id="org/bert-mini")], repo_id="org/mass-3")
    markdown = card.render()
    metadata = front_matter(markdown)

    assert metadata["tags"] == ["merge", "mergekit-ext", "mass", "tsv-m", "router"]
    assert metadata["library_name"] == "transformers"
    assert "| tasks | sst2, ag_news, trec |" in markdown
    assert "| rank per task | ⌊min(m, n) / 3⌋ per matrix" in markdown
    assert "| hooked module (input) | `encoder.layer.3.intermediate.dense` |" in markdown
    assert "| threshold | 0.2 |" in markdown
    assert "| top-k | 3 |" in markdown
    assert "| total | 2.00 kB | 2000 |" in markdown
    # (1000 + 900 + 100) / 1000
    assert "Storage factor: **2.00×** one model." in markdown
    assert 'MassModel.from_pretrained(snapshot_download("org/mass-3"))' in markdown
    assert "- **Seed:** `5`" in markdown
    parameters = yaml_blocks(markdown)[0]
    assert parameters["tasks"] == ["sst2", "ag_news", "trec"]
    assert parameters["router"]["token_rule"] == "mean"


def test_mass_card_from_dict_open_clip() -> None:
    data = mass_config("open-clip").model_dump()
    data["rank"] = 16
    markdown = mass_artifact_card(data, [CardInput("vit", SHA_A, "base")]).render()
    assert front_matter(markdown)["library_name"] == "open_clip"
    assert "| rank per task | 16 |" in markdown
    assert 'snapshot_download("ORG/NAME")' in markdown
    assert "Replace `ORG/NAME`" in markdown


def test_engine_card_for_single_file_base(
    tiny_inputs: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A base given as a lone .safetensors file, in a folder without config.json.
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "base-weights.safetensors").write_bytes((tiny_inputs / "base" / "model.safetensors").read_bytes())
    recipe = parse_recipe(
        {
            "merge_method": "task_arithmetic",
            "base_model": str(loose / "base-weights.safetensors"),
            "models": [
                {"model": str(tiny_inputs / "a" / "model.safetensors"), "parameters": {"weight": 0.5}},
                {"model": str(tiny_inputs / "b"), "parameters": {"weight": 0.5}},
            ],
            "dtype": "float32",
            "out_dtype": "bfloat16",
        },
        source="test",
    )
    output = tmp_path / "out"
    with caplog.at_level(logging.WARNING, logger="mergekit_ext"):
        run_recipe(recipe, MergeOptions(output=output))

    assert not (output / "config.json").exists()
    assert any("No config.json in" in record.message and str(loose) in record.message for record in caplog.records)
    markdown = (output / "README.md").read_text()
    assert "| base | base-weights.safetensors |" in markdown
    # A weight file with the standard name is named by its folder.
    assert "| model | a |" in markdown
    assert "| model | b |" in markdown
    parameters = yaml_blocks(markdown)[0]
    assert parameters["base_model"] == "base-weights.safetensors"
    assert [entry["model"] for entry in parameters["models"]] == ["a", "b"]
    assert parameters["dtype"] == "float32"
    assert parameters["out_dtype"] == "bfloat16"
    assert "read one after another" in markdown
