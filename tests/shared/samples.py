"""One deterministic sample body per message type (for round trips and the golden files)."""

from __future__ import annotations

import dataclasses

import torch

from shared.protocol import (
    Assignment,
    Chunk,
    ChunkRequest,
    DeviceProfile,
    FileEntry,
    GlobalAdapter,
    Hello,
    Manifest,
    MessageType,
    Nack,
    Presence,
    ResourceReport,
    Schedule,
    TrainingParams,
    Update,
)
from shared.tasks import TaskSpec
from shared.tensors import to_payload

RUN = "golden-run"
SENDER = "edge-1"
KEY_A = "base_model.model.model.layers.17.self_attn.q_proj.lora_A.weight"
KEY_B = "base_model.model.model.layers.17.self_attn.q_proj.lora_B.weight"


def _tensors() -> dict:
    a = (torch.arange(24, dtype=torch.float32).reshape(4, 6) / 7).to(torch.bfloat16)
    b = torch.linspace(-1, 1, 12, dtype=torch.float32).reshape(6, 2)
    return {KEY_A: to_payload(a), KEY_B: to_payload(b)}


def training() -> TrainingParams:
    """Round hyper-parameters."""
    return TrainingParams(
        local_steps=10,
        learning_rate=2e-4,
        batch_size=4,
        seq_len=128,
        lora_rank=16,
        lora_alpha=32.0,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        mu=0.01,
        seed=7,
    )


def profile() -> DeviceProfile:
    """A Jetson-like profile."""
    return DeviceProfile(
        name="orin-1",
        device_class="jetson-orin-nano-8gb",
        accelerator="cuda",
        total_memory_bytes=8 << 30,
        available_memory_bytes=5 << 30,
        unified_memory=True,
        gpu_name="Orin",
        gpu_total_memory_bytes=8 << 30,
        gpu_free_memory_bytes=5 << 30,
        compute_capability="8.7",
        cpu_count=6,
        supports_4bit=True,
        is_jetson=True,
    )


def samples() -> dict[MessageType, object]:
    """Message type -> a body exercising every field kind (nested, lists, maps, bytes, tensors)."""
    files = [
        FileEntry(path="config.json", size=11, chunks=["a" * 64]),
        FileEntry(path="layers/layer_017.safetensors", size=9, chunks=["b" * 64, "c" * 64]),
    ]
    return {
        MessageType.HELLO: Hello(client_id=SENDER, profile=profile(), num_examples=1200, software_version="0.1.0"),
        MessageType.ASSIGNMENT: Assignment(
            client_id=SENDER,
            accepted=True,
            tier="t12",
            reason="fits with 1.2 GiB to spare",
            plan={
                "keep_layers": 12,
                "precision": "nf4",
                "lora_rank": 16,
                "batch_size": 4,
                "seq_len": 128,
                "grad_checkpointing": False,
                "estimate_bytes": 3 << 30,
                "budget_bytes": 4 << 30,
            },
        ),
        MessageType.SCHEDULE: Schedule(
            round=3,
            status="running",
            deadline=1_800_000_000.5,
            quorum=2,
            participants={SENDER: "t12", "edge-2": "t8"},
            training=training(),
            manifests={"t12": "d" * 64, "t8": "e" * 64},
            adapter_round=2,
        ),
        MessageType.MANIFEST: Manifest(
            blob_id="f" * 64,
            name="SmolLM2-135M-Instruct",
            version=2,
            tier="t12",
            chunk_size=8,
            files=files,
            meta={"layer_map": [0, 1, 2, 5, 6], "layers_prefix": "model.layers", "precision": "nf4"},
        ),
        MessageType.CHUNK_REQUEST: ChunkRequest(blob_id="f" * 64, hashes=["b" * 64, "c" * 64]),
        MessageType.CHUNK: Chunk(blob_id="f" * 64, hash="b" * 64, data=bytes(range(256)) * 4),
        MessageType.GLOBAL_ADAPTER: GlobalAdapter(round=2, tensors=_tensors()),
        MessageType.UPDATE: Update(
            client_id=SENDER,
            round=3,
            num_examples=1200,
            delta=_tensors(),
            metrics={"loss": 0.71, "accuracy": 0.8},
            resources=ResourceReport(
                peak_rss_bytes=900 << 20,
                peak_gpu_bytes=0,
                wall_seconds=61.5,
                cpu_seconds=118.25,
                bytes_sent=123456,
                bytes_received=654321,
                device_class="jetson-orin-nano-8gb",
            ),
        ),
        MessageType.PRESENCE: Presence(client_id=SENDER, online=False, reason="connection lost"),
        MessageType.NACK: Nack(
            client_id=SENDER, round=3, ref_message_id="0" * 32, code="late", reason="round 3 closed"
        ),
    }


GOLDEN_MESSAGE_ID = "0123456789abcdef0123456789abcdef"
GOLDEN_TIMESTAMP = 1_750_000_000.25
GOLDEN_ROUND = 3


def newer_samples() -> dict[str, tuple[MessageType, object]]:
    """Golden file stem -> a body that uses a field a later minor version added.

    The original ``<type>.msgpack`` files were written by protocol 1.0 and must keep decoding
    (a 1.0 schedule has no task); each file here pins the newer form: 1.1 added the task,
    1.2 FedKRSO's subspaces in the training parameters. The stem ends in the version.
    """
    schedule = samples()[MessageType.SCHEDULE]
    task = TaskSpec.for_kind(
        "multiple_choice", prompt_template="Subject: {subject}\nQuestion: {question}\n{options}\nAnswer:", name="medmcqa"
    )
    with_task = dataclasses.replace(schedule, task=task)
    subspaces = dataclasses.replace(schedule.training, subspace_rank=4, subspace_seeds=[20699457771310, 39401603661139])
    return {
        "schedule-1.1": (MessageType.SCHEDULE, with_task),
        "schedule-1.2": (MessageType.SCHEDULE, dataclasses.replace(with_task, training=subspaces)),
    }


GOLDEN_SIGNING_SEED = b"fedsoda golden coordinator key.."
"""Seed of the coordinator key that signed the ``signed-*`` golden files (Ed25519 signs deterministically)."""


def signed_samples() -> dict[str, tuple[MessageType, object]]:
    """Golden file stem -> a body the coordinator signs (protocol 1.3 added the ``signature`` header).

    The stem ends in the version that wrote it. The global adapter is large enough (over the
    codec's 64 KiB splice threshold) that its tensor bytes are spliced in after signing, so
    the file pins that path too.
    """
    big = torch.linspace(-1, 1, 64 * 512, dtype=torch.float32).reshape(64, 512)
    return {
        "signed-schedule-1.3": (MessageType.SCHEDULE, newer_samples()["schedule-1.2"][1]),
        "signed-global_adapter-1.3": (MessageType.GLOBAL_ADAPTER, GlobalAdapter(round=2, tensors={KEY_A: to_payload(big)})),
    }
