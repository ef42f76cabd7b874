"""The population backend decodes like separately merged models (float32)."""

from __future__ import annotations

import pytest
import torch

from mergekit_ext.evo.backends import PopulationBackend, SequentialBackend, load_model
from mergekit_ext.evo.data import load_benchmark
from mergekit_ext.evo.generation import GenerationSettings, encode_prompts, format_prompt
from mergekit_ext.evo.genome import SearchSpace
from mergekit_ext.evo.merge_memory import ResidentSources, write_genome_into
from mergekit_ext.evo.mixing import MixingModel


# The CUDA cases run where a GPU is present (scripts/gpu_check.sh) and skip elsewhere.
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")),
]


def _space(tiny_models, weights="global"):
    return SearchSpace(base_model=str(tiny_models["long"]), models=[str(tiny_models["short"])], weights=weights,
                       layer_groups=2)


@pytest.mark.parametrize("device_name", DEVICES)
def test_population_logits_match_merged_models(tiny_models, device_name):
    space = _space(tiny_models, "layer_groups")
    device = torch.device(device_name)
    genomes = [space.decode(genes) for genes in ([0.0, 0.0, 0.0], [0.3, 0.8, 0.5], [1.0, 0.2, 0.9])]
    mixing = MixingModel(space, device, torch.float32)
    tokenizer = __import__("transformers").AutoTokenizer.from_pretrained(space.base_model)
    settings = GenerationSettings()
    prompts = [format_prompt(tokenizer, q, settings) for q in ("1+2+3", "45+6")]
    inputs = encode_prompts(tokenizer, prompts, device)

    rows = torch.stack([mixing.coefficients(genome) for genome in genomes for _ in prompts])
    mixing.set_rows(rows)
    batch = {name: tensor.repeat(len(genomes), 1) for name, tensor in inputs.items()}
    with torch.inference_mode():
        mixed = mixing.model(**batch).logits

    resident = ResidentSources(space, device)
    merged_model = load_model(space.base_model, device, torch.float32)
    for index, genome in enumerate(genomes):
        write_genome_into(merged_model, genome, resident)
        with torch.inference_mode():
            expected = merged_model(**inputs).logits
        rows_of_genome = mixed[index * len(prompts) : (index + 1) * len(prompts)]
        mask = inputs["attention_mask"].bool()
        torch.testing.assert_close(rows_of_genome[mask], expected[mask], rtol=0, atol=1e-4)


@pytest.mark.parametrize("device_name", DEVICES)
def test_population_tokens_equal_sequential(tiny_models, problem_file, device_name):
    space = _space(tiny_models)
    settings = GenerationSettings(max_new_tokens=8, batch_size=8)
    problems = load_benchmark(str(problem_file))[:4]
    genomes = [space.decode([w]) for w in (0.0, 0.25, 0.5, 0.75, 1.0)]
    device = torch.device(device_name)
    sequential = SequentialBackend(space, settings, device, torch.float32).generate(genomes, problems)
    population = PopulationBackend(space, settings, device, torch.float32, candidates_per_batch=5).generate(
        genomes, problems
    )
    for left, right in zip(sequential, population):
        assert [g.token_ids for g in left] == [g.token_ids for g in right]
    # The candidates differ, so equality above is not trivially true.
    assert len({tuple(g.token_ids for g in outputs) for outputs in sequential}) > 1
