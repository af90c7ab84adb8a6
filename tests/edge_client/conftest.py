"""Fixtures of the edge_client training tests: the fp32 4-layer SmolLM2 cut and Rotten Tomatoes data."""

from __future__ import annotations

import pytest

from coordinator.model.datasets import movie_reviews, train_test_split
from coordinator.model.models import load_model
from coordinator.model.presets import task_preset
from edge_client.data import LocalDataset, dataset_from_records


@pytest.fixture(scope="module")
def fp32(tiny_model_dir):
    """``(model, tokenizer)``: the 4-layer cut in fp32 (one per test module; tests put it back as they found it)."""
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def rt_dataset() -> LocalDataset:
    """64 Rotten Tomatoes training sentences as a classification dataset."""
    train, _ = train_test_split(movie_reviews("rotten_tomatoes"), test_fraction=0.2, seed=0)
    return dataset_from_records(train[:64], task_preset("rotten_tomatoes"), source="rotten_tomatoes")
