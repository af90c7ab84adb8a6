"""The LM head a chunk of tokens at a time: KL and NLL without a (tokens x vocabulary) tensor.

A causal LM's forward returns logits for every position, ``batch * seq * vocab`` values:
with a 150k-token vocabulary and 4 x 256 tokens that is 0.6 GB in fp32, and a KL between
teacher and student holds several such tensors (both log-softmaxes, the probabilities, their
gradients). Here the decoder runs without its head (:func:`final_hidden`), and the head is
applied to ``chunk`` tokens at a time (:class:`TokenLogits`), so at most ``chunk * vocab``
values exist at once. In :func:`chunked_kl` each chunk is under activation checkpointing:
backward recomputes that chunk's logits instead of keeping all of them alive.

:class:`TokenLogits` reproduces what each architecture's forward does after the decoder
(the head, Gemma-2's final logit soft-capping, Cohere's logit scale, Granite's logit
divisor); ``tests/coordinator/model/test_lm_head.py`` checks it against ``model(...).logits``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from shared.errors import ModelError

#: Tokens whose logits exist at once. 256 x a 150k vocabulary x fp32 is 156 MB per tensor, and
#: ODA's KL holds about six such tensors at once, so even a large-vocabulary model's chunk stays
#: under 1 GB (1,024 tokens cost 3.7 GB there, measured as the largest term of a Qwen2-0.5B prune).
#: The head's FLOPs do not depend on the chunk; smaller chunks only mean more, smaller matmuls.
DEFAULT_CHUNK_TOKENS = 256


def backbone(model: nn.Module) -> nn.Module:
    """The decoder of a causal LM without its head (``model.model``, ``model.transformer`` ...)."""
    return getattr(model, "base_model", model)


def final_hidden(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The decoder's last hidden states (after its final norm), Tensor[B, T, H]; no logits computed."""
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
    return out[0]


class TokenLogits:
    """``hidden [N, H] -> logits [N, V]`` (float32), as the model's own forward computes them.

    Args:
        model: A Hugging Face causal LM.

    Raises:
        ModelError: The model has no output embedding (head).
    """

    def __init__(self, model: nn.Module) -> None:
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is None:
            raise ModelError(f"{type(model).__name__} has no output head to compute logits with")
        self.head = head
        config: Any = getattr(model, "config", None)
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.scale = getattr(config, "logit_scale", None)  # Cohere multiplies
        self.divisor = getattr(config, "logits_scaling", None)  # Granite divides

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits of the given hidden states, float32."""
        logits = self.head(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divisor is not None:
            logits = logits / self.divisor
        logits = logits.float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


def _chunk_kl_sum(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_logits: TokenLogits,
    teacher_logits: TokenLogits,
    temperature: float,
) -> torch.Tensor:
    """Summed ``KL(p_teacher || p_student)`` over one chunk of tokens (no tau^2)."""
    with torch.no_grad():
        log_pt = torch.log_softmax(teacher_logits(teacher_hidden) / temperature, dim=-1)
    log_ps = torch.log_softmax(student_logits(student_hidden) / temperature, dim=-1)
    return (log_pt.exp() * (log_pt - log_ps)).sum()


def chunked_kl(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_logits: TokenLogits,
    teacher_logits: TokenLogits,
    *,
    temperature: float,
    chunk: int = DEFAULT_CHUNK_TOKENS,
) -> torch.Tensor:
    """Mean over tokens of ``tau^2 * KL(softmax(z_t / tau) || softmax(z_s / tau))``, chunk by chunk.

    Equal to the KL of the full logits (up to float rounding); differentiable with respect to
    ``student_hidden``, with one chunk's logits alive at a time in forward and in backward.

    Args:
        student_hidden: Tensor[N, H], the student's final hidden states of the tokens that count.
        teacher_hidden: Tensor[N, H], the teacher's (no gradient needed).
        student_logits: The student's head.
        teacher_logits: The teacher's head.
        temperature: Softmax temperature tau.
        chunk: Tokens per chunk.

    Returns:
        A scalar float32 tensor.

    Raises:
        ModelError: No token, or the two sides hold different token counts.
    """
    n = student_hidden.shape[0]
    if n == 0 or teacher_hidden.shape[0] != n:
        raise ModelError(f"chunked KL over {n} student and {teacher_hidden.shape[0]} teacher tokens")
    total = student_hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, n, chunk):
        s = student_hidden[start : start + chunk]
        t = teacher_hidden[start : start + chunk].to(s.device)
        if s.requires_grad:
            part = checkpoint(_chunk_kl_sum, s, t, student_logits, teacher_logits, temperature, use_reentrant=False)
        else:
            part = _chunk_kl_sum(s, t, student_logits, teacher_logits, temperature)
        total = total + part
    return total / n * temperature**2


@torch.no_grad()
def chunked_nll(
    hidden: torch.Tensor, targets: torch.Tensor, logits: TokenLogits, *, chunk: int = DEFAULT_CHUNK_TOKENS
) -> torch.Tensor:
    """Summed next-token negative log-likelihood (float32, nats) of ``targets`` given ``hidden``.

    Args:
        hidden: Tensor[N, H], the final hidden state of each predicting token.
        targets: Tensor[N], the token each should predict.
        logits: The model's head.
        chunk: Tokens per chunk.
    """
    total = torch.zeros((), dtype=torch.float32, device=hidden.device)
    for start in range(0, hidden.shape[0], chunk):
        part = logits(hidden[start : start + chunk])
        total += torch.nn.functional.cross_entropy(part, targets[start : start + chunk].to(part.device), reduction="sum")
    return total
