"""Published configs of real models, for benchmarks and tests that need their shapes.

Memory does not depend on weight values, so a random-weight model built from one of these
(or its shape read on PyTorch's ``meta`` device) stands in for the real checkpoint, which
this machine cannot download. Each dict is the model's ``config.json`` as published, cut to
the keys that decide its shape and its architecture's code paths.
"""

from __future__ import annotations

from typing import Any

QWEN2_05B: dict[str, Any] = {
    "model_type": "qwen2",
    "hidden_size": 896,
    "num_hidden_layers": 24,
    "intermediate_size": 4864,
    "num_attention_heads": 14,
    "num_key_value_heads": 2,
    "vocab_size": 151936,
    "tie_word_embeddings": True,
    "rope_theta": 1_000_000.0,
    "rms_norm_eps": 1e-6,
    "max_position_embeddings": 32768,
    "hidden_act": "silu",
}
"""Qwen/Qwen2-0.5B: large vocabulary, tied head, grouped-query attention (14 q / 2 kv heads)."""

LLAMA32_1B: dict[str, Any] = {
    "model_type": "llama",
    "hidden_size": 2048,
    "num_hidden_layers": 16,
    "intermediate_size": 8192,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "head_dim": 64,
    "vocab_size": 128256,
    "tie_word_embeddings": True,
    "rope_theta": 500_000.0,
    "rope_scaling": {
        "rope_type": "llama3",
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
    },
    "rms_norm_eps": 1e-5,
    "max_position_embeddings": 131072,
    "hidden_act": "silu",
}
"""meta-llama/Llama-3.2-1B: tied head, llama3 rope scaling, 32 q / 8 kv heads."""

GPT2: dict[str, Any] = {
    "model_type": "gpt2",
    "n_embd": 768,
    "n_layer": 12,
    "n_head": 12,
    "n_inner": None,
    "n_positions": 1024,
    "n_ctx": 1024,
    "vocab_size": 50257,
    "activation_function": "gelu_new",
    "attn_pdrop": 0.1,
    "embd_pdrop": 0.1,
    "resid_pdrop": 0.1,
    "layer_norm_epsilon": 1e-5,
    "tie_word_embeddings": True,
}
"""openai-community/gpt2 (124M): Conv1D projections, learned positions, LayerNorm, ``gelu_new``,
dropout 0.1 on attention probabilities, residuals and embeddings, tied head."""
