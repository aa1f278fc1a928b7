"""Shared fixtures: the real shared datasets (skipped when absent) and the tiny model."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# GGUF conversions and merged adapters (domaintune.llamacpp.cache) go to a folder of this test session, not the
# user's ~/.cache/domaintune/gguf: most are keyed by tmp run folders (a new key every run) and only piled up
# there. The price is converting the tiny model once per session (its folder in the models cache is stable, so
# it used to be reused). CI that wants conversions kept across sessions sets DOMAINTUNE_GGUF_CACHE to a
# folder of its own; the cache's size cap (DOMAINTUNE_GGUF_CACHE_MAX_GB) applies there too.
_OWN_GGUF_CACHE = None if os.environ.get("DOMAINTUNE_GGUF_CACHE") else tempfile.mkdtemp(prefix="domaintune-gguf-")
if _OWN_GGUF_CACHE:
    os.environ["DOMAINTUNE_GGUF_CACHE"] = _OWN_GGUF_CACHE


def pytest_sessionfinish(session, exitstatus) -> None:
    if _OWN_GGUF_CACHE:
        shutil.rmtree(_OWN_GGUF_CACHE, ignore_errors=True)


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
