"""Tiny random-weight models of several architectures, built from transformers configs.

They check that SGP, surgery, packaging and export find the decoder layers generically
(not by a Llama-only table). Weights are random, so only structural facts and exact
equalities are tested on them; anything about quality uses the real SmolLM2 cut copy.
"""

from __future__ import annotations

import torch

VOCAB = 128


def tiny_config(arch: str, num_layers: int = 6):
    """A transformers config of a few-kilobyte model of the given family."""
    from transformers import (
        Gemma2Config,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        PhiConfig,
        Qwen2Config,
    )

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=num_layers, num_attention_heads=4)
    if arch == "llama":
        return LlamaConfig(num_key_value_heads=2, **common)
    if arch == "qwen2":
        return Qwen2Config(num_key_value_heads=2, **common)
    if arch == "mistral":
        return MistralConfig(num_key_value_heads=2, **common)
    if arch == "gemma2":
        # Alternating sliding / full attention: a per-layer list the surgery must cut.
        return Gemma2Config(num_key_value_heads=2, head_dim=8, sliding_window=4, **common)
    if arch == "phi":
        return PhiConfig(**common)
    if arch == "gpt_neox":
        return GPTNeoXConfig(**common)
    if arch == "gpt2":
        return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=num_layers, n_head=4, bos_token_id=0, eos_token_id=0)
    raise ValueError(arch)


ARCHS = ("llama", "qwen2", "mistral", "gemma2", "phi", "gpt_neox", "gpt2")


def tiny_model(arch: str, num_layers: int = 6, seed: int = 0):
    """A random-weight causal LM of ``arch`` in eval mode (float32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config(arch, num_layers), dtype=torch.float32).eval()
