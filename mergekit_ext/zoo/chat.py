"""Build the `chat` zoo: a tiny Llama chat model that refuses and follows style instructions.

The model is trained from scratch on real prompts with synthesized responses (see
`chat_data`): harmful instructions answered with a refusal (also when they carry an
attribute instruction or follow a harmless request), harmless ones answered plainly,
and harmless ones with an attribute instruction answered in that style. The refusal
part is trained only when the harmful instruction files exist.

Folder layout:

    zoo.json   settings, seed, build time, data hashes and the measured metrics
    model/     LlamaForCausalLM (safetensors, config) with a tokenizer whose
               tokenizer_config.json carries the chat template
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
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.zoo.causal_training import train_completions
from mergekit_ext.zoo.cache import zoo_folder
from mergekit_ext.zoo.chat_data import ATTRIBUTES, DEFAULT_DATA_DIR, ChatData, attach_instruction, load_chat_data, make_response
from mergekit_ext.zoo.chat_eval import evaluate_chat_model
from mergekit_ext.zoo.chat_tokenizer import build_chat_tokenizer

logger = logging.getLogger(__name__)

ZOO_NAME = "chat"
ZOO_VERSION = "1"
MANIFEST_NAME = "zoo.json"
ProgressCallback = Callable[[str, int, int], None]


@dataclass(frozen=True)
class ChatZooSettings:
    """Sizes of the model, data and training of one zoo variant."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    vocab_size: int
    steps: int
    batch_size: int
    learning_rate: float
    word_count: int
    max_length: int
    attributes: tuple[str, ...]
    num_eval: int
    harmful_fraction: float = 0.25
    attribute_fraction: float = 0.45
    # Share of harmful prompts that carry a style instruction (still answered with a refusal).
    harmful_with_instruction: float = 0.1
    # Share of harmful prompts placed after a harmless one ("<harmless> <harmful>"), so that
    # harmless words around a harmful request do not lift the refusal.
    harmful_with_context: float = 0.0
    # The same for harmless prompts (answered as usual), so that a two-request prompt is no
    # cue for a refusal by itself.
    harmless_with_context: float = 0.0
    # Per-word drop probability applied to the instruction body of half of the training
    # prompts, so that the refusal rests on many words of a prompt, not on whole prompts.
    word_dropout: float = 0.0


FULL_SETTINGS = ChatZooSettings(
    hidden_size=128,
    intermediate_size=384,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=1024,
    steps=1500,
    batch_size=32,
    learning_rate=2e-3,
    word_count=300,
    max_length=112,
    attributes=tuple(attribute.name for attribute in ATTRIBUTES),
    num_eval=100,
    harmful_fraction=0.4,
    harmful_with_instruction=0.4,
    harmful_with_context=0.3,
    word_dropout=0.5,
)
# Word dropout is left out of the small variant: in 300 steps it cost most of the
# style compliance (one build: 2 of 4 attributes followed with it, 3 without).
SMALL_SETTINGS = ChatZooSettings(
    hidden_size=64,
    intermediate_size=192,
    num_layers=4,
    num_heads=4,
    num_kv_heads=2,
    vocab_size=768,
    steps=300,
    batch_size=32,
    learning_rate=3e-3,
    word_count=100,
    max_length=96,
    attributes=("spanish", "has_bold_only", "has_caps_word", "starts_with_thank"),
    num_eval=40,
    harmful_fraction=0.4,
    harmful_with_instruction=0.4,
    harmful_with_context=0.3,
)


def default_zoo_dir(small: bool = False, seed: int = 0) -> Path:
    return zoo_folder(f"{ZOO_NAME}{'-small' if small else ''}-seed{seed}", ZOO_VERSION)


def build_chat_zoo(
    output_dir: str | Path | None = None,
    small: bool = False,
    seed: int = 0,
    data_dir: str | Path = DEFAULT_DATA_DIR,
    harmful_train: str | Path | None = None,
    harmful_eval: str | Path | None = None,
    force: bool = False,
    progress: ProgressCallback | None = None,
) -> Path:
    """Build (or reuse from the cache) the chat zoo and return its folder.

    `harmful_train` and `harmful_eval` default to `refusal/harmful_train.json` and
    `refusal/eval_harmful.json` under `data_dir`. Without them the model is trained
    without refusals, and zoo.json records the refusal metrics as null.
    """
    target = Path(output_dir) if output_dir is not None else default_zoo_dir(small, seed)
    if (target / MANIFEST_NAME).is_file() and not force:
        logger.info("chat zoo found at %s", target)
        return target
    if target.exists() and any(target.iterdir()) and not (target / MANIFEST_NAME).is_file():
        raise OutputError(f"output folder {target} exists and is not a chat zoo; choose an empty folder")
    settings = SMALL_SETTINGS if small else FULL_SETTINGS
    attributes = tuple(attribute for attribute in ATTRIBUTES if attribute.name in settings.attributes)
    data = load_chat_data(
        Path(data_dir), attributes, settings.word_count, seed,
        Path(harmful_train) if harmful_train else None, Path(harmful_eval) if harmful_eval else None,
    )

    started = time.perf_counter()
    cpu_started = time.process_time()
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir()
    try:
        manifest = _build_into(temporary, settings, data, seed, progress)
        manifest["build_seconds"] = round(time.perf_counter() - started, 1)
        manifest["build_cpu_seconds"] = round(time.process_time() - cpu_started, 1)
        manifest["small"] = small
        (temporary / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        if target.exists():
            shutil.rmtree(target)
        temporary.rename(target)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    logger.info("built the chat zoo in %.1f s at %s", time.perf_counter() - started, target)
    return target


def _examples(data: ChatData, settings: ChatZooSettings, rng: random.Random, count: int) -> list[tuple[str, str]]:
    """Draw (prompt, response) examples in the configured mixture."""
    attributes = [attribute for attribute in ATTRIBUTES if attribute.name in data.pairs]
    examples = []
    for _ in range(count):
        draw = rng.random()
        if data.harmful_train is not None and draw < settings.harmful_fraction:
            prompt = _drop_words(rng.choice(data.harmful_train), settings.word_dropout, rng)
            if settings.harmful_with_context > 0 and rng.random() < settings.harmful_with_context:
                prompt = _end_sentence(rng.choice(data.harmless_train)) + " " + prompt
            if rng.random() < settings.harmful_with_instruction:
                # A style instruction does not lift a refusal.
                prompt = attach_instruction(prompt, data.instructions[rng.choice(attributes).name][0])
            examples.append((prompt, make_response("refusal", rng, data)))
        elif draw < settings.harmful_fraction + settings.attribute_fraction:
            attribute = rng.choice(attributes)
            body = _harmless_body(data, settings, rng)
            examples.append((attach_instruction(body, data.instructions[attribute.name][0]), make_response(attribute.kind, rng, data, attribute.name)))
        else:
            examples.append((_harmless_body(data, settings, rng), make_response("plain", rng, data)))
    return examples


def _harmless_body(data: ChatData, settings: ChatZooSettings, rng: random.Random) -> str:
    body = _drop_words(rng.choice(data.harmless_train), settings.word_dropout, rng)
    if settings.harmless_with_context > 0 and rng.random() < settings.harmless_with_context:
        body = _end_sentence(rng.choice(data.harmless_train)) + " " + body
    return body


def _end_sentence(text: str) -> str:
    text = text.rstrip()
    return text if text.endswith((".", "?", "!")) else text + "."


def _drop_words(body: str, rate: float, rng: random.Random) -> str:
    """Return `body` unchanged half of the time, else with each word dropped at `rate` (at least one word stays)."""
    if rate <= 0 or rng.random() < 0.5:
        return body
    words = body.split()
    kept = [word for word in words if rng.random() >= rate]
    return " ".join(kept or [rng.choice(words)])


def _build_into(folder: Path, settings: ChatZooSettings, data: ChatData, seed: int, progress: ProgressCallback | None) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    rng = random.Random(seed)
    torch.manual_seed(seed)
    examples = _examples(data, settings, rng, settings.steps * settings.batch_size)
    tokenizer = build_chat_tokenizer((text for pair in examples[:20000] for text in pair), settings.vocab_size)
    template = PromptTemplate.from_chat_template(tokenizer)
    encoded = []
    for prompt, response in examples:
        prompt_ids = template.token_ids(tokenizer, prompt)
        response_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        if len(prompt_ids) + len(response_ids) <= settings.max_length:
            encoded.append((prompt_ids + response_ids, len(prompt_ids)))
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=settings.hidden_size,
        intermediate_size=settings.intermediate_size,
        num_hidden_layers=settings.num_layers,
        num_attention_heads=settings.num_heads,
        num_key_value_heads=settings.num_kv_heads,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    loss = _train(model, tokenizer.pad_token_id, encoded, settings, rng, progress)

    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "model")
    metrics = evaluate_chat_model(model, tokenizer, data, settings.num_eval)
    return {
        "name": ZOO_NAME,
        "version": ZOO_VERSION,
        "seed": seed,
        "settings": asdict(settings),
        "model": "model",
        "trained_examples": len(encoded),
        "final_loss": loss,
        "refusal_trained": data.harmful_train is not None,
        "metrics": metrics.to_dict(),
    }


def _train(
    model: torch.nn.Module,
    pad_id: int,
    encoded: list[tuple[list[int], int]],
    settings: ChatZooSettings,
    rng: random.Random,
    progress: ProgressCallback | None,
) -> float:
    """Train on the response tokens (and the closing end token) with AdamW and a cosine schedule."""

    def next_batch(step: int) -> list[tuple[list[int], int]]:
        batch = encoded[step * settings.batch_size : (step + 1) * settings.batch_size]
        return batch or [rng.choice(encoded) for _ in range(settings.batch_size)]

    return train_completions(
        model,
        next_batch,
        steps=settings.steps,
        learning_rate=settings.learning_rate,
        weight_decay=0.01,
        pad_id=pad_id,
        stage="train",
        progress=progress,
    )