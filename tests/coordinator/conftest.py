"""Fixtures for the coordinator's model tests (SGP, surgery, ODA, packaging, export)."""

from __future__ import annotations

import pytest

from coordinator.model.models import load_model


@pytest.fixture(scope="session")
def smol(tiny_model_dir):
    """``(model, tokenizer)`` of the 4-layer SmolLM2 cut copy, fp32, eval mode.

    Shared by the whole session: tests must not modify it (they deep-copy or build
    sub-LLMs, which copy).
    """
    return load_model(tiny_model_dir)
