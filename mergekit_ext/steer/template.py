"""Prompt templates built as prefix + text tokens + suffix.

Tokenizing the three parts separately, instead of the rendered string, makes the
token sequence of every prompt a pure function of (prefix ids, text, suffix ids), so
a vector extracted from it can be re-derived exactly from the shipped texts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from mergekit_ext.errors import RecipeError

_PLACEHOLDER = "\u2063STEERING_TEXT\u2063"


@dataclass(frozen=True)
class PromptTemplate:
    """The text before and after a user message in the model's prompt format."""

    prefix: str = ""
    suffix: str = ""

    @classmethod
    def from_chat_template(cls, tokenizer: object, system_prompt: str | None = None) -> PromptTemplate:
        """Split the tokenizer's chat template around a one-turn user message with a generation prompt."""
        if not getattr(tokenizer, "chat_template", None):
            raise RecipeError(
                "the tokenizer has no chat template; use --template plain or set chat_template in tokenizer_config.json"
            )
        messages = [{"role": "user", "content": _PLACEHOLDER}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)  # type: ignore[attr-defined]
        if rendered.count(_PLACEHOLDER) != 1:
            raise RecipeError("the chat template does not place the user message exactly once")
        prefix, suffix = rendered.split(_PLACEHOLDER)
        return cls(prefix=prefix, suffix=suffix)

    @classmethod
    def for_tokenizer(cls, tokenizer: object, kind: str = "chat") -> PromptTemplate:
        """Return the chat template (`chat`), or no wrapping at all (`plain`)."""
        if kind == "chat":
            return cls.from_chat_template(tokenizer)
        if kind == "plain":
            return cls()
        raise RecipeError(f"unknown template kind {kind!r}; use 'chat' or 'plain'")

    def prefix_ids(self, tokenizer: object) -> list[int]:
        return _encode(tokenizer, self.prefix)

    def suffix_ids(self, tokenizer: object) -> list[int]:
        return _encode(tokenizer, self.suffix)

    def token_ids(self, tokenizer: object, text: str) -> list[int]:
        """Return prefix ids + ids of `text` + suffix ids."""
        ids = self.prefix_ids(tokenizer) + _encode(tokenizer, text) + self.suffix_ids(tokenizer)
        if not ids:
            raise RecipeError("a prompt tokenizes to zero tokens; check the texts and the template")
        return ids

    def digest(self, tokenizer: object) -> str:
        """Return the SHA-256 of the prefix and suffix strings and their token ids."""
        content = {
            "prefix": self.prefix,
            "suffix": self.suffix,
            "prefix_ids": self.prefix_ids(tokenizer),
            "suffix_ids": self.suffix_ids(tokenizer),
        }
        return hashlib.sha256(json.dumps(content, ensure_ascii=False, sort_keys=True).encode("utf-8")).hexdigest()


def _encode(tokenizer: object, text: str) -> list[int]:
    if not text:
        return []
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])  # type: ignore[operator]
