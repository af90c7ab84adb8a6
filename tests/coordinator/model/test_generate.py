"""Batched greedy decoding on the real (4-layer) SmolLM2: the same strings as one prompt at a time.

The reference is ``model.generate`` on a single unpadded row, written out here, so the batched
path is checked against decoding that involves no padding at all.
"""

from __future__ import annotations

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model

from coordinator.model.generate import greedy_generate
from shared.errors import ConfigError, DataError

PROMPTS = [
    "The capital of France is",
    "Question: what is 2 + 3?\nAnswer:",
    "Once upon a time, in a land far away, there lived a king who had three daughters. The youngest",
    "Hi",
    "List three colors:",
    "The quick brown fox jumps over the lazy dog. It did so again and again, until the dog woke up and",
]


def _reference_ids(model, tokenizer, ids: list[int], max_new_tokens: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            do_sample=False,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.eos_token_id,
        )
    new = out[0, len(ids) :].tolist()
    return new[: new.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in new else new


def _reference(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    return tokenizer.decode(_reference_ids(model, tokenizer, ids, max_new_tokens), skip_special_tokens=True)


def test_batched_equals_unbatched_and_the_reference(smol):
    model, tokenizer = smol
    one_by_one = greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=1)
    # Prompts are batched by length: the 4 shortest (1, 4, 5 and 13 tokens) share a padded batch,
    # then the 2 longest (22 and 23).
    assert greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=12, batch_size=4) == one_by_one
    assert all(one_by_one)
    for prompt, text in zip(PROMPTS[:2], one_by_one[:2]):
        assert text == _reference(model, tokenizer, tokenizer(prompt)["input_ids"], 12)
    # Left as found: eval mode, right padding side, the pad token.
    assert not model.training
    assert tokenizer.padding_side == "right" and tokenizer.pad_token_id == tokenizer.eos_token_id


def test_max_new_tokens_is_respected(smol):
    model, tokenizer = smol
    ids = tokenizer(PROMPTS[0])["input_ids"]
    full = _reference_ids(model, tokenizer, ids, 10)
    assert len(full) == 10  # the cut model does not stop early on this prompt
    texts = {k: greedy_generate(model, tokenizer, [PROMPTS[0]], max_new_tokens=k)[0] for k in (1, 4, 10)}
    assert texts == {k: tokenizer.decode(full[:k], skip_special_tokens=True) for k in (1, 4, 10)}
    assert len(texts[1]) < len(texts[4]) < len(texts[10])


def test_long_prompts_lose_their_left_end(smol):
    model, tokenizer = smol
    long_prompt = "Apples grow on trees in orchards. " * 12 + "Question: what colour is the sky?\nAnswer:"
    ids = tokenizer(long_prompt)["input_ids"]
    assert len(ids) > 60
    kept = 24
    left_cut = _reference(model, tokenizer, ids[-kept:], 8)
    # The test can tell the two ends apart: cutting on the right continues something else.
    assert left_cut != _reference(model, tokenizer, ids[:kept], 8)
    # Batched with a short prompt, so the cut row is also the longest one in a padded batch.
    out = greedy_generate(
        model, tokenizer, [PROMPTS[3], long_prompt], max_new_tokens=8, batch_size=2, max_prompt_tokens=kept
    )
    assert out == [_reference(model, tokenizer, tokenizer(PROMPTS[3])["input_ids"], 8), left_cut]


def test_chat_template_wraps_each_prompt_as_a_user_turn(smol):
    model, tokenizer = smol
    chat = greedy_generate(model, tokenizer, PROMPTS[:3], max_new_tokens=10, batch_size=3, chat_template=True)
    for prompt, text in zip(PROMPTS[:3], chat):
        messages = [{"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
        assert text == _reference(model, tokenizer, list(ids["input_ids"]), 10)
    assert chat != greedy_generate(model, tokenizer, PROMPTS[:3], max_new_tokens=10)

    # Cut to 12 tokens, the template's leading <|im_start|> (SmolLM2's BOS) stays in front.
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": PROMPTS[2]}], add_generation_prompt=True, tokenize=True, return_dict=True
    )["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    [cut] = greedy_generate(model, tokenizer, [PROMPTS[2]], max_new_tokens=10, max_prompt_tokens=12, chat_template=True)
    assert cut == _reference(model, tokenizer, [ids[0]] + list(ids[-11:]), 10)

    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ConfigError, match="no chat template"):
        greedy_generate(model, plain, PROMPTS[:1], max_new_tokens=2, chat_template=True)


def test_peft_model_in_train_mode_decodes_deterministically_and_stays_in_train_mode(smol):
    model, tokenizer = smol
    base = greedy_generate(model, tokenizer, PROMPTS[:4], max_new_tokens=8)
    # Random LoRA weights (not the zero-B start) so the adapter shows, and heavy dropout that
    # would scramble the output if generation ran in train mode.
    config = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.5, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    peft_model = get_peft_model(copy.deepcopy(model), config)
    peft_model.train()
    batched = greedy_generate(peft_model, tokenizer, PROMPTS[:4], max_new_tokens=8, batch_size=4)
    assert peft_model.training
    assert greedy_generate(peft_model, tokenizer, PROMPTS[:4], max_new_tokens=8, batch_size=1) == batched
    assert batched != base

    # A stop token from the model's generation config ends a row as EOS does.
    ids = tokenizer(PROMPTS[0])["input_ids"]
    peft_model.eval()
    full = _reference_ids(peft_model, tokenizer, ids, 8)
    stop = full[3]
    peft_model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    [text] = greedy_generate(peft_model, tokenizer, [PROMPTS[0]], max_new_tokens=8)
    assert text == tokenizer.decode(full[: full.index(stop)], skip_special_tokens=True)


def test_a_tokenizer_without_pad_token_is_padded_with_eos_and_left_alone(smol):
    model, tokenizer = smol
    no_pad = copy.deepcopy(tokenizer)
    no_pad.pad_token = None
    assert no_pad.pad_token_id is None
    with_pad = greedy_generate(model, tokenizer, PROMPTS[:3], max_new_tokens=6, batch_size=3)
    assert greedy_generate(model, no_pad, PROMPTS[:3], max_new_tokens=6, batch_size=3) == with_pad
    assert no_pad.pad_token_id is None


def test_bad_arguments(smol):
    model, tokenizer = smol
    with pytest.raises(ConfigError, match="max_new_tokens must be at least 1"):
        greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=0)
    with pytest.raises(ConfigError, match="batch_size"):
        greedy_generate(model, tokenizer, PROMPTS, max_new_tokens=2, batch_size=0)
    with pytest.raises(DataError, match=r"prompts \[1\]"):
        greedy_generate(model, tokenizer, ["fine", ""], max_new_tokens=2)
    assert greedy_generate(model, tokenizer, [], max_new_tokens=2) == []
