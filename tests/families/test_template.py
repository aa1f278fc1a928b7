"""`domaintune template show` (a training example with the loss mask and the end-of-turn token) and
`domaintune template check` (one template from training to eval, export and serving), on every family."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from tests.llamacpp.families import FAMILIES
from typer.testing import CliRunner

from domaintune.cli import app

EOT = {
    "llama": "<|im_end|>",
    "qwen2": "<|im_end|>",
    "qwen3": "<|im_end|>",
    "gemma3": "<end_of_turn>",
    "mistral": "</s>",
    "phi3": "<|end|>",
}


def _trained_run(tmp_path: Path, model_dir: Path, **model_extra) -> Path:
    """A run folder whose model/ holds the tokenizer as training stores it (no weights are needed here)."""
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(model_dir).save_pretrained(tmp_path / "run" / "model")
    config = tmp_path / "p.yaml"
    model = {"name_or_path": str(model_dir), **model_extra}
    config.write_text(yaml.safe_dump({"name": "t", "output_dir": "run", "model": model}), encoding="utf-8")
    return config


def _invoke(args: list[str]):
    return CliRunner().invoke(app, args, env={"COLUMNS": "40"})


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.slow) if f in ("qwen2", "qwen3") else f for f in FAMILIES]
)
def test_template_show_marks_trained_tokens_and_names_the_end_of_turn(family, family_model, tmp_path):
    config = _trained_run(tmp_path, family_model(family))
    result = _invoke(["template", "show", str(config)])
    assert result.exit_code == 0, result.output
    assert f"end-of-turn token: {EOT[family]}" in result.output
    assert "[[" in result.output and "]]" in result.output
    assert "stored at training time" in result.output
    check = _invoke(["template", "check", str(config)])
    assert check.exit_code == 0, check.output
    assert "one template everywhere" in check.output


def test_template_check_fails_loudly_when_serving_would_render_differently(family_model, tmp_path):
    config = _trained_run(tmp_path, family_model("gemma3"))
    changed = yaml.safe_load(config.read_text())
    changed["model"]["chat_template"] = "chatml"  # set after training: eval/serve of the base would drift
    config.write_text(yaml.safe_dump(changed), encoding="utf-8")
    result = _invoke(["template", "check", str(config)])
    assert result.exit_code == 2, result.output
    assert "DIFFERS" in result.output and "chat template differs" in result.output
