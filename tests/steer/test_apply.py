"""Run-time steering: hooks, protocols, padding, bad vectors."""

from __future__ import annotations

import pytest
import torch

from mergekit_ext.errors import InvalidTensorError, RecipeError
from mergekit_ext.steer.apply import generate, steering
from mergekit_ext.steer.template import PromptTemplate
from mergekit_ext.steer.vector import SteeringVector


def _vector(width: int, layer: int = 1, seed: int = 1) -> SteeringVector:
    generator = torch.Generator().manual_seed(seed)
    return SteeringVector(directions={layer: torch.randn(width, generator=generator)})


def _block_output(model, layer, **inputs):
    captured = {}
    handle = model.model.layers[layer].register_forward_hook(lambda module, args, output: captured.update(out=output))
    with torch.no_grad():
        result = model(**inputs)
    handle.remove()
    return captured["out"], result.logits


def test_adds_alpha_times_vector(model):
    vector = _vector(32)
    ids = torch.tensor([[5, 9, 44, 70, 12]])
    plain, plain_logits = _block_output(model, 1, input_ids=ids)
    with steering(model, vector, alpha=2.5):
        steered, steered_logits = _block_output(model, 1, input_ids=ids)
    assert torch.allclose(steered - plain, (2.5 * vector.directions[1]).expand_as(plain), atol=1e-5)
    assert not torch.allclose(steered_logits, plain_logits)
    after, after_logits = _block_output(model, 1, input_ids=ids)
    assert torch.equal(after_logits, plain_logits)


def test_hooks_removed_on_error(model):
    with pytest.raises(ValueError):
        with steering(model, _vector(32)):
            raise ValueError("body failed")
    assert all(not block._forward_hooks for block in model.model.layers)
    assert not model._forward_pre_hooks


def test_padding_positions_unchanged(model):
    vector = _vector(32)
    ids = torch.tensor([[0, 0, 5, 9, 44], [7, 8, 5, 9, 44]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    plain, _ = _block_output(model, 1, input_ids=ids, attention_mask=mask)
    with steering(model, vector, alpha=1.0):
        steered, _ = _block_output(model, 1, input_ids=ids, attention_mask=mask)
    delta = steered - plain
    assert torch.equal(delta[0, :2], torch.zeros_like(delta[0, :2]))
    assert torch.allclose(delta[0, 2:], vector.directions[1].expand(3, -1), atol=1e-5)
    assert torch.allclose(delta[1], vector.directions[1].expand(5, -1), atol=1e-5)


def _two_step_logits(model, vector, protocol):
    prompt = torch.tensor([[5, 9, 44, 70]])
    next_token = torch.tensor([[12]])
    with torch.no_grad(), steering(model, vector, alpha=3.0, protocol=protocol):
        first = model(input_ids=prompt, use_cache=True)
        second = model(input_ids=next_token, cache=first.cache, use_cache=True)
    return second.logits[0, -1]


def test_protocols_against_full_forward(model):
    vector = _vector(32)
    full = torch.tensor([[5, 9, 44, 70, 12]])
    with torch.no_grad(), steering(model, vector, alpha=3.0):
        all_steps_reference = model(input_ids=full).logits[0, -1]
    assert torch.allclose(_two_step_logits(model, vector, "all-steps"), all_steps_reference, atol=1e-4)

    # Prefill reference: add the vector only at the four prompt positions.
    def prompt_only(module, args, output):
        return output + torch.cat([3.0 * vector.directions[1].expand(4, -1), torch.zeros(1, 32)]).unsqueeze(0)

    handle = model.model.layers[1].register_forward_hook(prompt_only)
    with torch.no_grad():
        prefill_reference = model(input_ids=full).logits[0, -1]
    handle.remove()
    assert torch.allclose(_two_step_logits(model, vector, "prefill"), prefill_reference, atol=1e-4)
    assert not torch.allclose(prefill_reference, all_steps_reference, atol=1e-3)


def test_generate_batched_equals_single(model, tokenizer):
    template = PromptTemplate.from_chat_template(tokenizer)
    prompts = ["hi", "a longer prompt here"]
    vector = _vector(32)
    batched = generate(model, tokenizer, prompts, template, vector, alpha=2.0, max_new_tokens=6, batch_size=2)
    single = [generate(model, tokenizer, [prompt], template, vector, alpha=2.0, max_new_tokens=6)[0] for prompt in prompts]
    assert batched == single


def test_wrong_width_vector(model):
    with pytest.raises(InvalidTensorError, match="width 32"):
        with steering(model, _vector(16)):
            pass


def test_bad_protocol_and_layer(model):
    with pytest.raises(RecipeError, match="protocol"):
        with steering(model, _vector(32), protocol="decode"):
            pass
    with pytest.raises(RecipeError, match="out of range"):
        with steering(model, _vector(32, layer=9)):
            pass
