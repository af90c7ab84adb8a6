"""Turning public text into padded batches, and perplexity of a causal LM on held-out text.

Batches are right-padded ``{"input_ids", "attention_mask"}`` dicts: with right padding and
causal attention, padding never changes what the real tokens see, so SGP, ODA and
perplexity all mask padding by ``attention_mask`` alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from coordinator.model.lm_head import (
    DEFAULT_CHUNK_TOKENS,
    TokenLogits,
    chunked_nll,
    final_hidden,
)
from shared.errors import DataError

Batch = dict[str, torch.Tensor]


def tokenize_texts(
    tokenizer, texts: Sequence[str], *, max_length: int = 128, batch_size: int = 8, min_tokens: int = 2
) -> list[Batch]:
    """Tokenize texts into right-padded batches.

    Args:
        tokenizer: A Hugging Face tokenizer (a pad token is taken from EOS if missing).
        texts: Paragraphs; each becomes one sequence, truncated to ``max_length`` tokens.
        max_length: Tokens per sequence at most.
        batch_size: Sequences per batch.
        min_tokens: Sequences shorter than this are dropped (they carry no next-token target).

    Returns:
        Batches ``{"input_ids": LongTensor[B, T], "attention_mask": LongTensor[B, T]}``, ``T``
        being the longest sequence of the batch.

    Raises:
        DataError: No text yields at least ``min_tokens`` tokens.
    """
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoded = [
        ids
        for ids in tokenizer(list(texts), truncation=True, max_length=max_length, add_special_tokens=True)["input_ids"]
        if len(ids) >= min_tokens
    ]
    if not encoded:
        raise DataError(f"none of the {len(texts)} texts has at least {min_tokens} tokens")
    batches = []
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        input_ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, ids in enumerate(chunk):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = 1
        batches.append({"input_ids": input_ids, "attention_mask": mask})
    return batches


def model_device(model: nn.Module) -> torch.device:
    """Device of a model's first parameter (CPU for a parameterless module)."""
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


@torch.no_grad()
def batches_nll(
    model: nn.Module,
    batches: Iterable[Batch],
    progress: Callable[[int], None] | None = None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[float, int]:
    """Summed next-token negative log-likelihood over non-padding targets.

    Args:
        model: A causal LM (evaluated in eval mode; its mode is restored afterwards).
        batches: Right-padded batches from :func:`tokenize_texts`.
        progress: Called with 1 after each batch.
        chunk_tokens: Tokens whose logits exist at once.

    Returns:
        ``(total_nll, n_tokens)`` in nats; the loss is computed in float32.
    """
    was_training = model.training
    model.eval()
    device = model_device(model)
    head = TokenLogits(model)
    total, count = 0.0, 0
    try:
        for batch in batches:
            ids = batch["input_ids"].to(device)
            mask = batch["attention_mask"].to(device)
            # The head runs on a chunk of tokens at a time: no [B, T, V] logits tensor.
            hidden = final_hidden(model, ids, mask)[:, :-1]
            targets = ids[:, 1:]
            # A target counts only when both it and the token predicting it are real.
            valid = (mask[:, 1:] * mask[:, :-1]).bool()
            total += float(chunked_nll(hidden[valid], targets[valid], head, chunk=chunk_tokens))
            count += int(valid.sum())
            if progress is not None:
                progress(1)
    finally:
        model.train(was_training)
    return total, count


def evaluate_perplexity(
    model: nn.Module,
    tokenizer,
    texts: Sequence[str],
    *,
    max_length: int = 256,
    batch_size: int = 8,
    progress: Callable[[int], None] | None = None,
) -> float:
    """Perplexity of a causal LM on texts (token-weighted over all non-padding targets).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer.
        texts: Held-out paragraphs.
        max_length: Tokens per paragraph at most.
        batch_size: Sequences per forward.
        progress: Called with 1 after each batch.

    Returns:
        ``exp(mean NLL)``.
    """
    batches = tokenize_texts(tokenizer, texts, max_length=max_length, batch_size=batch_size)
    total, count = batches_nll(model, batches, progress)
    return math.exp(total / count)
