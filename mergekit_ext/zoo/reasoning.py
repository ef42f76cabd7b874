"""Build the reasoning zoo: a long-CoT and a short-answer Qwen2 model from one base.

The zoo mirrors the Evo-L2S setting (DeepSeek-R1-Distill-Qwen against
Qwen2.5-Math, which share a pretrained ancestor) at a size that trains on a CPU:

1. a base `Qwen2ForCausalLM` is pretrained on arithmetic text (step-by-step
   chain rewrites without a prompt, and bare prompts);
2. a *long* child is fine-tuned from it on step-by-step solutions and a *short*
   child on direct answers, both ending with `\\boxed{N}`.

Output layout (each model an ordinary Hugging Face folder with tokenizer files):
`base/`, `long/`, `short/`, `data/{train,pool,test}.jsonl`, `zoo.json`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from mergekit_ext.errors import OutputError
from mergekit_ext.zoo.causal_training import train_completions
from mergekit_ext.zoo.cache import zoo_folder
from mergekit_ext.zoo.reasoning_data import (
    EOS_TOKEN,
    MAX_OPERANDS,
    MIN_OPERANDS,
    PAD_TOKEN,
    PROMPT_TEMPLATE,
    ReasoningProblem,
    build_tokenizer,
    long_solution,
    sample_question,
    short_solution,
    split_problems,
    tokenizer_corpus,
    write_problems,
)

logger = logging.getLogger(__name__)

ZOO_NAME = "reasoning"
ZOO_VERSION = "3"
# Maximum new tokens of the build-time measurement. The longest step-by-step solution (8 operands)
# has 118 tokens with eos, and configs/evo_reasoning*.yaml use the same maximum.
MEASURE_MAX_NEW_TOKENS = 128

# progress(stage, done, total)
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ReasoningZooSettings:
    """Sizes of the models, data and training of one zoo variant."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    base_steps: int
    child_steps: int
    batch_size: int
    base_learning_rate: float
    child_learning_rate: float
    train_size: int
    pool_size: int
    test_size: int


# Measured with seed 0 (docs/zoo-reasoning.md): the long child solves all 300 test problems and the
# short one 24.7 %. The build takes about 430 s of CPU time on one thread. With 400 child steps
# the long child of seed 1 made arithmetic errors on the first line (84.7 %).
FULL_SETTINGS = ReasoningZooSettings(
    hidden_size=64,
    intermediate_size=256,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    base_steps=600,
    child_steps=600,
    batch_size=48,
    base_learning_rate=3e-3,
    child_learning_rate=2e-3,
    train_size=20000,
    pool_size=600,
    test_size=300,
)
SMALL_SETTINGS = ReasoningZooSettings(
    hidden_size=64,
    intermediate_size=128,
    num_layers=2,
    num_heads=2,
    num_kv_heads=1,
    base_steps=150,
    child_steps=80,
    batch_size=32,
    base_learning_rate=3e-3,
    child_learning_rate=1e-3,
    train_size=4000,
    pool_size=120,
    test_size=60,
)


def reasoning_zoo_folder(small: bool = False, seed: int = 0) -> Path:
    """Return the cache folder of a zoo variant: `<cache>/zoo/reasoning[-small]-<version>[-seed<N>]`."""
    name = ZOO_NAME + ("-small" if small else "")
    folder = zoo_folder(name, ZOO_VERSION)
    return folder if seed == 0 else folder.with_name(f"{folder.name}-seed{seed}")


def build_reasoning_zoo(
    output_dir: Path | None = None,
    small: bool = False,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    force: bool = False,
    num_threads: int | None = None,
) -> Path:
    """Build (or reuse from the cache) the reasoning zoo and return its folder.

    With `output_dir` None the zoo goes to the cache folder; a finished zoo there
    (its `zoo.json` present) is returned without rebuilding unless `force`.
    `num_threads` sets torch's intra-op threads during the build (restored after);
    on a CPU shared with other jobs one thread is often several times faster.
    """
    target = Path(output_dir) if output_dir is not None else reasoning_zoo_folder(small, seed)
    if (target / "zoo.json").is_file() and not force:
        logger.info("Reasoning zoo found at %s", target)
        return target
    if target.exists() and any(target.iterdir()) and not (target / "zoo.json").is_file() and output_dir is not None:
        raise OutputError(f"Output folder {target} exists and is not a reasoning zoo; choose an empty folder.")

    settings = SMALL_SETTINGS if small else FULL_SETTINGS
    started = time.perf_counter()
    cpu_started = time.process_time()
    temporary = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        summary = _build_into(temporary, settings, seed, progress)
        summary["build_seconds"] = round(time.perf_counter() - started, 1)
        summary["build_cpu_seconds"] = round(time.process_time() - cpu_started, 1)
        summary["small"] = small
        (temporary / "zoo.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        temporary.rename(target)
    finally:
        torch.set_num_threads(previous_threads)
        shutil.rmtree(temporary, ignore_errors=True)
    logger.info("Built the reasoning zoo in %.1f s at %s", time.perf_counter() - started, target)
    return target


def _build_into(folder: Path, settings: ReasoningZooSettings, seed: int, progress: ProgressCallback | None) -> dict:
    from transformers import PreTrainedTokenizerFast

    torch.manual_seed(seed)
    splits = split_problems(seed, settings.train_size, settings.pool_size, settings.test_size)
    (folder / "data").mkdir()
    for name, problems in splits.items():
        write_problems(folder / "data" / f"{name}.jsonl", problems)

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(tokenizer_corpus(splits["train"])),
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        clean_up_tokenization_spaces=False,
        padding_side="left",
    )
    model = _new_model(settings, tokenizer)

    rng = random.Random(seed + 1)
    base_documents = _base_documents(rng, splits["train"])
    _train(model, tokenizer, base_documents, settings.base_steps, settings, settings.base_learning_rate,
           rng, "base", progress)
    _save(model, tokenizer, folder / "base")

    children = {"long": long_solution, "short": short_solution}
    for name, solve in children.items():
        child = _new_model(settings, tokenizer)
        child.load_state_dict(model.state_dict())
        documents = [(PROMPT_TEMPLATE.format(question=p.question), solve(p.question)) for p in splits["train"]]
        _train(child, tokenizer, documents, settings.child_steps, settings, settings.child_learning_rate,
               rng, name, progress)
        _save(child, tokenizer, folder / name)

    measured = {
        name: measure_model(folder / name, splits["test"], max_new_tokens=MEASURE_MAX_NEW_TOKENS)
        for name in ("base", "long", "short")
    }
    if progress is not None:
        progress("measure", 1, 1)
    return {
        "measured_on_test": measured,
        "measure_max_new_tokens": MEASURE_MAX_NEW_TOKENS,
        "name": ZOO_NAME,
        "version": ZOO_VERSION,
        "seed": seed,
        "settings": asdict(settings),
        "prompt_template": PROMPT_TEMPLATE,
        "models": {"base": "base", "long": "long", "short": "short"},
        "splits": {name: len(problems) for name, problems in splits.items()},
    }


def measure_model(folder: Path, problems: list[ReasoningProblem], max_new_tokens: int) -> dict:
    """Return accuracy and mean generated tokens overall and per level (greedy, evaluation prompt)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mergekit_ext.evo.generation import GenerationSettings, format_prompt, generate_greedy
    from mergekit_ext.evo.grader import grade

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    settings = GenerationSettings(max_new_tokens=max_new_tokens, batch_size=100)
    generations = generate_greedy(
        model, tokenizer, [format_prompt(tokenizer, p.question, settings) for p in problems], settings
    )
    by_level: dict[int, list[tuple[bool, int]]] = {}
    for problem, generation in zip(problems, generations):
        correct = grade(generation.text, problem.answer).correct
        by_level.setdefault(problem.level, []).append((correct, generation.num_tokens))

    def summary(rows: list[tuple[bool, int]]) -> dict:
        return {
            "accuracy": round(sum(c for c, _ in rows) / len(rows), 4),
            "mean_tokens": round(sum(n for _, n in rows) / len(rows), 2),
            "count": len(rows),
        }

    every = [row for rows in by_level.values() for row in rows]
    return {
        **summary(every),
        "truncated": sum(g.truncated for g in generations),
        "by_level": {str(level): summary(rows) for level, rows in sorted(by_level.items())},
    }


def _new_model(settings: ReasoningZooSettings, tokenizer) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        rope_theta=10000.0,
    )
    return Qwen2ForCausalLM(config)


def _base_documents(rng: random.Random, train: list[ReasoningProblem]) -> list[tuple[str, str]]:
    """Arithmetic text: step-by-step chain rewrites without a prompt, and bare prompts (loss on all tokens)."""
    documents: list[tuple[str, str]] = []
    for problem in train:
        question = sample_question(rng, rng.randint(MIN_OPERANDS, MAX_OPERANDS))
        documents.append(("", long_solution(question).lstrip()))
        documents.append(("", PROMPT_TEMPLATE.format(question=problem.question)))
    return documents


def _train(
    model: torch.nn.Module,
    tokenizer,
    documents: list[tuple[str, str]],
    steps: int,
    settings: ReasoningZooSettings,
    learning_rate: float,
    rng: random.Random,
    stage: str,
    progress: ProgressCallback | None,
) -> None:
    """Train on (prompt, completion) pairs; the loss covers the completion and the eos token."""
    encoded = [_encode(tokenizer, prompt, completion) for prompt, completion in documents]

    def next_batch(step: int) -> list[tuple[list[int], int]]:
        return [encoded[rng.randrange(len(encoded))] for _ in range(settings.batch_size)]

    train_completions(
        model,
        next_batch,
        steps=steps,
        learning_rate=learning_rate,
        weight_decay=0.0,
        pad_id=tokenizer.pad_token_id,
        stage=stage,
        progress=progress,
    )


def _encode(tokenizer, prompt: str, completion: str) -> tuple[list[int], int]:
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt_ids + completion_ids, len(prompt_ids)


def _save(model: torch.nn.Module, tokenizer, folder: Path) -> None:
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def reasoning_manifest(folder: Path) -> dict:
    """Return the parsed `zoo.json` of a built reasoning zoo."""
    return json.loads((Path(folder) / "zoo.json").read_text(encoding="utf-8"))
