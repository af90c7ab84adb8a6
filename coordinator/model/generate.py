"""Batched greedy decoding for generation tasks, identical to decoding one prompt at a time.

Prompts are left-padded: every row's last prompt token then sits in the last column, so the
first generated token of every row is predicted from the same position and new tokens are
appended to all rows alike. The attention mask keeps padding out of attention, and
``generate`` derives each row's position ids from it (the first real token is position 0
whatever the padding), so a padded row computes what it would alone, up to float rounding. The
tests hold this to equal decoded strings against ``batch_size=1`` on the real model; without
the mask they differ.

The tokenizer is left as it was: padding is done here on token ids, so neither its padding
side nor its pad token changes. transformers is not imported: ``generate`` is the model's.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from coordinator.model.evaluation import model_device
from shared.errors import ConfigError, DataError, ModelError


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")


def _eos_ids(model: nn.Module, tokenizer) -> list[int]:
    # Chat models often stop on a token of their own (an end-of-turn) besides the tokenizer's
    # EOS; the generation config lists it. A PEFT wrapper forwards generation_config.
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = []
    for source in (getattr(tokenizer, "eos_token_id", None), config_eos):
        for token in source if isinstance(source, (list, tuple)) else [source]:
            if token is not None and int(token) not in ids:
                ids.append(int(token))
    return ids


def _encode(tokenizer, prompt: str, max_prompt_tokens: int, chat_template: bool) -> list[int]:
    if chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
        )
        # The template writes its special tokens into the text; adding them again would double a BOS.
        ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    else:
        ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    if len(ids) <= max_prompt_tokens:
        return ids
    # Cut on the left: the end of a prompt carries the question and where the answer goes. A
    # leading BOS stays, as in shared.tasks.encode_pair, so the model sees a sequence start.
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and ids[0] == bos and max_prompt_tokens >= 2:
        return [bos] + ids[len(ids) - (max_prompt_tokens - 1) :]
    return ids[len(ids) - max_prompt_tokens :]


def _left_padded(rows: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(ids) for ids in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for row, ids in enumerate(rows):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        mask[row, width - len(ids) :] = 1
    return input_ids, mask


def _until_eos(ids: list[int], eos_ids: Sequence[int]) -> list[int]:
    # Rows that finished early are filled with padding after their EOS; a pad token that is not
    # a special token would survive skip_special_tokens, so cut at the first EOS explicitly.
    for position, token in enumerate(ids):
        if token in eos_ids:
            return ids[:position]
    return ids


def greedy_generate(
    model: nn.Module,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 8,
    max_prompt_tokens: int = 512,
    chat_template: bool = False,
) -> list[str]:
    """Greedy continuations of prompts, decoded in batches on the model's device.

    The same strings come out whatever ``batch_size``: rows are left-padded with an attention
    mask. Prompts are batched in order of length (less padding) and returned in input order.

    Args:
        model: A causal LM, or a PEFT model around one. Run in eval mode under
            ``torch.no_grad()``; its train/eval mode is restored afterwards.
        tokenizer: Its tokenizer (unchanged by the call).
        prompts: Prompt texts.
        max_new_tokens: Tokens to generate per prompt at most; a row stops earlier at EOS.
        batch_size: Prompts per ``generate`` call.
        max_prompt_tokens: Longer prompts lose tokens on the left (a leading BOS is kept).
        chat_template: Wrap each prompt as one user message through the tokenizer's chat
            template, with the assistant's turn opened.

    Returns:
        One continuation per prompt: the new tokens only, up to the first EOS, decoded with
        ``skip_special_tokens=True``.

    Raises:
        ConfigError: A count is below 1, or ``chat_template`` with a tokenizer that has none.
        DataError: A prompt yields no token.
        ModelError: The tokenizer has neither a pad nor an EOS token.
    """
    _check_positive(max_new_tokens=max_new_tokens, batch_size=batch_size, max_prompt_tokens=max_prompt_tokens)
    if chat_template and not getattr(tokenizer, "chat_template", None):
        raise ConfigError("chat_template is on but the tokenizer has no chat template")
    eos_ids = _eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids[0] if eos_ids else None)
    if pad_id is None:
        raise ModelError("the tokenizer has neither a pad token nor an EOS token to pad with")
    encoded = [_encode(tokenizer, prompt, max_prompt_tokens, chat_template) for prompt in prompts]
    empty = [index for index, ids in enumerate(encoded) if not ids]
    if empty:
        raise DataError(f"prompts {empty[:10]} tokenize to no tokens; nothing to continue from")

    order = sorted(range(len(encoded)), key=lambda index: len(encoded[index]))
    outputs = [""] * len(encoded)
    device = model_device(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                input_ids, mask = _left_padded([encoded[index] for index in rows], pad_id)
                generated = model.generate(
                    input_ids=input_ids.to(device),
                    attention_mask=mask.to(device),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=eos_ids or None,
                )
                new_tokens = generated[:, input_ids.shape[1] :].tolist()
                for row, index in enumerate(rows):
                    outputs[index] = tokenizer.decode(_until_eos(new_tokens[row], eos_ids), skip_special_tokens=True)
    finally:
        model.train(was_training)
    return outputs
