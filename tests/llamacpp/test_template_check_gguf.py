"""`domaintune template check` also reads the chat template stored in an exported GGUF (rendered by llama.cpp) and
fails, naming the GGUF file, where it would render a different prompt than training did."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from domaintune.cli import app

pytestmark = pytest.mark.usefixtures("llamacpp_ready")


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, tiny_model_dir) -> Path:
    """The tiny Llama as an f16 GGUF, with its own chat template (SmolLM2's), converted by llama.cpp."""
    from domaintune.llamacpp.tools import convert_hf

    return convert_hf(tiny_model_dir, tmp_path_factory.mktemp("gguf") / "t-f16.gguf", "f16")


def _run_with_gguf(tmp_path: Path, model_dir: Path, gguf: Path, chat_template: str | None = None) -> Path:
    """A run folder as training and export leave it: model/ holds the tokenizer with the training template,
    export/gguf/ the GGUF (a link: the file is only read)."""
    from transformers import AutoTokenizer

    from domaintune.model.loader import apply_chat_template_setting

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    apply_chat_template_setting(tokenizer, chat_template, source=str(model_dir))
    tokenizer.save_pretrained(tmp_path / "run" / "model")
    (tmp_path / "run" / "export" / "gguf").mkdir(parents=True)
    (tmp_path / "run" / "export" / "gguf" / gguf.name).symlink_to(gguf)
    model = {"name_or_path": str(model_dir), **({"chat_template": chat_template} if chat_template else {})}
    config = tmp_path / "p.yaml"
    config.write_text(yaml.safe_dump({"name": "t", "output_dir": "run", "model": model}), encoding="utf-8")
    return config


def _check(config: Path):
    return CliRunner().invoke(app, ["template", "check", str(config)], env={"COLUMNS": "200"})


def test_template_check_reads_the_exported_gguf_and_passes_when_it_matches(tmp_path, tiny_model_dir, tiny_gguf):
    result = _check(_run_with_gguf(tmp_path, tiny_model_dir, tiny_gguf))
    assert result.exit_code == 0, result.output
    assert "same    export/gguf/t-f16.gguf" in result.output
    assert "one template everywhere" in result.output


def test_template_check_names_the_gguf_that_would_render_differently(tmp_path, tiny_model_dir, tiny_gguf):
    # Trained with model.chat_template: alpaca, but the GGUF was exported with the model's own template.
    result = _check(_run_with_gguf(tmp_path, tiny_model_dir, tiny_gguf, chat_template="alpaca"))
    assert result.exit_code == 2, result.output
    assert "DIFFERS export/gguf/t-f16.gguf" in result.output
    assert "GGUF template renders a different prompt than transformers" in result.output
    assert (
        "chat template differs from the one training used" in result.output
        and "export/gguf/t-f16.gguf" in (result.output.split("chat template differs")[1])
    )
    # Every other place renders the training template: only the GGUF is named.
    assert "DIFFERS model: section" not in result.output
