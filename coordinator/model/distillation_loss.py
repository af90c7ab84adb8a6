"""The ODA loss between a student (sub-LLM) and its teacher (the full LLM), over real tokens.

``alpha * tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))
+ beta * mean_i ||h_s[i] - h_t[kept[i]]||^2 / ||h_t[kept[i]]||^2``

in float32 whatever the models' dtype, the KL a chunk of tokens at a time
(:func:`coordinator.model.lm_head.chunked_kl`), so no ``tokens x vocab`` tensor exists in full.
A pure function of the two models' outputs: the training loop that produces them is
:mod:`coordinator.model.oda`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from coordinator.model.lm_head import DEFAULT_CHUNK_TOKENS, chunked_kl
from shared.errors import ModelError


def distillation_loss(
    student_final: torch.Tensor,
    teacher_final: torch.Tensor,
    student_logits: Callable[[torch.Tensor], torch.Tensor],
    teacher_logits: Callable[[torch.Tensor], torch.Tensor],
    student_hidden: Sequence[torch.Tensor],
    teacher_hidden: Sequence[torch.Tensor],
    attention_mask: torch.Tensor,
    *,
    temperature: float = 2.0,
    alpha: float = 1.0,
    beta: float = 1.0,
    kl_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ODA loss over the non-padding tokens, in float32, the logits a chunk of tokens at a time.

    Args:
        student_final: Tensor[B, T, H], the student decoder's last hidden states.
        teacher_final: Tensor[B, T, H], the teacher's (no gradient needed).
        student_logits: The student's head, ``[N, H] -> [N, V]`` float32
            (:class:`~coordinator.model.lm_head.TokenLogits`).
        teacher_logits: The teacher's head.
        student_hidden: Per aligned layer, Tensor[B, T, H] (student layer outputs).
        teacher_hidden: The mapped teacher layer outputs, same shapes and order.
        attention_mask: Tensor[B, T], 1 on real tokens.
        temperature: Softmax temperature tau.
        alpha: Weight of the KL term.
        beta: Weight of the hidden-state term.
        kl_chunk_tokens: Tokens whose logits exist at once (see :mod:`coordinator.model.lm_head`).

    Returns:
        ``(total, kl, hidden)``: scalar tensors; ``kl`` already includes ``tau^2``; ``total =
        alpha * kl + beta * hidden``.

    Raises:
        ModelError: The mask selects no token, or the layer lists differ in length.
    """
    if len(student_hidden) != len(teacher_hidden):
        raise ModelError(f"{len(student_hidden)} student vs {len(teacher_hidden)} teacher hidden states")
    valid = attention_mask.bool()
    n_tokens = int(valid.sum())
    if n_tokens == 0:
        raise ModelError("the distillation batch has no non-padding token")
    kl = chunked_kl(
        student_final[valid], teacher_final[valid.to(teacher_final.device)], student_logits, teacher_logits,
        temperature=temperature, chunk=kl_chunk_tokens,
    )
    hidden = kl.new_zeros(())
    if student_hidden:
        terms = []
        for hs, ht in zip(student_hidden, teacher_hidden):
            hs = hs[valid].float()
            ht = ht[valid].float()
            terms.append(((hs - ht).pow(2).sum(-1) / ht.pow(2).sum(-1).clamp_min(1e-8)).mean())
        hidden = torch.stack(terms).mean()
    return alpha * kl + beta * hidden, kl, hidden
