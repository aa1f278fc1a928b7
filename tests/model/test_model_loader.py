import pytest
from transformers import AutoTokenizer

from domaintune.errors import UserError
from domaintune.model.config import ModelConfig
from domaintune.model.loader import (
    apply_chat_template_setting,
    end_of_turn_token_ids,
    load_model_and_tokenizer,
    resolve_model_dir,
)


def test_tiny_model_loads_and_stops_at_end_of_turn(tiny_model_dir):
    model, tokenizer = load_model_and_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))
    assert model.config.hidden_size == 64
    stop_ids = end_of_turn_token_ids(tokenizer)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in stop_ids


def test_missing_chat_template_is_an_error_not_a_default(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    tokenizer.chat_template = None
    with pytest.raises(UserError, match=r"model\.chat_template"):
        apply_chat_template_setting(tokenizer, None, source="x")
    apply_chat_template_setting(tokenizer, "llama3", source="x")
    assert "<|start_header_id|>" in tokenizer.chat_template


def test_local_path_that_does_not_exist_is_named(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        resolve_model_dir(ModelConfig(name_or_path=str(tmp_path / "nope")))


def test_offline_hub_id_error_names_the_id(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(UserError, match="some-org/some-model"):
        resolve_model_dir(ModelConfig(name_or_path="some-org/some-model"))
