"""The sub-LLM package format, and loading a package on a client.

A package is a folder:

* ``config.json`` (the sub-LLM's own config; with ``quantization_config`` when 4-bit),
  ``generation_config.json`` when the model has one, and the tokenizer files;
* one safetensors shard per decoder layer, named by the layer's FULL-LLM index
  (``model-layer-00017.safetensors``), plus ``model-rest.safetensors`` for everything else
  (embeddings, final norm, head), and ``model.safetensors.index.json``. A re-aligned version
  rewrites only the layers that changed, so every other file is byte-identical and the
  content-addressed blob transfer reuses its chunks;
* in 4-bit packages, ``model-embeddings.safetensors``: the token embedding table (and so a
  head tied to it) in NF4, outside the index because transformers' loader cannot read a
  4-bit embedding; :func:`load_package` dequantizes it. On small models this table is most
  of the package (SmolLM2-135M: 54 of 92 MiB in bf16, 17 MiB in NF4);
* ``fedsoda_meta.json``: format, name, tier, version, precision, embedding precision, layer
  map, layers prefix, and the sha256 of every other file.

The coordinator writes packages (``coordinator.model.packaging``); the client loads them with
:func:`load_package`. Nothing here imports the coordinator.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shared.errors import BlobError, ModelError

log = logging.getLogger(__name__)

PACKAGE_FORMAT = "fedsoda-subllm"
#: 2: 4-bit packages hold the embedding table in NF4 (:data:`EMBEDDING_FILE`).
PACKAGE_FORMAT_VERSION = 2
META_FILE = "fedsoda_meta.json"
INDEX_FILE = "model.safetensors.index.json"
REST_SHARD = "model-rest.safetensors"
EMBEDDING_FILE = "model-embeddings.safetensors"
#: NF4 block size of the embedding table. Measured on SmolLM2-135M (tied head, 400 Rotten
#: Tomatoes test sentences, zero-shot): fp32 0.790, block 32 0.783, block 64 (QLoRA's
#: default for linear layers) 0.715; the head's logits need the finer scales.
EMBEDDING_BLOCKSIZE = 32
#: Precisions a package may hold: 4-bit NormalFloat (bitsandbytes), bfloat16, float32.
PRECISIONS = ("nf4", "bf16", "fp32")
#: dtype of the tensors that are not 4-bit-quantized, per package precision. 4-bit packages
#: keep embeddings and norms in 16 bits, as QLoRA does, which halves the largest file.
STORAGE_DTYPE = {"nf4": torch.bfloat16, "bf16": torch.bfloat16, "fp32": torch.float32}
#: Default compute dtype when loading, per precision (CPU-friendly).
DEFAULT_LOAD_DTYPE = {"nf4": torch.float32, "bf16": torch.bfloat16, "fp32": torch.float32}


def linear4bit_modules(model: nn.Module) -> list[nn.Module]:
    """The bitsandbytes 4-bit linear layers of a model (subclasses included).

    Matched by class name, so a model without 4-bit layers never imports bitsandbytes.
    """
    return [m for m in model.modules() if any(c.__name__ == "Linear4bit" for c in type(m).__mro__)]


def is_4bit(model: nn.Module) -> bool:
    """True if the model holds bitsandbytes 4-bit linear layers (or says it was loaded in 4 bits)."""
    return bool(getattr(model, "is_loaded_in_4bit", False)) or bool(linear4bit_modules(model))


def layer_shard_name(full_index: int) -> str:
    """File name of the shard holding full-LLM layer ``full_index``."""
    return f"model-layer-{full_index:05d}.safetensors"


def sha256_file(path: Path, block: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes.

    Args:
        path: The file.
        block: Bytes read at a time.

    Returns:
        The digest as 64 hex characters.
    """
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(block):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class PackageMeta:
    """What ``fedsoda_meta.json`` holds.

    Attributes:
        name: Model name (the full LLM it was cut from).
        tier: Tier name.
        version: Package version (grows with every re-alignment).
        precision: One of :data:`PRECISIONS`.
        layer_map: ``layer_map[i]`` = full-LLM index of sub-LLM layer ``i``.
        layers_prefix: Dotted path of the decoder layer list, e.g. ``"model.layers"``.
        full_num_layers: Layers of the full LLM.
        model_type: The config's ``model_type``.
        embedding_precision: How the token embedding table is stored: ``"nf4"`` (in
            :data:`EMBEDDING_FILE`) or, like the other unquantized tensors, in the
            precision's :data:`STORAGE_DTYPE` (``"bf16"``, ``"fp32"``).
        files: ``{relative path: sha256 hex}`` of every file but the meta file.
        format: Always :data:`PACKAGE_FORMAT`.
        format_version: :data:`PACKAGE_FORMAT_VERSION` of the writer.
    """

    name: str
    tier: str
    version: int
    precision: str
    layer_map: tuple[int, ...]
    layers_prefix: str
    full_num_layers: int
    model_type: str
    embedding_precision: str = "bf16"
    files: dict[str, str] = field(default_factory=dict)
    format: str = PACKAGE_FORMAT
    format_version: int = PACKAGE_FORMAT_VERSION

    def to_dict(self) -> dict[str, Any]:
        """Plain-type dict (JSON / msgpack safe), e.g. for a manifest's ``meta``."""
        data = asdict(self)
        data["layer_map"] = list(self.layer_map)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PackageMeta:
        """Build from :meth:`to_dict` output.

        Raises:
            ModelError: Not a fedsoda package, a newer format, or a field missing.
        """
        if data.get("format") != PACKAGE_FORMAT:
            raise ModelError(f"not a fedsoda sub-LLM package (format={data.get('format')!r})")
        if int(data.get("format_version", 0)) > PACKAGE_FORMAT_VERSION:
            raise ModelError(
                f"package format version {data['format_version']} is newer than this client's "
                f"{PACKAGE_FORMAT_VERSION}: upgrade fedsoda"
            )
        try:
            meta = cls(
                name=str(data["name"]),
                tier=str(data["tier"]),
                version=int(data["version"]),
                precision=str(data["precision"]),
                layer_map=tuple(int(i) for i in data["layer_map"]),
                layers_prefix=str(data["layers_prefix"]),
                full_num_layers=int(data["full_num_layers"]),
                model_type=str(data["model_type"]),
                # Format 1 stored every embedding like the other unquantized tensors.
                embedding_precision=str(data.get("embedding_precision", "fp32" if data["precision"] == "fp32" else "bf16")),
                files={str(k): str(v) for k, v in data.get("files", {}).items()},
                format=str(data["format"]),
                format_version=int(data["format_version"]),
            )
        except KeyError as exc:
            raise ModelError(f"package meta lacks field {exc.args[0]!r}") from exc
        if meta.precision not in PRECISIONS:
            raise ModelError(f"unknown package precision {meta.precision!r}; expected one of {PRECISIONS}")
        if meta.embedding_precision not in PRECISIONS:
            raise ModelError(f"unknown embedding precision {meta.embedding_precision!r}; expected one of {PRECISIONS}")
        return meta


def read_meta(package_dir: str | Path) -> PackageMeta:
    """Read a package's ``fedsoda_meta.json``.

    Raises:
        ModelError: The folder holds no package meta or it is invalid.
    """
    path = Path(package_dir) / META_FILE
    if not path.is_file():
        raise ModelError(f"{package_dir} is not a sub-LLM package: {META_FILE} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ModelError(f"{path} is not valid JSON: {exc.msg}") from exc
    return PackageMeta.from_dict(data)


def verify_package(package_dir: str | Path, meta: PackageMeta | None = None) -> PackageMeta:
    """Check every file of a package against the sha256 in its meta.

    Args:
        package_dir: The package folder.
        meta: Already-read meta (read from the folder when None).

    Returns:
        The meta.

    Raises:
        BlobError: A file is missing or its hash differs.
    """
    folder = Path(package_dir)
    meta = meta or read_meta(folder)
    for rel, expected in sorted(meta.files.items()):
        path = folder / rel
        if not path.is_file():
            raise BlobError(f"package file {rel} is missing from {folder}; fetch the package again")
        actual = sha256_file(path)
        if actual != expected:
            raise BlobError(f"package file {rel} is corrupt (sha256 {actual[:12]}..., expected {expected[:12]}...)")
    return meta


def embedding_keys(model: nn.Module) -> list[str]:
    """State-dict keys of the model's token embedding table: its own first (the key it is
    stored under, e.g. ``model.embed_tokens.weight``), then those of a head tied to it.

    Raises:
        ModelError: The model has no input embedding among its parameters.
    """
    embedding = model.get_input_embeddings()
    keys = [
        name for name, param in model.named_parameters(remove_duplicate=False)
        if embedding is not None and param is embedding.weight
    ]
    if not keys:
        raise ModelError(f"{type(model).__name__} has no token embedding parameter")
    return keys


def quantize_embedding(weight: torch.Tensor, key: str) -> dict[str, torch.Tensor]:
    """NF4-quantize an embedding table into the tensors :data:`EMBEDDING_FILE` holds.

    Quantizing what :func:`dequantize_embedding` returned gives the same bytes again, so a
    model prepared as the package holds it writes the package it came from.

    Args:
        weight: The ``[vocab, hidden]`` table (on CPU, so the bytes do not depend on a GPU).
        key: Its state-dict key; the quantization state goes under ``key + "."``.

    Returns:
        ``{key: packed 4-bit codes, key + ".absmax": ..., ...}``.
    """
    import bitsandbytes.functional as bnbf

    packed, state = bnbf.quantize_4bit(
        weight.detach().to("cpu", torch.float32).contiguous(), blocksize=EMBEDDING_BLOCKSIZE, quant_type="nf4"
    )
    tensors = {key: packed}
    tensors.update({f"{key}.{name}": value for name, value in state.as_dict(packed=True).items()})
    return tensors


def dequantize_embedding(tensors: dict[str, torch.Tensor], key: str) -> torch.Tensor:
    """The float32 embedding table from :func:`quantize_embedding`'s tensors.

    Raises:
        ModelError: The tensors are not a 4-bit table stored under ``key``.
    """
    import bitsandbytes.functional as bnbf

    state = {name[len(key) + 1 :]: value for name, value in tensors.items() if name.startswith(key + ".")}
    if key not in tensors or not state:
        raise ModelError(f"{EMBEDDING_FILE} holds no 4-bit table under {key!r} (found {sorted(tensors)[:4]})")
    try:
        quant_state = bnbf.QuantState.from_dict(state, device=torch.device("cpu"))
        return bnbf.dequantize_4bit(tensors[key], quant_state).to(torch.float32)
    except (KeyError, ValueError, RuntimeError) as exc:
        raise ModelError(f"{EMBEDDING_FILE} is not a valid 4-bit table: {exc}") from exc


def disable_cpu_4bit_repacking(model: nn.Module) -> int:
    """Keep bitsandbytes 4-bit layers trainable on CPUs with AVX512_BF16.

    bitsandbytes 0.50 repacks a ``Linear4bit`` weight into a CPU-only layout the first time
    it runs in eval mode on input that needs no gradient; the repacked matmul has no
    autograd, so LoRA gradients afterwards are silently wrong or missing. Turning the
    feature off on every 4-bit layer right after loading prevents it (CUDA is unaffected).

    Args:
        model: Any model; only ``bnb.nn.Linear4bit`` modules are touched.

    Returns:
        Number of 4-bit layers patched (0 when bitsandbytes is not installed).
    """
    try:
        import bitsandbytes as bnb  # lazy: heavy, and absent on some clients
    except ImportError:
        return 0
    count = 0
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count


#: Texts of transformers' load warnings about facts :func:`load_package` checks itself: the
#: load-report table (it would call the 4-bit embedding table "newly initialized"), and the
#: tied-weights notice that the table and the head tied to it are "absent from the checkpoint"
#: (in a 4-bit package they live outside the index; a key a package really lacks stays among
#: the missing keys, which load_package refuses).
_CHECKED_LOAD_WARNINGS = ("LOAD REPORT", "This checkpoint seem corrupted. The tied weights mapping")


@contextmanager
def _without_checked_load_warnings() -> Iterator[None]:
    """Drop transformers' load warnings that :func:`load_package` replaces with its own checks."""
    report_logger = logging.getLogger("transformers.modeling_utils")
    drop = logging.Filter()
    drop.filter = lambda record: not any(text in str(record.msg) for text in _CHECKED_LOAD_WARNINGS)  # type: ignore[method-assign]
    report_logger.addFilter(drop)
    try:
        yield
    finally:
        report_logger.removeFilter(drop)


def load_package(
    package_dir: str | Path,
    device: str | torch.device = "cpu",
    *,
    dtype: torch.dtype | None = None,
    verify: bool = True,
):
    """Load a sub-LLM package for training or inference.

    Args:
        package_dir: The package folder.
        device: Where the model goes (``"cpu"``, ``"cuda"``, ``"cuda:0"``).
        dtype: Compute dtype (default: float32 for ``nf4`` and ``fp32`` packages, bfloat16
            for ``bf16``).
        verify: Check every file's sha256 first.

    Returns:
        ``(model, tokenizer, meta)``: the causal LM in eval mode (4-bit layers patched with
        :func:`disable_cpu_4bit_repacking`), its tokenizer (pad token set), and the
        :class:`PackageMeta`.

    Raises:
        BlobError: A file is missing or corrupt.
        ModelError: The package cannot be loaded, or its weights do not match its config.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(package_dir)
    meta = read_meta(folder)
    if verify:
        verify_package(folder, meta)
    dtype = dtype or DEFAULT_LOAD_DTYPE[meta.precision]
    kwargs: dict[str, Any] = {"dtype": dtype}
    if meta.precision == "nf4":
        try:
            import bitsandbytes  # noqa: F401  (lazy: only 4-bit packages need it)
        except ImportError as exc:
            raise ModelError(
                "this package is 4-bit (nf4) and needs bitsandbytes; install it or ask for a bf16/fp32 package"
            ) from exc
        kwargs["device_map"] = {"": str(device)}
    try:
        with _without_checked_load_warnings():
            model, info = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, RuntimeError) as exc:
        raise ModelError(f"cannot load the sub-LLM package in {folder}: {exc}") from exc
    # A 4-bit table is outside the index, so transformers reports it (and a head tied to it) missing.
    outside_index = embedding_keys(model) if meta.embedding_precision == "nf4" else []
    info["missing_keys"] = set(info.get("missing_keys") or ()) - set(outside_index)
    problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    if problems:
        raise ModelError(f"package {folder} does not match its config: {problems}")
    if outside_index:
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            stored = load_file(str(folder / EMBEDDING_FILE))
        except (OSError, SafetensorError) as exc:
            raise ModelError(f"cannot read {EMBEDDING_FILE} in {folder}: {exc}") from exc
        table = dequantize_embedding(stored, outside_index[0])
        embedding = model.get_input_embeddings().weight
        if table.shape != embedding.shape:
            raise ModelError(f"package {folder}: embedding table is {tuple(table.shape)}, config wants {tuple(embedding.shape)}")
        embedding.data = table.to(torch.device(device))  # in place: a tied head keeps sharing it
    if meta.precision != "nf4":
        model.to(device)
    else:
        # transformers keeps a pre-quantized checkpoint's unquantized tensors (embeddings,
        # norms, biases) in their stored 16-bit dtype; compute with them in `dtype` instead.
        with torch.no_grad():
            for param in model.parameters():
                if param.dtype.is_floating_point and param.dtype != dtype:
                    param.data = param.data.to(dtype)
        # The stored 4-bit weights are the same for any compute dtype; the client picks it.
        for module in model.modules():
            if type(module).__name__ == "Linear4bit":
                module.compute_dtype = dtype
    patched = disable_cpu_4bit_repacking(model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    log.info(
        "loaded sub-LLM %s tier %s v%d (%s, %d layers, %d 4-bit modules)",
        meta.name, meta.tier, meta.version, meta.precision, len(meta.layer_map), patched,
    )
    return model, tokenizer, meta
