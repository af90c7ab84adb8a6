"""A small model and workload the footprint and preflight tests share (config dicts only)."""

from __future__ import annotations

from coordinator.model.footprint import CoordinatorWorkload, estimate_coordinator_memory

# Small Llama-shaped model: 8 layers, gated MLP, grouped-query attention.
LLAMA = {
    "model_type": "llama",
    "hidden_size": 256,
    "num_hidden_layers": 8,
    "intermediate_size": 704,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "vocab_size": 8192,
    "tie_word_embeddings": True,
}


def workload(**kwargs) -> CoordinatorWorkload:
    """A small workload for :data:`LLAMA`, with ``kwargs`` overriding its fields."""
    base = {"depths": (6,), "block_size": 2, "calibration_batch_size": 4, "seq_len": 64, "oda_steps": 3}
    return CoordinatorWorkload(**{**base, **kwargs})


def estimate(config=LLAMA, **kwargs):
    """The coordinator estimate of ``config`` under :func:`workload` (``kwargs``)."""
    return estimate_coordinator_memory(config, workload(**kwargs))
