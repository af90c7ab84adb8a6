"""Checks of what clients send, before the coordinator acts on any of it.

Mirrors ``edge_client.inbound`` on the other side of the wire: :func:`check_hello` refuses a
hello no real client sends (before the planner computes with its numbers),
:func:`check_chunk_request` refuses package downloads to clients that were never admitted,
and :func:`validate_update` checks an update's tensors.

The server calls :func:`validate_update` for every update the round loop would admit
(``coordinator.run.rounds.admission``). A failure raises :class:`UpdateValidationError`, an
:class:`~shared.errors.UpdateRejectedError` with a machine ``code`` that the server puts in
the Nack and feeds to the round loop as ``UpdateReceived(ok=False, code=..., reason=...)``.
Checks run cheapest first, and tensor bytes are decoded only after every key's dtype and
shape were checked against the expected map, so a forged shape costs nothing to refuse. The
one exception is the base adapter an update names (a replay names an old one): it is checked
last, so a malformed update is refused for its own fault.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from coordinator.run.aggregation.bounds import delta_norms
from shared.errors import FieldTypeError, TensorError, TopicError, UpdateRejectedError
from shared.protocol import Envelope, Hello, Update
from shared.tensors import from_payload
from shared.typed import short_repr

if TYPE_CHECKING:
    from coordinator.run.round_state import ClientRecord

REJECT_CODES: dict[str, str] = {
    "run": "the envelope names another run",
    "sender": "envelope sender, update client_id and topic client id disagree",
    "late": "the update is for a round that is over",
    "round": "the update is for a round that has not started",
    "not_assigned": "the client is not assigned to this round",
    "examples": "num_examples is not a positive int within the cap and what the client declared at hello",
    "base": "the update names another adapter than the one its round started from (a replay)",
    "keys": "the delta is empty or holds keys the client's tier does not have",
    "dtype": "a tensor's dtype is not an allowed floating dtype",
    "shape": "a tensor's shape differs from the global adapter's (or its bytes do not match)",
    "nan": "a tensor holds NaN or Inf",
    "norm": "the L2 norm of the whole delta exceeds the bound (with DP-FedAvg: the clip bound plus the round's noise)",
    "dp_noise": "a DP-FedAvg update without the round's noise: its norm is below what the noise alone gives",
}
"""Every code :class:`UpdateValidationError` can carry, with what it means."""


class UpdateValidationError(UpdateRejectedError):
    """An update failed one validation check.

    Attributes:
        code: Machine code, a key of :data:`REJECT_CODES` (goes into the Nack).
        reason: What was wrong, for the client's log and ours.
    """

    def __init__(self, code: str, reason: str) -> None:
        if code not in REJECT_CODES:
            raise ValueError(f"unknown update rejection code {code!r}")
        super().__init__(f"update rejected ({code}): {reason}")
        self.code = code
        self.reason = reason


@dataclass(frozen=True)
class UpdateLimits:
    """Bounds an update must respect.

    Attributes:
        max_norm: Upper bound (exclusive) on the L2 norm over all delta tensors together;
            ``math.inf`` disables the check. A bound guards the average against one client
            sending a huge (broken or malicious) delta.
        max_examples: Largest plausible ``num_examples`` (a client inflating its count
            would dominate the weighted average).
        allowed_dtypes: Wire dtypes a delta tensor may use.
        dp_clip_norm: DP-FedAvg's clip bound (0: no DP). With it, ``max_norm`` is replaced
            by what a clipped delta plus the round's noise can reach, and an update whose norm
            is below what the noise alone gives is refused (its client added none).
        dp_noise_std: The noise each client adds per coordinate.
    """

    max_norm: float = 1e3
    max_examples: int = 10_000_000
    dp_clip_norm: float = 0.0
    dp_noise_std: float = 0.0
    allowed_dtypes: frozenset[str] = field(
        default_factory=lambda: frozenset({"float32", "float16", "bfloat16"})
    )


@dataclass(frozen=True)
class RoundContext:
    """What an update is checked against.

    Attributes:
        run_id: The coordinator's run id.
        round: The round being collected.
        participants: Assigned clients of that round, client id -> tier.
        expected_shapes: Tier -> adapter key -> shape the client's delta must use (the
            global adapter's keys for the layers that tier holds).
        declared_examples: Client id -> the example count it declared at hello: an update
            claiming more is refused (its weight comes from what it was admitted with).
        base_round: The round of the global adapter this round's schedule named.
        base_digest: :func:`shared.tensors.payloads_digest` of that adapter.
        limits: Norm, example and dtype bounds.
    """

    run_id: str
    round: int
    participants: Mapping[str, str]
    expected_shapes: Mapping[str, Mapping[str, tuple[int, ...]]]
    declared_examples: Mapping[str, int] = field(default_factory=dict)
    base_round: int = 0
    base_digest: str = ""
    limits: UpdateLimits = field(default_factory=UpdateLimits)


@dataclass(frozen=True)
class ValidatedUpdate:
    """An update that passed every check.

    Attributes:
        delta: Key -> tensor in its wire dtype, shaped as expected.
        norm: L2 norm of the whole delta.
        key_norms: L2 norm of each key (the influence bounds clip against them).
    """

    delta: dict[str, torch.Tensor]
    norm: float
    key_norms: dict[str, float]


def shapes_of(state_dict: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    """Key -> shape map of a state dict (e.g. the global adapter restricted to a tier).

    Args:
        state_dict: Adapter tensors.

    Returns:
        The shapes as tuples.
    """
    return {k: tuple(v.shape) for k, v in state_dict.items()}


def validate_update(envelope: Envelope, *, topic_client_id: str, context: RoundContext) -> ValidatedUpdate:
    """Check an update and decode its delta.

    Args:
        envelope: The decoded envelope; ``envelope.body`` must be an
            :class:`~shared.protocol.Update`.
        topic_client_id: The client id segment of the topic it arrived on.
        context: The round it must belong to and the shapes it must have.

    Returns:
        The delta and its norms.

    Raises:
        UpdateValidationError: The first failed check, with its code and reason.
        TypeError: ``envelope.body`` is not an Update (a routing bug in the caller).
    """
    update = envelope.body
    if not isinstance(update, Update):
        raise TypeError(f"expected an Update body, got {type(update).__name__}")
    _check_header(envelope, update, topic_client_id, context)
    tier = context.participants[update.client_id]
    expected = context.expected_shapes.get(tier)
    if expected is None:
        raise UpdateValidationError("keys", f"no adapter shapes are known for tier {tier!r}")
    _check_declared_tensors(update, expected, context.limits)
    delta = _decode(update)
    norm, key_norms = _check_values(delta, context.limits)
    # Last, though cheap: a replay is otherwise a sound update of the right client, and a
    # malformed one is refused for what is wrong with it, whatever adapter it names.
    _check_base(update, context)
    return ValidatedUpdate(delta, norm, key_norms)


def _check_base(update: Update, ctx: RoundContext) -> None:
    if (update.base_round, update.base_digest) != (ctx.base_round, ctx.base_digest):
        raise UpdateValidationError(
            "base",
            f"the update starts from the adapter of round {update.base_round} ({update.base_digest[:12] or 'no digest'}); "
            f"round {ctx.round} started from round {ctx.base_round}'s ({ctx.base_digest[:12]})",
        )


def _check_header(envelope: Envelope, update: Update, topic_client_id: str, ctx: RoundContext) -> None:
    if envelope.run != ctx.run_id:
        raise UpdateValidationError("run", f"envelope run {envelope.run!r} is not {ctx.run_id!r}")
    if not (envelope.sender == update.client_id == topic_client_id):
        raise UpdateValidationError(
            "sender",
            f"topic client {topic_client_id!r}, envelope sender {envelope.sender!r} and "
            f"update client_id {update.client_id!r} must be the same",
        )
    if update.round != envelope.round:
        raise UpdateValidationError(
            "round", f"envelope round {envelope.round} differs from update round {update.round}"
        )
    if update.round < ctx.round:
        raise UpdateValidationError("late", f"round {update.round} is over (current round {ctx.round})")
    if update.round > ctx.round:
        raise UpdateValidationError(
            "round", f"round {update.round} has not started (current round {ctx.round})"
        )
    if update.client_id not in ctx.participants:
        raise UpdateValidationError("not_assigned", f"{update.client_id} is not assigned to round {ctx.round}")
    n = update.num_examples
    if isinstance(n, bool) or not isinstance(n, int) or not 0 < n <= ctx.limits.max_examples:
        raise UpdateValidationError(
            "examples", f"num_examples={n!r}; it must be an int in 1..{ctx.limits.max_examples}"
        )
    declared = ctx.declared_examples.get(update.client_id)
    if declared is not None and n > declared:
        raise UpdateValidationError(
            "examples", f"num_examples={n} is more than the {declared} {update.client_id} declared at hello"
        )


def _check_declared_tensors(
    update: Update, expected: Mapping[str, tuple[int, ...]], limits: UpdateLimits
) -> None:
    if not update.delta:
        raise UpdateValidationError("keys", "the delta holds no tensors")
    unknown = sorted(set(update.delta) - set(expected))
    if unknown:
        more = f" (+{len(unknown) - 3} more)" if len(unknown) > 3 else ""
        raise UpdateValidationError(
            "keys", f"{len(unknown)} key(s) not in the tier's adapter: {', '.join(unknown[:3])}{more}"
        )
    for key, payload in update.delta.items():
        if payload.dtype not in limits.allowed_dtypes:
            raise UpdateValidationError(
                "dtype", f"{key} has dtype {payload.dtype}; allowed: {', '.join(sorted(limits.allowed_dtypes))}"
            )
        if tuple(payload.shape) != tuple(expected[key]):
            raise UpdateValidationError(
                "shape", f"{key} has shape {tuple(payload.shape)}, expected {tuple(expected[key])}"
            )


def _decode(update: Update) -> dict[str, torch.Tensor]:
    delta: dict[str, torch.Tensor] = {}
    for key, payload in update.delta.items():
        try:
            delta[key] = from_payload(payload)
        except TensorError as exc:
            raise UpdateValidationError("shape", f"{key}: {exc}") from exc
    return delta


def _check_values(delta: Mapping[str, torch.Tensor], limits: UpdateLimits) -> tuple[float, dict[str, float]]:
    for key, tensor in delta.items():
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            raise UpdateValidationError("nan", f"{key} holds {int((~finite).sum())} NaN/Inf value(s)")
    norm, key_norms = delta_norms(delta)
    if limits.dp_clip_norm > 0:
        _check_dp_norm(norm, sum(t.numel() for t in delta.values()), limits)
    elif not norm < limits.max_norm:
        raise UpdateValidationError(
            "norm", f"delta L2 norm {norm:.4g} is not below the bound {limits.max_norm:.4g}"
        )
    return norm, key_norms


#: Slack on the noise's norm ``std * sqrt(d)``: it concentrates within about ``1 / sqrt(2 d)``
#: of it, so 10% is over four standard deviations for any adapter of 1,000 numbers or more.
DP_NORM_SLACK = 0.1


def _check_dp_norm(norm: float, numel: int, limits: UpdateLimits) -> None:
    """A DP-FedAvg update is a delta clipped to the bound plus the round's Gaussian noise."""
    noise = limits.dp_noise_std * math.sqrt(numel)
    high = limits.dp_clip_norm + (1 + DP_NORM_SLACK) * noise
    if not norm <= high:
        raise UpdateValidationError(
            "norm", f"delta L2 norm {norm:.4g} is above the clip bound {limits.dp_clip_norm:g} plus the round's noise ({noise:.4g})"
        )
    low = (1 - DP_NORM_SLACK) * noise
    if norm < low:
        raise UpdateValidationError(
            "dp_noise", f"delta L2 norm {norm:.4g} is below {low:.4g}, what the round's noise alone gives over {numel} numbers"
        )


# --------------------------------------------------------------------------- hellos

MAX_MEMORY_BYTES = 1 << 56
"""Largest memory size a hello may report (64 PiB): beyond it the numbers are not a device's."""

_COMPUTE_CAPABILITY_RE = re.compile(r"\d{1,2}\.\d{1,2}", re.ASCII)
_MAX_NAME_CHARS = 256


def check_hello(hello: Hello, topic_client: str | None, *, max_examples: int) -> None:
    """Refuse a hello no real client sends, before the planner computes with its numbers.

    Args:
        hello: The decoded hello.
        topic_client: The client id segment of its topic.
        max_examples: Largest example count a client may claim.

    Raises:
        TopicError: The hello names another client than its topic.
        FieldTypeError: A count, memory size, compute capability or name no device has.
    """
    if hello.client_id != topic_client:
        raise TopicError(f"hello on the topic of {topic_client!r} names client {short_repr(hello.client_id)}")
    if not 0 < hello.num_examples <= max_examples:
        raise FieldTypeError(f"hello num_examples={hello.num_examples}; it must be in 1..{max_examples}")
    profile = hello.profile
    for name in ("total_memory_bytes", "available_memory_bytes", "gpu_total_memory_bytes", "gpu_free_memory_bytes"):
        value = getattr(profile, name)
        if not 0 <= value <= MAX_MEMORY_BYTES:
            raise FieldTypeError(f"hello profile.{name}={value} is not a memory size (0..{MAX_MEMORY_BYTES})")
    if not 0 <= profile.cpu_count <= 1 << 20:
        raise FieldTypeError(f"hello profile.cpu_count={profile.cpu_count} is not a CPU count")
    if profile.compute_capability and not _COMPUTE_CAPABILITY_RE.fullmatch(profile.compute_capability):
        raise FieldTypeError(
            f"hello profile.compute_capability={short_repr(profile.compute_capability)} is not 'major.minor'"
        )
    for name in ("name", "device_class", "gpu_name"):
        if len(getattr(profile, name)) > _MAX_NAME_CHARS:
            raise FieldTypeError(f"hello profile.{name} is longer than {_MAX_NAME_CHARS} characters")
    if len(hello.software_version) > _MAX_NAME_CHARS:
        raise FieldTypeError(f"hello software_version is longer than {_MAX_NAME_CHARS} characters")


#: The oldest protocol a client may speak: 1.3 clients format their rows with the schedule's task
#: (1.1), train the FedKRSO subspaces it names (1.2), verify the coordinator's signature and bind
#: each update to the adapter it started from (1.3).
MIN_CLIENT_PROTOCOL = (1, 3)


def client_too_old(envelope_version: str) -> str | None:
    """Why a client speaking ``envelope_version`` cannot take part (None if it can).

    An older client would do one of: format its rows with its own label words (1.0), train
    LoRA where the run asks for subspace coordinates (1.1), or send updates that name no
    base adapter, which the coordinator cannot tell from a replay (1.2). Each is refused at
    hello with the reason (it prints it and exits) rather than admitted.
    """
    major, minor = (int(x) for x in envelope_version.split("."))  # the codec checked the form
    if (major, minor) >= MIN_CLIENT_PROTOCOL:
        return None
    wanted = ".".join(map(str, MIN_CLIENT_PROTOCOL))
    return (
        f"this client speaks protocol {envelope_version}; this coordinator binds every update to the adapter it "
        f"started from, which needs protocol {wanted} or newer: upgrade fedsoda on the client"
    )


# --------------------------------------------------------------------------- chunk requests


@dataclass(frozen=True)
class ChunkRequestRefusal:
    """Why a chunk request is not served.

    Attributes:
        code: The Nack code (and the refusal counter's key).
        detail: What was wrong, for our log.
        advice: What the client should do, for its Nack.
    """

    code: str
    detail: str
    advice: str


def check_chunk_request(client: ClientRecord | None, client_id: str) -> ChunkRequestRefusal | None:
    """Packages go to admitted clients only, so a stranger cannot make us stream them.

    Args:
        client: The round machine's record of the requesting client (None if it never said hello).
        client_id: The client id of the request's topic.

    Returns:
        None to serve the request, else the refusal.
    """
    if client is None or not client.accepted:
        return ChunkRequestRefusal("not_admitted", f"{client_id} was never admitted to this run", "say hello and be admitted first")
    return None
