"""Shared fixtures: the real shared datasets (skipped when absent) and the tiny model."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("DOMAINTUNE_SHARED_DATASETS", REPO_ROOT.parent / "shared" / "datasets"))


@pytest.fixture(scope="session")
def shared_datasets() -> Path:
    if not SHARED_DATASETS.is_dir():
        pytest.skip(f"shared datasets not found at {SHARED_DATASETS} (set DOMAINTUNE_SHARED_DATASETS)")
    return SHARED_DATASETS


@pytest.fixture(scope="session")
def tiny_model_dir() -> Path:
    """The tiny random Llama (2 layers, hidden 64, SmolLM2 tokenizer) as a plain HF folder."""
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import resolve_model_dir

    return resolve_model_dir(ModelConfig(name_or_path="tiny-random-llama"))
