"""Tokenizing a (prompt, answer) pair, and scoring candidate answers with a causal LM.

Both roles tokenize a pair with :func:`encode_pair`, so the token boundary a client trains on
is exactly the one the coordinator scores: the prompt with the tokenizer's special tokens, the
answer without. :func:`choice_logprobs` is how classification and multiple-choice tasks are
judged: which candidate answer the model finds most likely after the prompt, so no generation
or parsing is involved. torch is imported lazily, so this module stays cheap to import.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from shared.errors import DataError

if TYPE_CHECKING:
    import torch


def encode_pair(
    tokenizer: Any, prompt: str, answer: str, max_length: int, *, add_eos: bool = False
) -> tuple[list[int], int]:
    """Tokenize a prompt and its answer for causal-LM training or scoring.

    The prompt is tokenized with the tokenizer's special tokens (a BOS where the model uses
    one), the answer without, and the two are concatenated, so the answer tokens are the same
    whatever the prompt. When the pair is longer than ``max_length`` the prompt loses tokens
    from its left (keeping a leading BOS), so the answer and the text nearest to it survive;
    an answer that alone does not fit is cut on its right, keeping one prompt token.

    Args:
        tokenizer: A Hugging Face tokenizer.
        prompt: Conditioning text.
        answer: Target text.
        max_length: Longest sequence to return (>= 2).
        add_eos: Append the tokenizer's EOS token to the answer (generation tasks, so the
            model learns to stop).

    Returns:
        ``(ids, n_answer)``: the token ids (length <= ``max_length``) and how many of the last
        ids belong to the answer (>= 1).

    Raises:
        DataError: The answer tokenizes to nothing, or ``max_length`` < 2.
    """
    if max_length < 2:
        raise DataError(f"sequence length must be at least 2 tokens, got {max_length}")
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    answer_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    if add_eos and tokenizer.eos_token_id is not None:
        answer_ids.append(int(tokenizer.eos_token_id))
    if not answer_ids:
        raise DataError(f"answer {answer!r} tokenizes to no tokens")
    bos = getattr(tokenizer, "bos_token_id", None)
    keep_bos = bool(prompt_ids) and bos is not None and prompt_ids[0] == bos
    if len(answer_ids) > max_length - 1:
        answer_ids = answer_ids[: max_length - 1]
    room = max_length - len(answer_ids)
    if len(prompt_ids) > room:
        if keep_bos and room >= 2:
            prompt_ids = [prompt_ids[0]] + prompt_ids[len(prompt_ids) - room + 1 :]
        else:
            prompt_ids = prompt_ids[len(prompt_ids) - room :]
    if not prompt_ids:
        # Without a context token there is no position whose prediction is the first answer
        # token; an empty prompt on a tokenizer without BOS would otherwise train on nothing.
        raise DataError(f"prompt {prompt!r} tokenizes to no tokens and the tokenizer adds no BOS")
    return prompt_ids + answer_ids, len(answer_ids)


def _model_device(model: Any) -> torch.device:
    import torch

    for parameter in model.parameters():
        return parameter.device
    return torch.device("cpu")


def choice_logprobs(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    choices: Sequence[str],
    *,
    batch_size: int = 8,
    max_length: int = 512,
) -> torch.Tensor:
    """Log-likelihood of each candidate answer after each prompt.

    The candidates are answer texts (``" positive"``, ``" C"``), tokenized as in
    :func:`encode_pair`. For a one-token answer the score is the next-token log-probability;
    for longer answers it is the sum over the answer's tokens. When every answer is one token
    a single forward pass per batch scores all of them.

    On CPU with bitsandbytes 4-bit weights, call this only on a model loaded with the
    AVX512_BF16 workaround (see ``shared.subllm``): a no-grad pass otherwise repacks the
    weights into a layout that breaks later training.

    Args:
        model: A causal LM (plain, 4-bit, or PEFT-wrapped); it is put in eval mode for the call
            and restored afterwards.
        tokenizer: Its tokenizer.
        prompts: N prompt strings.
        choices: K candidate answers.
        batch_size: Sequences per forward pass.
        max_length: Longest sequence; longer prompts lose tokens on the left.

    Returns:
        Float32 CPU tensor of shape ``[N, K]``.

    Raises:
        DataError: No candidates, or an answer that tokenizes to nothing.
    """
    import torch

    if not choices:
        raise DataError("scoring needs at least one candidate answer")
    targets = list(choices)
    if not prompts:
        return torch.empty(0, len(targets), dtype=torch.float32)
    encoded = [[encode_pair(tokenizer, p, t, max_length) for t in targets] for p in prompts]
    device = _model_device(model)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    single = all(n == 1 for row in encoded for _, n in row)
    out = torch.empty(len(prompts), len(targets), dtype=torch.float32)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if single:
                # encode_pair tokenizes answers alone, so their ids are the same after every prompt.
                answer_ids = torch.tensor([ids[-1] for ids, _ in encoded[0]])
                # Batch prompts of similar length together: padding is wasted compute.
                order = sorted(range(len(prompts)), key=lambda i: len(encoded[i][0][0]))
                for start in range(0, len(order), batch_size):
                    index = order[start : start + batch_size]
                    rows = [encoded[i][0][0][:-1] for i in index]
                    logits = _forward(model, rows, pad_id, device)
                    last = torch.tensor([len(r) - 1 for r in rows])
                    logp = torch.log_softmax(logits[torch.arange(len(rows)), last].float(), dim=-1).cpu()
                    out[index] = logp[:, answer_ids]
            else:
                pairs = [(i, k) for i in range(len(prompts)) for k in range(len(targets))]
                for start in range(0, len(pairs), batch_size):
                    chunk = pairs[start : start + batch_size]
                    rows = [encoded[i][k][0] for i, k in chunk]
                    logits = _forward(model, rows, pad_id, device)
                    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
                    for b, (i, k) in enumerate(chunk):
                        ids, n_answer = encoded[i][k]
                        positions = torch.arange(len(ids) - n_answer - 1, len(ids) - 1)
                        tokens = torch.tensor(ids[len(ids) - n_answer :])
                        out[i, k] = logp[b, positions, tokens].sum()
    finally:
        model.train(was_training)
    return out


def _forward(model: Any, rows: list[list[int]], pad_id: int, device: torch.device) -> torch.Tensor:
    """Run right-padded rows through the model; returns logits ``[B, T, V]``."""
    import torch

    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for b, row in enumerate(rows):
        input_ids[b, : len(row)] = torch.tensor(row)
        mask[b, : len(row)] = 1
    return model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits


def pick_choices(
    model: Any, tokenizer: Any, prompts: Sequence[str], choices: Sequence[str], **options: Any
) -> list[int]:
    """Predict an answer for each prompt: the candidate with the highest log-likelihood.

    Args:
        model: A causal LM (see :func:`choice_logprobs`).
        tokenizer: Its tokenizer.
        prompts: N prompt strings.
        choices: K candidate answers.
        **options: ``batch_size``, ``max_length`` of :func:`choice_logprobs`.

    Returns:
        N indices into ``choices`` (ties go to the lower index).
    """
    scores = choice_logprobs(model, tokenizer, prompts, choices, **options)
    return [int(i) for i in scores.argmax(dim=1)]
