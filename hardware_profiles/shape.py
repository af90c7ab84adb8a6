"""The shape of a causal LM, read from its Hugging Face config without loading a weight.

:func:`model_shape` builds the model on PyTorch's ``meta`` device (nothing is allocated, no
weight file is read) and records what the memory estimator, the FLOP count and the planner
need: layer count, widths, heads, vocabulary, one decoder layer's linear modules and the
parameters outside them. The last 16 shapes read are cached by config.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shared.errors import ModelError


@dataclass(frozen=True)
class LinearShape:
    """A linear module inside one decoder layer.

    Attributes:
        name: Dotted name relative to the layer (``self_attn.q_proj``).
        in_features: Input width.
        out_features: Output width.
    """

    name: str
    in_features: int
    out_features: int

    @property
    def numel(self) -> int:
        """Weight count ``in * out``."""
        return self.in_features * self.out_features


@dataclass(frozen=True)
class ModelShape:
    """What the estimator needs to know about a causal LM, read from its config.

    Attributes:
        model_type: ``config.model_type``.
        num_layers: Decoder layers of the full model.
        hidden_size: Residual width h.
        intermediate_size: MLP width I.
        num_heads: Query heads.
        num_kv_heads: Key/value heads (grouped-query attention).
        head_dim: Width of one head.
        vocab_size: Vocabulary V (the logits' width).
        layer_linears: Linear modules of one decoder layer.
        layer_other_params: Parameters of one layer outside its linears' weight matrices
            (norms, and the linears' biases, which 4-bit quantization leaves unpacked).
        embedding_params: Input embedding parameters.
        lm_head_params: Output head parameters not shared with the embedding (0 when tied).
        other_params: Everything else outside the layers (final norm, ...).
        gated_mlp: The MLP has a gate projection (SwiGLU-style: three saved intermediates).
        layer_norm: The layers normalise with ``LayerNorm`` (GPT-2, OPT: the input is saved in
            the compute dtype) rather than an RMSNorm that upcasts to fp32 (Llama, Qwen2).
        activation: The MLP's activation function as the config names it (``silu``,
            ``gelu_new``, ``relu``, ...).
        attention_dropout: Dropout probability on the attention probabilities
            (``attn_pdrop`` / ``attention_dropout``).
        residual_dropout: Dropout probability on each sublayer's output before the residual
            add (``resid_pdrop`` / ``dropout`` / ``hidden_dropout``).
        embedding_dropout: Dropout probability on the embeddings (``embd_pdrop`` / ``embed_dropout``).
    """

    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    layer_linears: tuple[LinearShape, ...]
    layer_other_params: int
    embedding_params: int
    lm_head_params: int
    other_params: int
    gated_mlp: bool
    layer_norm: bool = False
    activation: str = "silu"
    attention_dropout: float = 0.0
    residual_dropout: float = 0.0
    embedding_dropout: float = 0.0

    @property
    def layer_linear_params(self) -> int:
        """Weights in one layer's linear modules."""
        return sum(lin.numel for lin in self.layer_linears)

    def total_params(self, num_layers: int | None = None) -> int:
        """Parameters of the model cut to ``num_layers`` decoder layers (default: all)."""
        n = self.num_layers if num_layers is None else num_layers
        return n * (self.layer_linear_params + self.layer_other_params) + self.embedding_params + self.lm_head_params + self.other_params


def _config_from(model_config: Any) -> Any:
    """A transformers config from a config object, a dict, a config.json or a model folder."""
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(model_config, PretrainedConfig):
        return model_config
    if isinstance(model_config, Mapping):
        data = dict(model_config)
        model_type = data.pop("model_type", None)
        if not model_type:
            raise ModelError("a model config given as a dict needs its 'model_type'")
        return AutoConfig.for_model(model_type, **data)
    path = Path(model_config)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ModelError(f"no model config at {path}: pass a Hugging Face model folder holding config.json")
    try:
        return AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot read the model config {path}: {exc}") from exc


def model_shape(model_config: Any) -> ModelShape:
    """Read a model's shape by building it on the meta device (no weights, no memory).

    Args:
        model_config: A ``transformers.PretrainedConfig``, a config dict (with
            ``model_type``), a ``config.json`` path or a model folder.

    Returns:
        The :class:`ModelShape`.

    Raises:
        ModelError: The config cannot be read, or no decoder layer list is found.
    """
    config = _config_from(model_config)
    # Quantization settings in a config are about how weights are stored, not the shape.
    key = config.to_json_string(use_diff=False)
    return _model_shape_cached(key)


@functools.lru_cache(maxsize=16)
def _model_shape_cached(config_json: str) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    data = json.loads(config_json)
    data.pop("quantization_config", None)
    model_type = data.pop("model_type")
    config = AutoConfig.for_model(model_type, **data)
    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
    except (ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"cannot build a {model_type!r} causal LM from its config: {exc}") from exc
    n_layers = int(getattr(config, "num_hidden_layers", 0) or 0)
    layers = _decoder_layers(model, n_layers)
    first = layers[0]
    linears = []
    linear_params = 0
    for name, module in first.named_modules():
        weight = getattr(module, "weight", None)
        if isinstance(module, torch.nn.Linear):
            linears.append(LinearShape(name, module.in_features, module.out_features))
            linear_params += weight.numel()
        elif type(module).__name__ == "Conv1D" and weight is not None and weight.dim() == 2:  # GPT-2 style
            linears.append(LinearShape(name, int(weight.shape[0]), int(weight.shape[1])))
            linear_params += weight.numel()
    if not linears:
        raise ModelError(f"no linear modules in the decoder layers of {model_type!r}")
    layer_params = sum(p.numel() for p in first.parameters())
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    embedding_params = embed.weight.numel() if embed is not None else 0
    tied = head is not None and embed is not None and head.weight is embed.weight
    lm_head_params = 0 if (head is None or tied) else sum(p.numel() for p in head.parameters())
    total = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    other = total - n_layers * layer_params - embedding_params - lm_head_params
    hidden = int(config.hidden_size)
    heads = int(getattr(config, "num_attention_heads", 0) or 1)
    kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    widest = max(lin.out_features for lin in linears)
    intermediate = int(getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or widest)
    return ModelShape(
        model_type=model_type,
        num_layers=n_layers,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        vocab_size=int(config.vocab_size),
        layer_linears=tuple(linears),
        layer_other_params=layer_params - linear_params,
        embedding_params=embedding_params,
        lm_head_params=lm_head_params,
        other_params=max(other, 0),
        gated_mlp=any("gate" in lin.name.rsplit(".", 1)[-1] for lin in linears),
        layer_norm=any(isinstance(m, torch.nn.LayerNorm) for m in first.modules()),
        activation=str(_first_of(config, ("activation_function", "hidden_act", "hidden_activation"), "silu")),
        attention_dropout=float(_first_of(config, ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob"), 0.0)),
        residual_dropout=float(_first_of(config, ("resid_pdrop", "dropout", "hidden_dropout", "hidden_dropout_prob"), 0.0)),
        embedding_dropout=float(_first_of(config, ("embd_pdrop", "embed_dropout"), 0.0)),
    )


def _first_of(config: Any, names: tuple[str, ...], default: Any) -> Any:
    """The first of ``names`` the config sets (not None), else ``default``: architectures
    name the same setting differently (GPT-2's ``attn_pdrop`` is Llama's ``attention_dropout``)."""
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return default


def _decoder_layers(model: Any, n_layers: int) -> Any:
    import torch

    candidates = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) > 0]
    exact = [m for m in candidates if len(m) == n_layers]
    pool = exact or candidates
    if not pool:
        raise ModelError(f"no decoder layer list found in {type(model).__name__}")
    return max(pool, key=lambda m: sum(p.numel() for p in m.parameters()))


__all__ = ["LinearShape", "ModelShape", "model_shape"]
