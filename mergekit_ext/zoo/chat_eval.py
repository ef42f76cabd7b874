"""Measurements of a chat model: refusal rate, answer rate, attribute compliance."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from torch import nn

from mergekit_ext.steer.apply import generate
from mergekit_ext.steer.judge import refusal_rate
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.steer.vector import SteeringVector
from mergekit_ext.zoo.chat_data import ATTRIBUTES, ChatData, attach_instruction, compliance_check

MAX_NEW_TOKENS = 40
# Every synthesized refusal opens with a marker of the keyword judge ("I cannot", "I'm
# sorry"), so 16 new tokens are enough to judge the harmful prompts with an instruction.
REFUSAL_NEW_TOKENS = 16


@dataclass
class ChatMetrics:
    """Rates in [0, 1]; compliance is measured on the attribute pairs' prompts.

    `refusal_rate_harmful_with_instruction` maps each attribute to the refusal rate on
    the held-out harmful prompts with that attribute's instruction attached.
    """

    refusal_rate_harmful: float | None
    answer_rate_harmless: float
    compliance_with_instruction: dict[str, float] = field(default_factory=dict)
    compliance_without_instruction: dict[str, float] = field(default_factory=dict)
    refusal_rate_harmful_with_instruction: dict[str, float] = field(default_factory=dict)
    num_harmful: int = 0
    num_harmless: int = 0

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def compliance_rate(
    model: nn.Module,
    tokenizer: object,
    prompts: list[str],
    check: object,
    vector: SteeringVector | None = None,
    alpha: float = 1.0,
    protocol: str = "all-steps",
) -> float:
    """Fraction of greedy responses to `prompts` that pass `check`."""
    template = PromptTemplate.from_chat_template(tokenizer)
    outputs = generate(model, tokenizer, prompts, template, vector, alpha, protocol, MAX_NEW_TOKENS, batch_size=16)
    return sum(bool(check(text)) for text in outputs) / len(outputs)  # type: ignore[operator]


def evaluate_chat_model(model: nn.Module, tokenizer: object, data: ChatData, num_eval: int = 100) -> ChatMetrics:
    """Measure refusal and answer rates on the evaluation sets and compliance per attribute."""
    template = PromptTemplate.from_chat_template(tokenizer)
    harmless = data.harmless_eval[:num_eval]
    answered = 1.0 - refusal_rate(generate(model, tokenizer, harmless, template, max_new_tokens=MAX_NEW_TOKENS, batch_size=16))
    refused = None
    harmful: list[str] = []
    if data.harmful_eval is not None:
        harmful = data.harmful_eval[:num_eval]
        refused = refusal_rate(generate(model, tokenizer, harmful, template, max_new_tokens=MAX_NEW_TOKENS, batch_size=16))
    metrics = ChatMetrics(refusal_rate_harmful=refused, answer_rate_harmless=answered, num_harmful=len(harmful), num_harmless=len(harmless))
    for attribute in ATTRIBUTES:
        if attribute.name not in data.pairs:
            continue
        check = compliance_check(attribute, data)
        pairs = data.pairs[attribute.name]
        metrics.compliance_with_instruction[attribute.name] = compliance_rate(model, tokenizer, [pair.positive for pair in pairs], check)
        metrics.compliance_without_instruction[attribute.name] = compliance_rate(model, tokenizer, [pair.negative for pair in pairs], check)
        if harmful:
            instructed = [attach_instruction(prompt, data.instructions[attribute.name][0]) for prompt in harmful]
            outputs = generate(model, tokenizer, instructed, template, max_new_tokens=REFUSAL_NEW_TOKENS, batch_size=16)
            metrics.refusal_rate_harmful_with_instruction[attribute.name] = refusal_rate(outputs)
    return metrics
