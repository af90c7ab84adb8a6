"""FedKRSO's subspaces: reproducible from the seed alone, rebuilt exactly, averaged linearly."""

from __future__ import annotations

import hashlib

import pytest
import torch

from coordinator.run.aggregation.fedavg import FedAvg
from shared.errors import TensorError
from shared.subspace import (
    SEED_BITS,
    as_lora,
    coordinate_key,
    is_coordinate_key,
    projection,
    rebuild,
    round_seeds,
    split_key,
)

Q = "base_model.model.model.layers.3.self_attn.q_proj"
V = "base_model.model.model.layers.3.self_attn.v_proj"
D_IN = {Q: 12, V: 12}
#: sha256 prefix of ``projection(123, Q, 4, 12)``'s float32 bytes, measured once and pinned.
PINNED = "638f4b0527160cce"


def test_a_seed_names_one_projection_whatever_the_torch_rng_state():
    torch.manual_seed(1)
    first = projection(123, Q, 4, 12)
    torch.manual_seed(2)
    torch.rand(100)  # a framework RNG in another state changes nothing
    assert torch.equal(first, projection(123, Q, 4, 12))
    assert not torch.equal(first, projection(124, Q, 4, 12))
    assert not torch.equal(first, projection(123, V, 4, 12))  # each matrix its own subspace


def test_projection_bits_are_pinned_so_every_version_and_device_rebuilds_the_same_update():
    # The generator is integer SplitMix64: these bytes are what any client, on any device or
    # library version, must produce. Changing the generator is a protocol change.
    p = projection(123, Q, 4, 12)
    assert hashlib.sha256(p.numpy().tobytes()).hexdigest()[:16] == PINNED
    if torch.cuda.is_available():  # the device only receives the CPU-built bits
        assert torch.equal(p.to("cuda").cpu(), p)


def test_projection_entries_give_an_identity_in_expectation():
    p = projection(7, Q, 8, 64)
    assert p.shape == (8, 64) and p.dtype == torch.float32
    assert torch.allclose(p.abs(), torch.full_like(p, 8**-0.5)) and bool((p > 0).any() and (p < 0).any())
    # (P^T P)_jj = sum over r of 1/r = 1 exactly; off the diagonal it averages to 0 over seeds.
    gram = torch.stack([projection(s, Q, 8, 64).T @ projection(s, Q, 8, 64) for s in range(200)]).mean(0)
    assert torch.allclose(torch.diagonal(gram), torch.ones(64))
    off = gram - torch.diag(torch.diagonal(gram))
    assert off.abs().max() < 0.2 and abs(float(off.mean())) < 0.01


def test_round_seeds_are_a_pure_function_of_run_and_round():
    assert round_seeds(0, 3, 4) == round_seeds(0, 3, 4)
    assert len(set(round_seeds(0, 3, 4) + round_seeds(0, 4, 4) + round_seeds(1, 3, 4))) == 12
    assert all(0 <= s < 2**SEED_BITS for s in round_seeds(5, 0, 16))


def test_coordinate_keys_round_trip_and_refuse_other_keys():
    key = coordinate_key(Q, 42)
    assert split_key(key) == (Q, 42) and is_coordinate_key(key)
    for bad in (f"{Q}.lora_A.weight", "model.layers.3.q_proj.krso.42", f"{Q}.krso.x"):
        assert not is_coordinate_key(bad)
        with pytest.raises(TensorError, match="not a subspace coordinate key"):
            split_key(bad)
    with pytest.raises(TensorError, match="rank >= 1"):
        projection(1, Q, 0, 12)


def test_rebuild_sums_every_seed_of_a_module():
    b1, b2, b3 = torch.randn(6, 4), torch.randn(6, 4), torch.randn(6, 4)
    dense = rebuild({coordinate_key(Q, 1): b1, coordinate_key(Q, 2): b2, coordinate_key(V, 1): b3}, D_IN.__getitem__)
    assert torch.allclose(dense[Q], b1 @ projection(1, Q, 4, 12) + b2 @ projection(2, Q, 4, 12))
    assert torch.allclose(dense[V], b3 @ projection(1, V, 4, 12))


def test_fedavg_of_coordinates_is_the_weighted_mean_of_the_rebuilt_updates():
    seeds = round_seeds(0, 0, 3)
    clients = [(n, {coordinate_key(m, s): torch.randn(6, 4) for m in (Q, V) for s in seeds}) for n in (10, 30, 60)]
    history = {coordinate_key(Q, 99): torch.randn(6, 4)}  # an earlier round's coordinates stay
    new = FedAvg().aggregate(history, iter(clients))
    assert torch.equal(new[coordinate_key(Q, 99)], history[coordinate_key(Q, 99)])
    rebuilt = rebuild({k: v for k, v in new.items() if k != coordinate_key(Q, 99)}, D_IN.__getitem__)
    total = sum(n for n, _ in clients)
    for module in (Q, V):
        expected = sum(n / total * rebuild(delta, D_IN.__getitem__)[module] for n, delta in clients)
        assert torch.allclose(rebuilt[module], expected, atol=1e-5)


def test_as_lora_is_the_same_update_with_unit_scaling_and_zeros_for_seeds_a_module_lacks():
    coords = {coordinate_key(Q, 1): torch.randn(6, 4), coordinate_key(Q, 2): torch.randn(6, 4), coordinate_key(V, 2): torch.randn(6, 4)}
    state, settings = as_lora(coords, D_IN.__getitem__, ("q_proj", "v_proj"))
    assert settings.rank == 8 and settings.scaling == 1.0 and settings.target_modules == ("q_proj", "v_proj")
    dense = rebuild(coords, D_IN.__getitem__)
    for module in (Q, V):
        a, b = state[f"{module}.lora_A.weight"], state[f"{module}.lora_B.weight"]
        assert a.shape == (8, 12) and b.shape == (6, 8)
        assert torch.allclose(settings.scaling * b @ a, dense[module], atol=1e-5)
    with pytest.raises(TensorError, match="different ranks"):
        as_lora({coordinate_key(Q, 1): torch.zeros(6, 4), coordinate_key(V, 1): torch.zeros(6, 2)}, D_IN.__getitem__, ("q_proj",))
    with pytest.raises(TensorError, match="no subspace coordinates"):
        as_lora({}, D_IN.__getitem__, ("q_proj",))
