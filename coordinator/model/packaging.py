"""Quantize a sub-LLM and write it as a self-describing package (format: :mod:`shared.subllm`).

The package is built so the blob transfer can reuse chunks between versions: one
safetensors shard per decoder layer named by its full-LLM index, written deterministically
(same tensors, same bytes), so after a re-alignment only the retrained layers' files change.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from coordinator.model.surgery import find_decoder_layers, text_config
from shared.errors import ConfigError, ModelError
from shared.layermap import validate_layer_map
from shared.subllm import (
    EMBEDDING_FILE,
    INDEX_FILE,
    META_FILE,
    PRECISIONS,
    REST_SHARD,
    STORAGE_DTYPE,
    PackageMeta,
    dequantize_embedding,
    disable_cpu_4bit_repacking,
    embedding_keys,
    is_4bit,
    layer_shard_name,
    quantize_embedding,
    sha256_file,
)

log = logging.getLogger(__name__)


def _bnb_config(skip_modules: list[str]):
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=False,
        bnb_4bit_compute_dtype=torch.float32,
        llm_int8_skip_modules=skip_modules,
    )


def _linear_modules_outside_layers(model: nn.Module, prefix: str) -> list[str]:
    """Names of Linear-like modules outside the decoder layers (kept unquantized)."""
    names = []
    for name, module in model.named_modules():
        if name.startswith(prefix + "."):
            continue
        if isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D":
            names.append(name)
    return names


def prepare_package_model(model: nn.Module, precision: str = "nf4") -> nn.Module:
    """Return the model exactly as a package of this precision will hold it (on CPU).

    ``nf4``: every Linear inside the decoder layers becomes a bitsandbytes NF4
    ``Linear4bit`` (quantized on CPU, so the bytes do not depend on the coordinator's GPU);
    the token embedding table (and a head tied to it) is NF4-rounded (see
    :func:`shared.subllm.quantize_embedding`); other weights are rounded to bfloat16; all
    are held in float32. ``bf16``: every weight in
    bfloat16. ``fp32``: every weight in float32. The input model is not modified.

    Args:
        model: A (sub-)LLM in floating point.
        precision: One of ``"nf4"``, ``"bf16"``, ``"fp32"``.

    Returns:
        A new model in eval mode whose forward equals the loaded package's forward.

    Raises:
        ConfigError: Unknown precision.
        ModelError: The model is already quantized, or quantization fails.
    """
    from transformers import AutoModelForCausalLM

    if precision not in PRECISIONS:
        raise ConfigError(f"unknown package precision {precision!r}; expected one of {PRECISIONS}")
    if is_4bit(model):
        raise ModelError("the model is already 4-bit; pass the floating-point sub-LLM")
    prefix, _ = find_decoder_layers(model)
    if precision == "fp32":
        return copy.deepcopy(model).to("cpu", torch.float32).eval()
    # Round-trip through transformers' own loader, the path a client takes: for nf4 it
    # quantizes every architecture's Linear / Conv1D layout and writes the state dict its
    # loader reads back; for bf16 it keeps buffers (rotary frequencies) as the loader does.
    staging = Path(tempfile.mkdtemp(prefix="fedsoda-quant-"))
    kwargs: dict = {"dtype": torch.bfloat16}
    if precision == "nf4":
        kwargs = {
            "dtype": torch.float32,
            "quantization_config": _bnb_config(_linear_modules_outside_layers(model, prefix)),
            "device_map": {"": "cpu"},
        }
    try:
        model.save_pretrained(staging)
        prepared = AutoModelForCausalLM.from_pretrained(staging, **kwargs)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"preparing the {precision} package model failed: {exc}") from exc
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    if precision == "nf4":
        with torch.no_grad():
            for param in prepared.parameters():
                if param.dtype.is_floating_point:
                    param.data = param.data.to(STORAGE_DTYPE["nf4"]).to(torch.float32)
            key = embedding_keys(prepared)[0]
            embedding = prepared.get_input_embeddings().weight
            embedding.data = dequantize_embedding(quantize_embedding(embedding, key), key)
    # The staging folder is gone; do not let its path leak into the package's config.json.
    prepared.config._name_or_path = getattr(model.config, "_name_or_path", "")
    disable_cpu_4bit_repacking(prepared)
    return prepared.eval()


def _dedup_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict with tied tensors kept once (first key wins, as transformers saves them)."""
    seen: set[tuple[int, tuple[int, ...], tuple[int, ...]]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in model.state_dict().items():
        ident = (tensor.untyped_storage().data_ptr() + tensor.storage_offset() * tensor.element_size(),
                 tuple(tensor.shape), tuple(tensor.stride()))
        if tensor.numel() and ident in seen:
            continue
        seen.add(ident)
        out[key] = tensor
    return out


def write_package(
    model: nn.Module,
    tokenizer,
    layer_map: Sequence[int],
    tier: str,
    version: int,
    out_dir: str | Path,
    precision: str = "nf4",
    *,
    name: str | None = None,
    full_num_layers: int | None = None,
) -> PackageMeta:
    """Write a sub-LLM package.

    Args:
        model: The sub-LLM, floating point (quantized here) or already returned by
            :func:`prepare_package_model` with the same precision.
        tokenizer: Its tokenizer.
        layer_map: ``layer_map[i]`` = full-LLM index of sub-LLM layer ``i``.
        tier: Tier name recorded in the meta.
        version: Package version (1 for the first, +1 per re-alignment).
        out_dir: Folder to write (created; files already there are replaced, stale shards removed).
        precision: ``"nf4"``, ``"bf16"`` or ``"fp32"``.
        name: Model name for the meta (default: the config's ``_name_or_path`` or model type).
        full_num_layers: Layers of the full LLM (default: ``max(layer_map) + 1``).

    Returns:
        The written :class:`PackageMeta` (with every file's sha256).

    Raises:
        ConfigError: Unknown precision.
        ModelError: The layer map does not fit the model.
    """
    from safetensors.torch import save_file

    if precision not in PRECISIONS:
        raise ConfigError(f"unknown package precision {precision!r}; expected one of {PRECISIONS}")
    prefix, layers = find_decoder_layers(model)
    kept = validate_layer_map(layer_map, full_num_layers or max(int(k) for k in layer_map) + 1)
    if len(kept) != len(layers):
        raise ModelError(f"the model has {len(layers)} layers but the layer map lists {len(kept)}")
    prepared = model if _matches(model, precision) else prepare_package_model(model, precision)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("model-*.safetensors"):
        stale.unlink()

    storage = STORAGE_DTYPE[precision]
    shards: dict[str, dict[str, torch.Tensor]] = {}
    layer_re_prefix = prefix + "."
    embedding = embedding_keys(prepared)[0] if precision == "nf4" else None
    for key, tensor in _dedup_state_dict(prepared).items():
        if key == embedding:
            continue  # written below, outside the index
        if key.startswith(layer_re_prefix):
            sub_index = int(key[len(layer_re_prefix) :].split(".", 1)[0])
            file = layer_shard_name(kept[sub_index])
        else:
            file = REST_SHARD
        if tensor.dtype.is_floating_point and not _is_quant_state(key):
            tensor = tensor.to(storage)
        shards.setdefault(file, {})[key] = tensor.detach().to("cpu").contiguous()
    weight_map = {}
    total = 0
    for file, tensors in sorted(shards.items()):
        save_file(tensors, str(out / file), metadata={"format": "pt"})
        for key, tensor in tensors.items():
            weight_map[key] = file
            total += tensor.numel() * tensor.element_size()
    if embedding is not None:
        table = prepared.get_input_embeddings().weight
        save_file(quantize_embedding(table, embedding), str(out / EMBEDDING_FILE), metadata={"format": "pt"})
    (out / INDEX_FILE).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2)
        + "\n",
        encoding="utf-8",
    )

    config = prepared.config
    config.save_pretrained(out)
    generation = getattr(prepared, "generation_config", None)
    if generation is not None:
        generation.save_pretrained(out)
    _clean_tokenizer(tokenizer).save_pretrained(out)

    files = {
        p.relative_to(out).as_posix(): sha256_file(p)
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != META_FILE
    }
    cfg = text_config(prepared)
    meta = PackageMeta(
        name=name or Path(str(getattr(model.config, "_name_or_path", "") or cfg.model_type)).name,
        tier=tier,
        version=int(version),
        precision=precision,
        layer_map=tuple(kept),
        layers_prefix=prefix,
        full_num_layers=int(full_num_layers or max(kept) + 1),
        model_type=str(cfg.model_type),
        embedding_precision="nf4" if embedding is not None else precision,
        files=files,
    )
    (out / META_FILE).write_text(json.dumps(meta.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")
    log.info("wrote %s package tier %s v%d to %s (%d files)", precision, tier, version, out, len(files))
    return meta


def _clean_tokenizer(tokenizer):
    """A copy of the tokenizer without the padding/truncation state its last call left behind.

    A fast tokenizer serialises whatever padding and truncation its previous call switched
    on into ``tokenizer.json``; resetting them keeps the file byte-identical across versions.
    """
    clean = copy.deepcopy(tokenizer)
    backend = getattr(clean, "backend_tokenizer", None)
    if backend is not None:
        backend.no_padding()
        backend.no_truncation()
    return clean


def _is_quant_state(key: str) -> bool:
    # absmax / quant_map / nested statistics of a 4-bit weight are stored as they are.
    return ".weight." in key


def _matches(model: nn.Module, precision: str) -> bool:
    """Whether a model already holds weights the way a ``precision`` package stores them."""
    if precision == "nf4":
        return is_4bit(model)
    wanted = STORAGE_DTYPE[precision]
    return all(p.dtype == wanted for p in model.parameters() if p.dtype.is_floating_point)
