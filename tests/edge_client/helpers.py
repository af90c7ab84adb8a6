"""What the training tests of edge_client share: a 4-layer SmolLM2 cut, its LoRA layout, params."""

from __future__ import annotations

import torch

from shared.protocol import TrainingParams

PREFIX = "model.layers"
SUB_MAP = [2, 9, 17, 29]  # a non-identity layer map: sub-LLM layer i is full-LLM layer SUB_MAP[i]
TARGETS = ["q_proj", "v_proj"]


def make_params(**overrides) -> TrainingParams:
    """Small-run TrainingParams (2 steps, batch 2, seq 64, r 8 on q/v); ``overrides`` replace fields."""
    values = dict(
        local_steps=2,
        learning_rate=2e-3,
        batch_size=2,
        seq_len=64,
        lora_rank=8,
        lora_alpha=16.0,
        lora_dropout=0.0,
        target_modules=TARGETS,
        mu=0.0,
        seed=0,
    )
    values.update(overrides)
    return TrainingParams(**values)


def has_lora(model: torch.nn.Module) -> bool:
    """Whether any LoRA module is still attached."""
    return any("lora" in name for name, _ in model.named_modules())


def random_global_adapter(layers, rank: int = 8, scale: float = 0.05, seed: int = 1) -> dict[str, torch.Tensor]:
    """Nonzero canonical-key LoRA tensors for the given full-LLM layers (SmolLM2 shapes)."""
    out_features = {"q_proj": 576, "v_proj": 192}
    gen = torch.Generator().manual_seed(seed)
    adapter = {}
    for layer in layers:
        for module in TARGETS:
            key = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            adapter[f"{key}.lora_A.weight"] = torch.randn(rank, 576, generator=gen) * scale
            adapter[f"{key}.lora_B.weight"] = torch.randn(out_features[module], rank, generator=gen) * scale
    return adapter
