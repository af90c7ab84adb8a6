"""Update validation: every rejection code, on envelopes that went through the real codec."""

from __future__ import annotations

import math

import pytest
import torch

from coordinator.run.inbound import (
    REJECT_CODES,
    RoundContext,
    UpdateLimits,
    UpdateValidationError,
    client_too_old,
    shapes_of,
    validate_update,
)
from shared.codec import decode, encode
from shared.errors import UpdateRejectedError
from shared.protocol import Envelope, MessageType, ResourceReport, Update
from shared.tensors import payloads_digest, state_to_payloads, to_payload

A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
A5 = "base_model.model.model.layers.5.self_attn.q_proj.lora_A.weight"

GLOBAL = {A0: torch.zeros(4, 16), B0: torch.zeros(16, 4), A5: torch.zeros(4, 16)}
BASE_DIGEST = payloads_digest(state_to_payloads(GLOBAL))  # round 3 started from round 2's adapter
SMALL = shapes_of({k: v for k, v in GLOBAL.items() if k != A5})  # the small tier lacks layer 5


def context(**kw: object) -> RoundContext:
    base: dict[str, object] = {
        "run_id": "run1",
        "round": 3,
        "participants": {"alice": "small", "bob": "big"},
        "expected_shapes": {"small": SMALL, "big": shapes_of(GLOBAL)},
        "base_round": 2,
        "base_digest": BASE_DIGEST,
        "limits": UpdateLimits(max_norm=100.0, max_examples=1000),
    }
    base.update(kw)
    return RoundContext(**base)  # type: ignore[arg-type]


def good_delta(scale: float = 0.01) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {A0: torch.randn(4, 16, generator=g) * scale, B0: torch.randn(16, 4, generator=g) * scale}


def envelope(
    delta: dict[str, torch.Tensor] | None = None,
    *,
    client: str = "alice",
    sender: str | None = None,
    run: str = "run1",
    round_: int = 3,
    body_round: int | None = None,
    n: int = 50,
    base: tuple[int, str] = (2, BASE_DIGEST),
) -> Envelope:
    body = Update(
        client_id=client,
        round=round_ if body_round is None else body_round,
        num_examples=n,
        delta={k: to_payload(v) for k, v in (good_delta() if delta is None else delta).items()},
        metrics={"loss": 1.25},
        base_round=base[0],
        base_digest=base[1],
        resources=ResourceReport(
            peak_rss_bytes=1, peak_gpu_bytes=0, wall_seconds=1.0, cpu_seconds=1.0,
            bytes_sent=0, bytes_received=0, device_class="unknown",
        ),
    )
    data = encode(MessageType.UPDATE, body, run=run, round=round_, sender=sender or client)
    return decode(data)


def rejected(env: Envelope, topic_client: str = "alice", **ctx: object) -> UpdateValidationError:
    with pytest.raises(UpdateValidationError) as err:
        validate_update(env, topic_client_id=topic_client, context=context(**ctx))
    assert isinstance(err.value, UpdateRejectedError)
    assert err.value.code in REJECT_CODES
    assert err.value.reason and err.value.code in str(err.value)
    return err.value


def test_valid_update_is_decoded_exactly() -> None:
    sent = good_delta()
    sent[B0] = sent[B0].to(torch.bfloat16)
    got = validate_update(envelope(sent), topic_client_id="alice", context=context())
    assert set(got.delta) == {A0, B0}
    for k in sent:
        assert got.delta[k].dtype == sent[k].dtype and torch.equal(got.delta[k], sent[k])
    # The norms the influence bounds clip against come with it, per key and overall.
    for k in sent:
        assert got.key_norms[k] == pytest.approx(float(sent[k].double().norm()))
    assert got.norm == pytest.approx(math.sqrt(sum(v * v for v in got.key_norms.values())))


def test_a_tier_may_send_a_subset_of_its_keys() -> None:
    env = envelope({A5: torch.ones(4, 16) * 0.1}, client="bob")
    got = validate_update(env, topic_client_id="bob", context=context())
    assert set(got.delta) == {A5}


def test_wrong_run() -> None:
    err = rejected(envelope(run="other-run"))
    assert err.code == "run" and "'other-run'" in err.reason


@pytest.mark.parametrize(
    ("client", "sender", "topic"),
    [("alice", "alice", "bob"), ("alice", "bob", "alice"), ("bob", "alice", "alice")],
)
def test_sender_must_match_topic_and_body(client: str, sender: str, topic: str) -> None:
    assert rejected(envelope(client=client, sender=sender), topic_client=topic).code == "sender"


def test_late_and_future_rounds() -> None:
    err = rejected(envelope(round_=2))
    assert err.code == "late" and "current round 3" in err.reason
    assert rejected(envelope(round_=4)).code == "round"
    assert rejected(envelope(round_=3, body_round=2)).code == "round"


def test_not_assigned() -> None:
    err = rejected(envelope(client="mallory"), topic_client="mallory")
    assert err.code == "not_assigned" and "mallory" in err.reason


@pytest.mark.parametrize("n", [0, -5, 1001])
def test_example_count_bounds(n: int) -> None:
    err = rejected(envelope(n=n))
    assert err.code == "examples" and "1..1000" in err.reason


def test_an_update_may_not_claim_more_examples_than_its_hello_declared() -> None:
    # Its weight comes from what it was admitted with: 1,000 claimed after a hello of 40 is refused.
    err = rejected(envelope(n=1000), declared_examples={"alice": 40})
    assert err.code == "examples" and "more than the 40 alice declared at hello" in err.reason
    for n in (40, 12):  # as declared, or fewer (it trained on less)
        assert validate_update(envelope(n=n), topic_client_id="alice", context=context(declared_examples={"alice": 40}))


def test_an_update_must_name_the_adapter_its_round_started_from() -> None:
    # A replay: an earlier round's update re-labelled for this round names that round's adapter.
    err = rejected(envelope(base=(1, "0" * 64)))
    assert err.code == "base" and "adapter of round 1" in err.reason and "started from round 2's" in err.reason
    # The right round but another adapter (a forged or stale copy): refused too.
    assert rejected(envelope(base=(2, "0" * 64))).code == "base"
    # A pre-1.3 update names none.
    assert rejected(envelope(base=(-1, ""))).code == "base"


def test_unknown_keys_empty_delta_and_unknown_tier() -> None:
    # Layer 5 exists in the global adapter but not in the small tier's sub-LLM.
    err = rejected(envelope({**good_delta(), A5: torch.zeros(4, 16)}))
    assert err.code == "keys" and "layers.5" in err.reason
    assert rejected(envelope({})).code == "keys"
    err = rejected(envelope(), expected_shapes={"big": shapes_of(GLOBAL)})
    assert err.code == "keys" and "'small'" in err.reason


@pytest.mark.parametrize("dtype", [torch.int32, torch.int8, torch.bool])
def test_non_float_dtypes_are_refused(dtype: torch.dtype) -> None:
    bad = good_delta()
    bad[A0] = torch.zeros(4, 16, dtype=dtype)
    err = rejected(envelope(bad))
    assert err.code == "dtype" and "float32" in err.reason


def test_shape_mismatch() -> None:
    bad = good_delta()
    bad[B0] = torch.zeros(4, 16)  # B transposed
    err = rejected(envelope(bad))
    assert err.code == "shape" and "(4, 16), expected (16, 4)" in err.reason


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_non_finite_values(value: float) -> None:
    bad = good_delta()
    bad[B0][3, 1] = value
    err = rejected(envelope(bad))
    assert err.code == "nan" and B0 in err.reason


def test_half_precision_overflow_counts_as_inf() -> None:
    bad = good_delta()
    bad[A0] = (torch.ones(4, 16) * 70000.0).to(torch.float16)  # inf in float16
    assert rejected(envelope(bad)).code == "nan"


def test_norm_of_the_whole_delta_is_bounded() -> None:
    # Each tensor alone is under the bound, together they are not: the norm is global.
    d = {A0: torch.full((4, 16), 10.0), B0: torch.full((16, 4), 10.0)}  # norm = sqrt(128) * 10
    err = rejected(envelope(d), limits=UpdateLimits(max_norm=100.0))
    assert err.code == "norm" and "113.1" in err.reason
    ok = validate_update(envelope(d), topic_client_id="alice", context=context(limits=UpdateLimits(max_norm=114.0)))
    assert set(ok.delta) == {A0, B0}
    assert validate_update(
        envelope(d), topic_client_id="alice", context=context(limits=UpdateLimits(max_norm=math.inf))
    )


def test_rejection_codes_are_a_closed_set() -> None:
    with pytest.raises(ValueError, match="unknown update rejection code"):
        UpdateValidationError("bogus", "x")
    assert {"late", "nan", "shape", "norm", "not_assigned", "sender", "keys", "examples"} <= set(REJECT_CODES)


def test_body_must_be_an_update() -> None:
    env = envelope()
    with pytest.raises(TypeError, match="expected an Update body"):
        validate_update(
            Envelope(env.version, MessageType.PRESENCE, env.run, env.round, env.sender, env.message_id,
                     env.timestamp, body="x"),
            topic_client_id="alice",
            context=context(),
        )


def test_clients_older_than_protocol_1_3_are_refused_at_hello() -> None:
    # A 1.2 client sends updates naming no base adapter (indistinguishable from a replay).
    assert client_too_old("1.3") is None and client_too_old("1.9") is None
    reason = client_too_old("1.2")
    assert reason is not None and "speaks protocol 1.2" in reason and "needs protocol 1.3" in reason
    assert "upgrade fedsoda on the client" in reason
    assert "speaks protocol 1.0" in (client_too_old("1.0") or "")


def test_a_dp_fedavg_update_must_be_a_clipped_delta_plus_the_rounds_noise() -> None:
    limits = UpdateLimits(max_norm=1.0, max_examples=1000, dp_clip_norm=0.5, dp_noise_std=0.01)
    g = torch.Generator().manual_seed(1)
    noise = {A0: torch.randn(4, 16, generator=g) * 0.01, B0: torch.randn(16, 4, generator=g) * 0.01}
    signal = good_delta(scale=0.05)  # norm ~0.5: at the clip bound
    noisy = {k: signal[k] * (0.5 / math.sqrt(sum(float(v.square().sum()) for v in signal.values()))) + noise[k] for k in signal}
    assert validate_update(envelope(noisy), topic_client_id="alice", context=context(limits=limits))
    # No noise at all: its client did not privatize it.
    err = rejected(envelope(good_delta(scale=0.0001)), limits=limits)
    assert err.code == "dp_noise" and "what the round's noise alone gives over 128 numbers" in err.reason
    # Far above the clip bound plus the noise: not clipped.
    err = rejected(envelope(good_delta(scale=1.0)), limits=limits)
    assert err.code == "norm" and "clip bound 0.5 plus the round's noise" in err.reason
