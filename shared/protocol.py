"""Message types of fedsoda's wire protocol.

Every MQTT payload is one msgpack envelope (:class:`Envelope`) whose ``body`` maps one to
one onto exactly one of the frozen dataclasses below; :data:`BODY_TYPES` says which. The
field names are the wire names: renaming one is a protocol change (bump
:data:`PROTOCOL_VERSION`), adding one with a default is a minor change that older peers
tolerate (they drop unknown fields with a warning).

Encoding and validation live in :mod:`shared.codec`; topics in :mod:`shared.topics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from shared.errors import TensorError
from shared.tasks import TaskSpec

PROTOCOL_VERSION = "1.3"
"""``major.minor``: a peer refuses a newer major; a newer minor only adds optional fields.
1.1: the schedule carries the run's task (:class:`shared.tasks.TaskSpec`); the coordinator
refuses the hello of a 1.0 client, which would format its data without it.
1.2: the training parameters may name FedKRSO subspaces (``subspace_rank``, ``subspace_seeds``);
a FedKRSO run refuses the hello of a 1.1 client, which would train LoRA instead.
1.3: the coordinator signs every envelope it publishes (an optional ``signature`` header
field, first in the map; :mod:`shared.signing`) and clients refuse what its pinned key did
not sign; clients sign theirs with keys of their own, whose public half the hello carries
(``public_key``), and the coordinator refuses what a pinned client key did not sign; a 1.2
peer drops the field with a warning, and unsigned messages omit it. An update names the
global adapter it started from (``base_round``, ``base_digest``), and the coordinator refuses
one that names another (a replay); it refuses the hello of a client older than 1.3."""

MAX_ROUND = 1_000_000
"""No run has more rounds (the coordinator's config refuses more): a client refuses a schedule
or adapter beyond it before holding it."""

PROTOCOL_MAJOR = int(PROTOCOL_VERSION.split(".")[0])
"""The major version, which topics carry as ``v{major}``."""

COORDINATOR_ID = "coordinator"
"""The coordinator's identity on the wire: the ``sender`` of everything it publishes, its MQTT
client id, and its broker user name (a mosquitto started by ``serve`` forces client id = user)."""

MAX_MESSAGE_BYTES = 256 * 1024 * 1024 - 1
"""MQTT's hard cap on one packet (the remaining-length field tops out just under 256 MiB)."""

TENSOR_DTYPES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "int8": 1,
    "uint8": 1,
    "int32": 4,
    "int64": 8,
    "bool": 1,
}
"""Allow-list of tensor dtypes on the wire, mapped to their item size in bytes."""


class MessageType(StrEnum):
    """The ``type`` field of an envelope; each value names one body dataclass."""

    HELLO = "hello"
    ASSIGNMENT = "assignment"
    SCHEDULE = "schedule"
    MANIFEST = "manifest"
    CHUNK_REQUEST = "chunk_request"
    CHUNK = "chunk"
    GLOBAL_ADAPTER = "global_adapter"
    UPDATE = "update"
    PRESENCE = "presence"
    NACK = "nack"


@dataclass(frozen=True)
class DeviceProfile:
    """What a client reports about its hardware (filled in by ``hardware_profiles.detect``).

    Attributes:
        name: Host or device name.
        device_class: Catalog class name (e.g. ``"jetson-orin-nano-8gb"``) or ``"unknown"``.
        accelerator: ``"cpu"`` or ``"cuda"``.
        total_memory_bytes: System RAM.
        available_memory_bytes: System RAM free for us now.
        unified_memory: True where CPU and GPU share one memory (Jetson).
        gpu_name: CUDA device name, ``""`` without one.
        gpu_total_memory_bytes: GPU memory, 0 without a GPU.
        gpu_free_memory_bytes: Free GPU memory, 0 without a GPU.
        compute_capability: e.g. ``"8.7"``, ``""`` without a GPU.
        cpu_count: Logical CPUs.
        supports_4bit: Whether bitsandbytes 4-bit layers run here.
        is_jetson: Whether this is an NVIDIA Jetson board.
    """

    name: str
    device_class: str
    accelerator: Literal["cpu", "cuda"]
    total_memory_bytes: int
    available_memory_bytes: int
    unified_memory: bool
    gpu_name: str
    gpu_total_memory_bytes: int
    gpu_free_memory_bytes: int
    compute_capability: str
    cpu_count: int
    supports_4bit: bool
    is_jetson: bool


@dataclass(frozen=True)
class Hello:
    """A client announces itself (topic ``hello/{client}``).

    Attributes:
        client_id: The client's stable id (also its MQTT client id and topic segment).
        profile: Its hardware.
        num_examples: Size of its local training set (FedAvg weight).
        software_version: fedsoda version string of the client.
        public_key: The client's Ed25519 public key, ``ed25519:<base64>`` (1.3; "" from older
            clients): the hello is signed by it, and once the coordinator pins it (at the first
            accepted hello, or from the credentials registry) everything the client sends must be.
    """

    client_id: str
    profile: DeviceProfile
    num_examples: int
    software_version: str
    public_key: str = ""


@dataclass(frozen=True)
class Assignment:
    """The coordinator's answer to a Hello (topic ``assign/{client}``).

    Attributes:
        client_id: Whom this answers.
        accepted: False when no tier fits the device.
        tier: Sub-LLM tier name, ``""`` if refused.
        reason: Human-readable why (always set when refused).
        plan: The planner's plan in plain types: keep_layers, precision, lora_rank,
            batch_size, seq_len, grad_checkpointing, estimate_bytes, budget_bytes.
    """

    client_id: str
    accepted: bool
    tier: str
    reason: str
    plan: dict[str, Any]


@dataclass(frozen=True)
class TrainingParams:
    """Local training hyper-parameters for one round.

    Attributes:
        local_steps: Optimizer steps per round.
        learning_rate: LoRA learning rate.
        batch_size: Examples per step.
        seq_len: Tokens per example (truncation length).
        lora_rank: LoRA rank r.
        lora_alpha: LoRA alpha.
        lora_dropout: LoRA dropout.
        target_modules: Module names LoRA wraps (e.g. ``["q_proj", "v_proj"]``).
        mu: Proximal term weight (FedProx); 0 disables it.
        seed: Seed for the client's data order and adapter init.
        objective: ``answer``: causal-LM loss on the answer tokens (any task). ``label_words``:
            classification only, cross-entropy over the label words' first-token logits at
            the answer position, the very scores evaluation compares; no step is spent
            teaching the model to emit *some* label word.
        subspace_rank: FedKRSO's r (0 for LoRA methods); set by the coordinator each round.
        subspace_seeds: FedKRSO's seeds of this round; set by the coordinator each round.
        dp_clip_norm: DP-FedAvg: the client clips its whole delta to this L2 norm before adding
            noise; 0 disables differential privacy.
        dp_noise_multiplier: DP-FedAvg's z: each of the round's n participants adds Gaussian
            noise of standard deviation ``z * dp_clip_norm / sqrt(n)`` to every coordinate, so
            the sum of the round's updates carries noise ``z * dp_clip_norm``.
    """

    local_steps: int
    learning_rate: float
    batch_size: int
    seq_len: int
    lora_rank: int
    lora_alpha: float
    lora_dropout: float
    target_modules: list[str]
    mu: float
    seed: int
    objective: Literal["answer", "label_words"] = "answer"
    subspace_rank: int = 0
    subspace_seeds: list[int] = field(default_factory=list)
    dp_clip_norm: float = 0.0
    dp_noise_multiplier: float = 0.0


def dp_noise_std(clip_norm: float, noise_multiplier: float, participants: int) -> float:
    """DP-FedAvg's noise per coordinate on each client: ``z C / sqrt(n)``, so the round's n
    updates sum to noise ``z C`` (the client adds it, the coordinator bounds updates by it)."""
    return noise_multiplier * clip_norm / math.sqrt(max(1, participants))


ScheduleStatus = Literal["waiting", "running", "aligning", "finished", "failed"]


@dataclass(frozen=True)
class Schedule:
    """The coordinator's current plan, retained on ``schedule``.

    Attributes:
        round: Current round number (0-based).
        status: Run phase.
        deadline: Unix time by which updates for ``round`` must arrive.
        quorum: Minimum number of updates that closes a round.
        participants: client_id -> tier for this round.
        training: Hyper-parameters for this round.
        manifests: tier -> blob_id of the sub-LLM package clients must hold.
        adapter_round: Round of the global adapter clients must start from.
        task: How clients turn their rows into examples (protocol 1.1); None only from a
            coordinator older than 1.1.
    """

    round: int
    status: ScheduleStatus
    deadline: float
    quorum: int
    participants: dict[str, str]
    training: TrainingParams
    manifests: dict[str, str]
    adapter_round: int
    task: TaskSpec | None = None


@dataclass(frozen=True)
class FileEntry:
    """One file of a blob folder.

    Attributes:
        path: Relative posix path inside the folder.
        size: File size in bytes.
        chunks: sha256 hex of each consecutive ``chunk_size`` piece (the last may be shorter).
    """

    path: str
    size: int
    chunks: list[str]


@dataclass(frozen=True)
class Manifest:
    """A content-addressed folder (a sub-LLM package), retained on ``manifest/{tier}``.

    Attributes:
        blob_id: sha256 hex over the canonical file list (see :func:`shared.manifests.compute_blob_id`).
        name: Human name (e.g. the model id).
        version: Package version; grows with each re-alignment.
        tier: Tier this package serves.
        chunk_size: Bytes per chunk (all but a file's last chunk have this size).
        files: The files, sorted by path.
        meta: Plain-typed metadata (layer_map, layers_prefix, precision, ...).
    """

    blob_id: str
    name: str
    version: int
    tier: str
    chunk_size: int
    files: list[FileEntry]
    meta: dict[str, Any]


@dataclass(frozen=True)
class ChunkRequest:
    """A client asks for chunks it lacks (topic ``chunkreq/{client}``).

    Attributes:
        blob_id: The manifest the chunks belong to.
        hashes: sha256 hex of each wanted chunk.
    """

    blob_id: str
    hashes: list[str]


@dataclass(frozen=True)
class Chunk:
    """One chunk of a blob (topic ``chunk/{client}``).

    Attributes:
        blob_id: The manifest it was requested for.
        hash: sha256 hex of ``data``.
        data: The chunk's bytes.
    """

    blob_id: str
    hash: str
    data: bytes


@dataclass(frozen=True)
class TensorPayload:
    """A tensor as (dtype, shape, raw little-endian bytes); see :mod:`shared.tensors`.

    Construction validates, so an inconsistent payload can neither be built nor decoded.

    Attributes:
        dtype: One of :data:`TENSOR_DTYPES`.
        shape: Dimensions; ``[]`` is a scalar.
        data: ``prod(shape) * itemsize`` bytes, C order.

    Raises:
        TensorError: Unknown dtype, negative dimension, or a byte count that does not match.
    """

    dtype: str
    shape: list[int]
    data: bytes

    def __post_init__(self) -> None:
        itemsize = TENSOR_DTYPES.get(self.dtype)
        if itemsize is None:
            raise TensorError(f"tensor dtype {self.dtype!r} is not allowed; allowed: {', '.join(TENSOR_DTYPES)}")
        if any(d < 0 for d in self.shape):
            raise TensorError(f"tensor shape {self.shape} has a negative dimension")
        expected = math.prod(self.shape) * itemsize
        if expected != len(self.data):
            raise TensorError(
                f"tensor of dtype {self.dtype} and shape {self.shape} needs {expected} bytes, got {len(self.data)}"
            )


@dataclass(frozen=True)
class GlobalAdapter:
    """The aggregated adapter, retained on ``adapter``.

    Attributes:
        round: The round whose aggregation produced it (-1: the initial adapter).
        tensors: Canonical full-LLM PEFT keys -> tensors (see :mod:`shared.adapters`).
    """

    round: int
    tensors: dict[str, TensorPayload]


@dataclass(frozen=True)
class ResourceReport:
    """What one round of local training cost the client.

    Attributes:
        peak_rss_bytes: Peak resident memory of the client process.
        peak_gpu_bytes: Peak CUDA memory allocated, 0 on CPU.
        wall_seconds: Wall time of the round's local work.
        cpu_seconds: Process CPU time of the round's local work.
        bytes_sent: MQTT payload + topic bytes this client has sent so far in the run (cumulative,
            not per round); bytes_received likewise for what it received.
        bytes_received: See ``bytes_sent``.
        device_class: Catalog class of the device.
    """

    peak_rss_bytes: int
    peak_gpu_bytes: int
    wall_seconds: float
    cpu_seconds: float
    bytes_sent: int
    bytes_received: int
    device_class: str


@dataclass(frozen=True)
class Update:
    """A client's trained adapter delta (topic ``update/{client}``).

    Attributes:
        client_id: Who trained it.
        round: The round it answers.
        num_examples: Examples it trained on (FedAvg weight).
        delta: Canonical full-LLM PEFT keys -> (local - global) tensors.
        metrics: e.g. ``{"loss": 0.71}``.
        resources: What the round cost.
        base_round: Round of the global adapter the client started from (the schedule's
            ``adapter_round``); -1 from clients older than protocol 1.3.
        base_digest: :func:`shared.tensors.payloads_digest` of that adapter, so an update
            re-labelled for a later round (a replay) names an adapter that is not the
            round's and is refused.
    """

    client_id: str
    round: int
    num_examples: int
    delta: dict[str, TensorPayload]
    metrics: dict[str, float]
    resources: ResourceReport
    base_round: int = -1
    base_digest: str = ""


@dataclass(frozen=True)
class Presence:
    """A client's liveness, retained on ``presence/{client}`` and also its Last Will.

    Attributes:
        client_id: Whose presence.
        online: True when it (re)connected, False in the Last Will or on a clean exit.
        reason: e.g. ``"connected"``, ``"connection lost"``, ``"shutdown"``.
    """

    client_id: str
    online: bool
    reason: str


@dataclass(frozen=True)
class Nack:
    """The coordinator refuses a message (topic ``nack/{client}``).

    Attributes:
        client_id: Whose message.
        round: The round concerned (-1 if none).
        ref_message_id: ``message_id`` of the refused envelope.
        code: Machine-readable reason: ``late``, ``nan``, ``shape``, ``norm``, ``not_assigned``,
            ``duplicate``, ``unknown_chunk``, ``bad_message`` ...
        reason: Human-readable explanation.
    """

    client_id: str
    round: int
    ref_message_id: str
    code: str
    reason: str


BODY_TYPES: dict[MessageType, type] = {
    MessageType.HELLO: Hello,
    MessageType.ASSIGNMENT: Assignment,
    MessageType.SCHEDULE: Schedule,
    MessageType.MANIFEST: Manifest,
    MessageType.CHUNK_REQUEST: ChunkRequest,
    MessageType.CHUNK: Chunk,
    MessageType.GLOBAL_ADAPTER: GlobalAdapter,
    MessageType.UPDATE: Update,
    MessageType.PRESENCE: Presence,
    MessageType.NACK: Nack,
}
"""Which body dataclass each message type carries."""

MESSAGE_TYPES: dict[type, MessageType] = {cls: t for t, cls in BODY_TYPES.items()}
"""Inverse of :data:`BODY_TYPES`."""


@dataclass(frozen=True)
class Envelope:
    """One decoded message: header fields plus the typed body.

    Attributes:
        version: ``"major.minor"`` protocol version of the sender.
        type: What ``body`` is.
        run: Run id the message belongs to.
        round: Round number, -1 where none applies.
        sender: Client id, or the coordinator's id.
        message_id: uuid4 hex, unique per message (QoS 1 repeats keep it).
        timestamp: Unix time the sender built the message.
        body: Instance of ``BODY_TYPES[type]``.
    """

    version: str
    type: MessageType
    run: str
    round: int
    sender: str
    message_id: str
    timestamp: float
    body: Any
