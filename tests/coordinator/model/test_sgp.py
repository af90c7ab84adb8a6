"""SGP: block distances (range, direct computation, padding), greedy selection, nested tiers."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.model import sgp
from coordinator.model.evaluation import tokenize_texts
from shared.errors import ConfigError
from shared.layermap import kept_layers
from tests.coordinator.arch_models import VOCAB, tiny_model

TEXTS = [
    "The river flows through the old town, past the market and the cathedral.",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "A short one.",
    "In 1969 the first humans walked on the Moon during the Apollo 11 mission, watched by millions.",
]


def direct_hidden_states(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """hs[0..L] of one unpadded sequence by running the Llama layers by hand."""
    inner = model.model
    with torch.no_grad():
        hidden = inner.embed_tokens(ids)
        positions = torch.arange(ids.shape[1]).unsqueeze(0)
        rope = inner.rotary_emb(hidden, positions)
        states = [hidden]
        for layer in inner.layers:
            out = layer(hidden, attention_mask=None, position_embeddings=rope, position_ids=positions)
            hidden = out[0] if isinstance(out, tuple) else out
            states.append(hidden)
    return states


def direct_distances(model, tokenizer, texts, last_only: bool = False) -> torch.Tensor:
    """d(l, n) computed independently: per sequence, no padding, torch's cosine_similarity."""
    num_layers = model.config.num_hidden_layers
    sums = torch.zeros(num_layers, num_layers, dtype=torch.float64)
    count = 0
    for text in texts:
        ids = tokenizer(text, return_tensors="pt")["input_ids"][:, :32]
        hs = direct_hidden_states(model, ids)
        for l in range(num_layers):
            for n in range(1, num_layers - l + 1):
                cos = torch.nn.functional.cosine_similarity(hs[l][0], hs[l + n][0], dim=-1)
                ang = torch.arccos(cos.clamp(-1, 1)) / math.pi
                sums[l, n - 1] += float(ang[-1]) if last_only else float(ang.double().sum())
        count += 1 if last_only else ids.shape[1]
    direct = (sums / count).float()
    for l in range(num_layers):
        direct[l, num_layers - l :] = float("nan")
    return direct


@pytest.mark.parametrize("token", ["all", "last"])
def test_distances_in_range_and_equal_direct_computation(smol, token):
    model, tokenizer = smol
    batches = tokenize_texts(tokenizer, TEXTS, max_length=32, batch_size=3)
    assert any(int(b["attention_mask"].min()) == 0 for b in batches), "the test needs padding in a batch"
    got = sgp.compute_block_distances(model, batches, token=token)
    L = model.config.num_hidden_layers
    assert got.shape == (L, L)
    valid = ~torch.isnan(got)
    for l in range(L):
        for n in range(1, L + 1):
            assert bool(valid[l, n - 1]) == (l + n <= L)
    assert float(got[valid].min()) >= 0.0 and float(got[valid].max()) <= 1.0
    want = direct_distances(model, tokenizer, TEXTS, last_only=token == "last")
    torch.testing.assert_close(got, want, rtol=1e-4, atol=2e-5, equal_nan=True)


def test_padding_and_batching_do_not_change_distances(smol):
    model, tokenizer = smol
    one = sgp.compute_block_distances(model, tokenize_texts(tokenizer, TEXTS, max_length=32, batch_size=1))
    four = sgp.compute_block_distances(model, tokenize_texts(tokenizer, TEXTS, max_length=32, batch_size=4))
    torch.testing.assert_close(one, four, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_max_block_limits_the_table(smol):
    model, tokenizer = smol
    batches = tokenize_texts(tokenizer, TEXTS[:2], max_length=16, batch_size=2)
    full = sgp.compute_block_distances(model, batches)
    two = sgp.compute_block_distances(model, batches, max_block=2)
    assert two.shape == (4, 2)
    torch.testing.assert_close(two, full[:, :2], equal_nan=True)
    with pytest.raises(ConfigError):
        sgp.compute_block_distances(model, batches, max_block=5)
    with pytest.raises(ConfigError):
        sgp.compute_block_distances(model, batches, token="first")  # type: ignore[arg-type]


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_distances_on_other_architectures(arch):
    model = tiny_model(arch)
    ids = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    got = sgp.compute_block_distances(model, [{"input_ids": ids, "attention_mask": mask}], max_block=3)
    assert got.shape == (6, 3)
    valid = ~torch.isnan(got)
    assert int(valid.sum()) == 6 + 5 + 4
    assert float(got[valid].min()) >= 0 and float(got[valid].max()) <= 1


@settings(max_examples=200, deadline=None)
@given(
    data=st.data(),
    num_layers=st.integers(3, 24),
    keep_head=st.integers(0, 3),
    keep_tail=st.integers(0, 3),
)
def test_rank_blocks_never_overlaps_or_touches_protected_layers(data, num_layers, keep_head, keep_tail):
    block = data.draw(st.integers(1, num_layers))
    values = data.draw(st.lists(st.floats(0, 1), min_size=num_layers * num_layers, max_size=num_layers * num_layers))
    distances = torch.tensor(values, dtype=torch.float32).reshape(num_layers, num_layers)
    for l in range(num_layers):
        distances[l, num_layers - l :] = float("nan")
    if num_layers - keep_tail - block < keep_head:
        with pytest.raises(ConfigError):
            sgp.rank_blocks(distances, block, keep_head, keep_tail)
        return
    ranking = sgp.rank_blocks(distances, block, keep_head, keep_tail)
    flat = [i for b in ranking for i in b]
    assert len(flat) == len(set(flat)), "blocks overlap"
    assert all(keep_head <= i < num_layers - keep_tail for i in flat), "a protected layer was pruned"
    assert all(b == list(range(b[0], b[0] + block)) for b in ranking)
    scores = [float(distances[b[0], block - 1]) for b in ranking]
    assert scores == sorted(scores), "blocks not in ascending distance"
    # Greedy maximality: every candidate left out overlaps a block that ranks at least as well.
    for start in range(keep_head, num_layers - keep_tail - block + 1):
        if start in (b[0] for b in ranking):
            continue
        span = set(range(start, start + block))
        d = float(distances[start, block - 1])
        assert any(span & set(b) and float(distances[b[0], block - 1]) <= d for b in ranking)
    # Nested tiers: pruning one more block keeps a subset of the layers.
    tiers = [kept_layers(num_layers, ranking, p) for p in range(len(ranking) + 1)]
    for smaller, larger in zip(tiers[1:], tiers):
        assert set(smaller) < set(larger)
        assert len(larger) - len(smaller) == block


def test_rank_blocks_example_and_errors():
    nan = float("nan")
    # 6 layers, block size 2: d(1,2)=0.1, d(2,2)=0.05, d(3,2)=0.2; (0,2) and (4,2) are protected.
    distances = torch.full((6, 2), nan)
    distances[:, 1] = torch.tensor([0.0, 0.1, 0.05, 0.2, 0.0, nan])
    assert sgp.rank_blocks(distances, 2, 1, 1) == [[2, 3]]
    distances[:, 1] = torch.tensor([0.0, 0.1, 0.3, 0.2, 0.0, nan])
    assert sgp.rank_blocks(distances, 2, 1, 1) == [[1, 2], [3, 4]]
    with pytest.raises(ConfigError):
        sgp.rank_blocks(distances, 3, 0, 0)  # block size outside the measured table


def test_angular_distance_edges():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0], [-1.0, 0.0], [1.0, 0.0]])
    torch.testing.assert_close(sgp.angular_distance(a, b), torch.tensor([0.0, 0.5, 1.0, 0.5]))
