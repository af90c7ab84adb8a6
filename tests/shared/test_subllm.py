"""Loading a sub-LLM package (shared.subllm.load_package) keeps transformers' misleading load
warnings from users. Package round trips and integrity: tests/coordinator/model/test_packaging.py."""

from __future__ import annotations

import logging

import pytest
import torch

from coordinator.model.models import load_model
from coordinator.model.packaging import prepare_package_model, write_package
from shared.subllm import load_package

TIED_WEIGHTS_WARNING = "This checkpoint seem corrupted. The tied weights mapping"


@pytest.fixture
def transformers_records(caplog: pytest.LogCaptureFixture):
    """caplog's records, with transformers' own loggers captured too (they do not propagate)."""
    hf_logger = logging.getLogger("transformers")
    hf_logger.addHandler(caplog.handler)
    yield caplog
    hf_logger.removeHandler(caplog.handler)


def test_loading_a_4bit_package_logs_no_tied_weights_warning(tiny_model_dir, tmp_path, transformers_records):
    """The NF4 embedding table (and the head tied to it) is outside the safetensors index, so
    transformers calls the checkpoint corrupted; load_package fills the table in itself."""
    from transformers import AutoModelForCausalLM

    model, tokenizer = load_model(tiny_model_dir)
    folder = tmp_path / "nf4"
    write_package(prepare_package_model(model, "nf4"), tokenizer, [0, 1, 2, 3], "L4", 1, folder, "nf4",
                  name="smol-cut", full_num_layers=4)
    # The warning is real for this package: plain transformers gives it.
    AutoModelForCausalLM.from_pretrained(folder, device_map={"": "cpu"}, dtype=torch.float32)
    assert any(TIED_WEIGHTS_WARNING in r.getMessage() for r in transformers_records.records)
    transformers_records.clear()

    loaded, _, meta = load_package(folder)
    assert meta.embedding_precision == "nf4" and loaded.get_input_embeddings().weight.abs().sum() > 0
    messages = [r.getMessage() for r in transformers_records.records if r.levelno >= logging.WARNING]
    assert not [m for m in messages if TIED_WEIGHTS_WARNING in m or "LOAD REPORT" in m], messages
