"""FLOPs of one LoRA training step, for the planner's step-time figures.

Kept apart from the memory estimator: a FLOP count depends on the model's shape and the
setup only, not on precisions' byte sizes or any allocator; the planner divides it by a
device class's ``sustained_tflops`` (:attr:`hardware_profiles.planner.Plan.step_seconds`).
"""

from __future__ import annotations

from typing import Any

from hardware_profiles.shape import ModelShape, model_shape
from hardware_profiles.training_setup import TrainingSetup, lora_param_count


def training_flops(model_config: Any, setup: TrainingSetup) -> float:
    """FLOPs of one training step (forward, backward to the activations, LoRA updates).

    Frozen weights need no weight gradients, so backward costs about one more forward
    (``2 * params`` per token each); checkpointing adds a second forward. Attention adds
    ``4 * seq_len * q_width`` per token per layer and pass.

    Args:
        model_config: The full model's config (or a :class:`~hardware_profiles.shape.ModelShape`).
        setup: The training setup.

    Returns:
        FLOPs per optimizer step.
    """
    shape = model_config if isinstance(model_config, ModelShape) else model_shape(model_config)
    n_layers = setup.num_layers or shape.num_layers
    matmul_params = n_layers * shape.layer_linear_params + shape.hidden_size * shape.vocab_size
    attention = 4 * setup.seq_len * shape.num_heads * shape.head_dim * n_layers
    passes = 3 if setup.grad_checkpointing else 2
    per_token = passes * (2 * matmul_params + attention) + 6 * lora_param_count(shape, setup)
    return float(per_token * setup.tokens)


__all__ = ["training_flops"]
