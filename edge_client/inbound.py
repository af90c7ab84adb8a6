"""Checks of what the coordinator sends, before the edge client acts on any of it.

The codec already guarantees every field's type; these checks refuse values that are
well-typed but would crash or poison the client later (a zero step count, a NaN adapter, a
manifest path outside the cache folder), so a bad message is refused where it arrives, with
its reason, and the client keeps the good state it had.

Where a message stands against what the client holds (an older round after a newer one, a
round the current schedule does not allow yet, an admission that changes) is decided by the
``*_refusal`` functions below, cheapest check first, each answering None or a
:class:`Refusal` whose reason is a key of :data:`REFUSALS`. A refused message never replaces
what the client holds, so the "latest seen" markers (schedule round, adapter round, manifest
version) only ever move on a message that passed: a forged round 10**9 cannot make the next
real message look stale.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from edge_client.subspace import subspace_params_problem
from shared import topics
from shared.adapters import PEFT_PREFIX
from shared.errors import FieldTypeError, TensorError, TopicError
from shared.manifests import validate_manifest
from shared.protocol import (
    MAX_ROUND,
    Assignment,
    GlobalAdapter,
    Manifest,
    Nack,
    Schedule,
    TrainingParams,
)
from shared.subspace import MARKER, is_coordinate_key
from shared.tensors import from_payload
from shared.typed import short_repr

ADAPTER_DTYPES = frozenset({"float32", "float16", "bfloat16"})
"""Wire dtypes a global adapter's tensors may use."""

MAX_ROUND_JUMP = 1_000
"""A schedule may be at most this many rounds ahead of the one the client holds (a client that
was away misses rounds; none misses a thousand)."""

REFUSALS: dict[str, str] = {
    "stale": "older than what the client holds (a QoS 1 repeat, an out-of-order copy)",
    "implausible_round": "a round the current schedule does not allow (ahead of it, or a jump no run makes)",
    "assignment_changed": "contradicts the admission the client already holds (admission is settled once per join)",
}
"""Why a well-formed message is refused against the client's state; the key is the ``refused`` counter."""

_BLOB_ID_RE = re.compile(r"[0-9a-f]{64}")
_MODULE_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_.]{0,127}")
_ADAPTER_KEY_RE = re.compile(re.escape(PEFT_PREFIX) + r"[A-Za-z0-9_.]+\.lora_[AB]\.weight")


def _bounded(what: str, value: float, low: float, high: float, *, low_open: bool = False) -> None:
    ok = math.isfinite(value) and (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise FieldTypeError(f"{what}={value!r} is outside {bracket}{low:g}, {high:g}]")


def check_training(training: TrainingParams) -> None:
    """Refuse hyper-parameters local training cannot run with.

    Args:
        training: A schedule's training parameters.

    Raises:
        FieldTypeError: The first value out of range, named.
    """
    _bounded("training.local_steps", training.local_steps, 1, 1_000_000)
    _bounded("training.learning_rate", training.learning_rate, 0.0, 10.0, low_open=True)
    _bounded("training.batch_size", training.batch_size, 1, 65_536)
    _bounded("training.seq_len", training.seq_len, 1, 1 << 20)
    _bounded("training.lora_rank", training.lora_rank, 1, 65_536)
    _bounded("training.lora_alpha", training.lora_alpha, 0.0, 1e6, low_open=True)
    if not (math.isfinite(training.lora_dropout) and 0.0 <= training.lora_dropout < 1.0):
        raise FieldTypeError(f"training.lora_dropout={training.lora_dropout!r} is outside [0, 1)")
    _bounded("training.mu", training.mu, 0.0, 1e6)
    _bounded("training.seed", training.seed, 0, 2**63 - 1)
    _bounded("training.dp_clip_norm", training.dp_clip_norm, 0.0, 1e6)
    _bounded("training.dp_noise_multiplier", training.dp_noise_multiplier, 0.0, 1e3)
    if not training.target_modules or not all(_MODULE_RE.fullmatch(m) for m in training.target_modules):
        raise FieldTypeError(
            f"training.target_modules={short_repr(training.target_modules)} must be a non-empty list of module names"
        )
    problem = subspace_params_problem(training)
    if problem is not None:
        raise FieldTypeError(f"training.subspace_rank/subspace_seeds: {problem}")


def check_schedule(schedule: Schedule) -> None:
    """Refuse a schedule the client could not follow.

    Args:
        schedule: A decoded schedule.

    Raises:
        FieldTypeError: A negative round, a non-finite deadline, bad training parameters,
            or a tier or blob id that is not one.
        TopicError: A participant or tier id that is not a valid topic segment.
    """
    if schedule.round < 0 or schedule.adapter_round < -1 or schedule.quorum < 0:
        raise FieldTypeError(
            f"schedule round={schedule.round}, adapter_round={schedule.adapter_round}, quorum={schedule.quorum}: "
            "none may be negative (adapter_round -1 at the least)"
        )
    if not math.isfinite(schedule.deadline):
        raise FieldTypeError(f"schedule deadline={schedule.deadline!r} is not a time")
    check_training(schedule.training)
    for client, tier in schedule.participants.items():
        topics.check_id(client, "participant id")
        topics.check_id(tier, "tier")
    for tier, blob_id in schedule.manifests.items():
        topics.check_id(tier, "tier")
        if not _BLOB_ID_RE.fullmatch(blob_id):
            raise FieldTypeError(f"schedule manifests[{tier!r}]={short_repr(blob_id)} is not a sha256 hex blob id")


def check_manifest(manifest: Manifest, topic_tier: str | None) -> None:
    """Refuse a manifest whose files could land outside the cache folder, or that is inconsistent.

    Args:
        manifest: A decoded manifest.
        topic_tier: The tier segment of the topic it arrived on.

    Raises:
        TopicError: It describes another tier than its topic names.
        UnsafePathError: A path (or the blob id, which names its folder) could escape.
        BlobError: Chunk sizes, counts or hashes that do not add up, or a blob id that does
            not match the file list.
        FieldTypeError: Its meta lacks the model config the memory preflight needs.
    """
    if manifest.tier != topic_tier:
        raise TopicError(f"manifest of tier {short_repr(manifest.tier)} arrived on the topic of tier {topic_tier!r}")
    validate_manifest(manifest)
    if not isinstance(manifest.meta.get("model_config"), dict):
        raise FieldTypeError("manifest meta has no model_config map (the memory preflight needs it)")


def check_adapter(adapter: GlobalAdapter) -> None:
    """Refuse a global adapter that would poison or crash local training.

    Args:
        adapter: A decoded global adapter.

    Raises:
        FieldTypeError: A round below -1.
        TensorError: A key that is neither a LoRA weight nor FedKRSO subspace coordinates, a
            non-float dtype, or a NaN/Inf value.
    """
    if adapter.round < -1:
        raise FieldTypeError(f"global adapter round={adapter.round} is below -1")
    for key, payload in adapter.tensors.items():
        if not (_ADAPTER_KEY_RE.fullmatch(key) or is_coordinate_key(key)):
            raise TensorError(
                f"global adapter key {short_repr(key)} is not a LoRA weight key ({PEFT_PREFIX}...lora_A/B.weight) "
                f"nor a subspace coordinate key ({PEFT_PREFIX}...{MARKER}<seed>)"
            )
        if payload.dtype not in ADAPTER_DTYPES:
            raise TensorError(f"global adapter tensor {key} has dtype {payload.dtype}; allowed: {', '.join(sorted(ADAPTER_DTYPES))}")
        if not bool(torch.isfinite(from_payload(payload)).all()):
            raise TensorError(f"global adapter tensor {key} holds NaN or Inf")


def check_addressed_to(body: Assignment | Nack, client_id: str) -> None:
    """Refuse an assignment or nack that names another client than this one.

    Args:
        body: The decoded body.
        client_id: This client's id.

    Raises:
        TopicError: It names someone else.
        FieldTypeError: An accepted assignment without a valid tier.
    """
    if body.client_id != client_id:
        raise TopicError(f"{type(body).__name__.lower()} for {short_repr(body.client_id)} arrived on the topic of {client_id!r}")
    if isinstance(body, Assignment) and body.accepted:
        try:
            topics.check_id(body.tier, "tier")
        except TopicError as exc:
            raise FieldTypeError(f"accepted assignment without a valid tier: {exc}") from None


@dataclass(frozen=True)
class Refusal:
    """Why a message is refused against what the client holds.

    Attributes:
        reason: A key of :data:`REFUSALS` (the refusal counter).
        detail: The numbers, for the log.
    """

    reason: str
    detail: str

    def __post_init__(self) -> None:
        if self.reason not in REFUSALS:
            raise ValueError(f"refusal reason {self.reason!r} is not in REFUSALS")


def schedule_refusal(new: Schedule, held: Schedule | None) -> Refusal | None:
    """Whether a checked schedule may replace the one held.

    Args:
        new: The schedule that arrived (passed :func:`check_schedule`).
        held: The schedule the client holds, if any.

    Returns:
        None to take it, else the refusal (the held schedule stays).
    """
    if new.round > MAX_ROUND or new.adapter_round > new.round:
        # A schedule starts from an adapter of an earlier round (or, once finished, of its own).
        return Refusal("implausible_round", f"schedule of round {new.round} from adapter round {new.adapter_round}")
    if held is None:
        return None
    if new.round < held.round:
        return Refusal("stale", f"schedule of round {new.round} after one of round {held.round}")
    if new.round > held.round + MAX_ROUND_JUMP:
        return Refusal("implausible_round", f"schedule of round {new.round} right after round {held.round}")
    return None


def adapter_refusal(new: GlobalAdapter, held: GlobalAdapter | None, schedule: Schedule | None) -> Refusal | None:
    """Whether a checked global adapter may replace the one held.

    The coordinator publishes round r's adapter before the schedule of round r + 1, so an
    adapter is never of a later round than the schedule the client holds.

    Args:
        new: The adapter that arrived (passed :func:`check_adapter`).
        held: The adapter the client holds, if any.
        schedule: The schedule the client holds, if any (without one, only :data:`MAX_ROUND` bounds it).

    Returns:
        None to take it, else the refusal (the held adapter stays).
    """
    if new.round > MAX_ROUND:
        return Refusal("implausible_round", f"global adapter of round {new.round}")
    if schedule is not None and new.round > schedule.round:
        return Refusal("implausible_round", f"global adapter of round {new.round} while the schedule is at round {schedule.round}")
    if held is not None and new.round < held.round:
        return Refusal("stale", f"global adapter of round {new.round} after one of round {held.round}")
    return None


def manifest_refusal(new: Manifest, held: Manifest | None, schedule: Schedule | None) -> Refusal | None:
    """Whether a checked manifest may replace the one held for its tier.

    The package the current schedule names is always taken, whatever version the held one
    claims: a forged high version cannot block the real package.

    Args:
        new: The manifest that arrived (passed :func:`check_manifest`).
        held: The manifest the client holds for that tier, if any.
        schedule: The schedule the client holds, if any.

    Returns:
        None to take it, else the refusal (the held manifest stays).
    """
    if schedule is not None and schedule.manifests.get(new.tier) == new.blob_id:
        return None
    if held is not None and new.version < held.version:
        return Refusal("stale", f"manifest v{new.version} of tier {new.tier} after v{held.version}")
    return None


def assignment_refusal(new: Assignment, held: Assignment | None) -> Refusal | None:
    """Whether a checked assignment may replace the one held.

    The coordinator answers each hello the same way, and the client stops saying hello once
    admitted, so an admitted client takes only repeats of its admission: a later refusal or
    another tier is not the coordinator's.

    Args:
        new: The assignment that arrived (passed :func:`check_addressed_to`).
        held: The assignment the client holds, if any.

    Returns:
        None to take it, else the refusal (the held assignment stays).
    """
    if held is None or not held.accepted or new == held:
        return None
    said = f"tier {new.tier}" if new.accepted else f"refused ({short_repr(new.reason)})"
    return Refusal("assignment_changed", f"assignment {said} after admission to tier {held.tier}")
