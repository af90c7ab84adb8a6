"""SGP, similarity group pruning: rank blocks of consecutive layers by angular distance.

For a block of ``n`` layers starting at layer ``l`` the distance is
``d(l, n) = mean over non-padding tokens of arccos(clip(cos(hs[l], hs[l + n]), -1, 1)) / pi``
where ``hs[l]`` is the hidden state entering layer ``l`` (``hs[0]`` the embedding output,
``hs[l + 1]`` the raw output of layer ``l``). A small distance means the block barely
changes the representation, so removing it costs little (Gromov et al., 2024).

One forward pass over the public text gives every ``d(l, n)`` at once. :func:`rank_blocks`
then orders non-overlapping blocks greedily by distance, keeping protected head and tail
layers; pruning the first ``p`` blocks of that ranking gives nested tiers.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn

from coordinator.model.evaluation import Batch, model_device
from coordinator.model.surgery import capture_layer_io, find_decoder_layers
from shared.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TokenMode = Literal["all", "last"]


def angular_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Angular distance ``arccos(clip(cos(a, b), -1, 1)) / pi`` along the last dimension.

    Args:
        a: Tensor[..., H].
        b: Tensor[..., H] (same shape).
        eps: Norm floor that keeps all-zero vectors finite.

    Returns:
        Tensor[...] in [0, 1], float32.
    """
    a = a.float()
    b = b.float()
    cos = (a * b).sum(-1) / (a.norm(dim=-1).clamp_min(eps) * b.norm(dim=-1).clamp_min(eps))
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


def _token_weights(mask: torch.Tensor, token: TokenMode) -> torch.Tensor:
    """Float weights [B, T]: 1 on the tokens that count, 0 elsewhere."""
    mask = mask.bool()
    if token == "all":
        return mask.float()
    # The last real token of each row, wherever the padding sits.
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask, positions, torch.full_like(positions, -1)).amax(dim=1)
    weights = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    rows = torch.nonzero(last >= 0).squeeze(1)
    weights[rows, last[rows]] = 1.0
    return weights


@torch.no_grad()
def compute_block_distances(
    model: nn.Module,
    batches: Iterable[Batch],
    *,
    max_block: int | None = None,
    token: TokenMode = "all",
    progress: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Angular distance of every block of consecutive decoder layers, in one pass.

    Args:
        model: A causal LM (run in eval mode without a KV cache; its mode is restored).
        batches: Right-padded batches ``{"input_ids": [B, T], "attention_mask": [B, T]}``
            (see :func:`coordinator.model.evaluation.tokenize_texts`); padding is excluded by the mask.
        max_block: Largest block size ``n`` to measure (default: all layers).
        token: ``"all"``: mean over every non-padding token; ``"last"``: the last
            non-padding token of each sequence only (as Gromov et al.).
        progress: Called with 1 after each batch.

    Returns:
        Tensor[L, max_block] (float32, CPU): entry ``[l, n - 1]`` is ``d(l, n)``, the mean
        over the chosen tokens of all batches; ``nan`` where the block does not fit
        (``l + n > L``).

    Raises:
        ConfigError: ``max_block`` outside ``1..L`` or unknown ``token``.
        DataError: The batches hold no token to average over.
    """
    _, layers = find_decoder_layers(model)
    num_layers = len(layers)
    max_block = num_layers if max_block is None else int(max_block)
    if not 1 <= max_block <= num_layers:
        raise ConfigError(f"max_block must be in 1..{num_layers}, got {max_block}")
    if token not in ("all", "last"):
        raise ConfigError(f"token must be 'all' or 'last', got {token!r}")
    sums = torch.zeros(num_layers, max_block, dtype=torch.float64)
    total_weight = 0.0
    device = model_device(model)
    backbone = getattr(model, "base_model", model)
    was_training = model.training
    model.eval()
    try:
        with capture_layer_io(model, inputs=True) as captured:
            for batch in batches:
                ids = batch["input_ids"].to(device)
                mask = batch["attention_mask"].to(device)
                # The decoder alone suffices (the hooks see every layer); skipping the LM head
                # saves a vocabulary-sized matmul per token.
                backbone(input_ids=ids, attention_mask=mask, use_cache=False)
                weights = _token_weights(mask, token)
                chosen = weights > 0
                total_weight += float(weights.sum())
                # x: [N, L + 1, H] for the N tokens that count; normalised once so that one
                # batched Gram matrix gives the cosine of every pair of depths per token.
                x = torch.stack([captured["input"][chosen]] + [captured[i][chosen] for i in range(num_layers)], dim=1)
                x = x.float()
                x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-8)
                gram = torch.bmm(x, x.transpose(1, 2)).clamp(-1.0, 1.0)  # [N, L + 1, L + 1]
                dist = torch.arccos(gram) / math.pi
                for n in range(1, max_block + 1):
                    # The n-th super-diagonal holds d between hs[l] and hs[l + n] for every l.
                    diag = torch.diagonal(dist, offset=n, dim1=1, dim2=2)  # [N, L + 1 - n]
                    sums[: num_layers + 1 - n, n - 1] += diag.sum(0).double().cpu()
                if progress is not None:
                    progress(1)
    finally:
        model.train(was_training)
    if total_weight == 0:
        raise DataError("the calibration batches hold no non-padding token")
    distances = (sums / total_weight).float()
    starts = torch.arange(num_layers).unsqueeze(1)
    sizes = torch.arange(1, max_block + 1).unsqueeze(0)
    distances[starts + sizes > num_layers] = float("nan")
    return distances


def rank_blocks(
    distances: torch.Tensor, block_size: int, keep_head: int = 1, keep_tail: int = 1
) -> list[list[int]]:
    """Greedy ranking of non-overlapping blocks of ``block_size`` layers, most prunable first.

    Candidate blocks avoid the first ``keep_head`` and last ``keep_tail`` layers. They are
    taken in ascending distance (ties: lower start first) and a block is accepted when it
    overlaps no block accepted before it. Pruning the first ``p`` blocks gives the tier with
    ``p`` blocks; every tier prunes a superset of the smaller-``p`` tier (nested tiers).

    Args:
        distances: Tensor[L, max_n] from :func:`compute_block_distances`.
        block_size: Layers per block ``n`` (``1 <= n <= max_n``).
        keep_head: Protected layers at the start.
        keep_tail: Protected layers at the end.

    Returns:
        The accepted blocks in pruning order, each the list of its full-LLM layer indices.

    Raises:
        ConfigError: The block size is not in the table, or protection leaves no room.
    """
    num_layers, max_n = distances.shape
    if not 1 <= block_size <= max_n:
        raise ConfigError(f"block_size must be in 1..{max_n} (the measured sizes), got {block_size}")
    if keep_head < 0 or keep_tail < 0:
        raise ConfigError("keep_head and keep_tail must be >= 0")
    last_start = num_layers - keep_tail - block_size
    if last_start < keep_head:
        raise ConfigError(
            f"no block of {block_size} layers fits between {keep_head} protected head and "
            f"{keep_tail} protected tail layers of {num_layers}"
        )
    column = distances[:, block_size - 1]
    candidates = [
        (float(column[start]), start)
        for start in range(keep_head, last_start + 1)
        if not math.isnan(float(column[start]))
    ]
    candidates.sort()
    taken = [False] * num_layers
    ranking: list[list[int]] = []
    for _, start in candidates:
        block = list(range(start, start + block_size))
        if any(taken[i] for i in block):
            continue
        for i in block:
            taken[i] = True
        ranking.append(block)
    return ranking
