"""Export fails before building anything when the Modelfile's TEMPLATE cannot be translated from the chat template."""

from __future__ import annotations

import json
import shutil

import pytest

from domaintune.config import config_from_dict
from domaintune.errors import UserError
from domaintune.layout import RunLayout


class BuildStartedError(Exception):
    """Raised where export starts building (loading the trained model)."""


@pytest.fixture
def run_dir(tmp_path, tiny_model_dir, monkeypatch):
    import domaintune.export.runner as runner
    import domaintune.llamacpp as llamacpp
    import domaintune.llamacpp.tools as tools

    run = tmp_path / "run"
    shutil.copytree(tiny_model_dir, run / "model")
    (run / "data").mkdir()
    row = {"id": "1", "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    for split in ("val", "test"):
        (run / "data" / f"{split}.jsonl").write_text(json.dumps(row) + "\n", encoding="utf-8")
    monkeypatch.setattr(llamacpp, "unavailable_reason", lambda: None)
    monkeypatch.setattr(llamacpp, "converter_unavailable_reason", lambda: None)
    monkeypatch.setattr(tools, "check_convertible", lambda source: None)

    def built(*args, **kwargs):
        raise BuildStartedError

    monkeypatch.setattr(runner, "_load_trained", built)
    return run


def _cfg(run, chat_template=None, **export):
    model = {"name_or_path": "tiny-random-llama", **({"chat_template": chat_template} if chat_template else {})}
    settings = {"gguf": ["q8_0"], "int8": False, **export}
    return config_from_dict({"name": "tiny", "output_dir": str(run), "model": model, "export": settings})


def test_an_untranslatable_chat_template_fails_before_anything_is_built(run_dir):
    from domaintune.export.runner import run_export

    with pytest.raises(UserError, match=r"export\.ollama_template: model\.chat_template is not ChatML") as info:
        run_export(_cfg(run_dir, "alpaca"), RunLayout(run_dir))
    assert "export.modelfile: false" in str(info.value)
    assert not (run_dir / "export").exists()


def test_the_stored_chat_template_is_checked_too(run_dir):
    from domaintune.export.runner import run_export

    (run_dir / "model" / "chat_template.jinja").write_text("{{ messages[0]['content'] }}", encoding="utf-8")
    config = json.loads((run_dir / "model" / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (run_dir / "model" / "tokenizer_config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"export\.ollama_template: .*model's chat template is not ChatML"):
        run_export(_cfg(run_dir), RunLayout(run_dir))


@pytest.mark.parametrize(
    ("chat_template", "export"),
    [
        ("alpaca", {"ollama_template": "{{ .Prompt }}"}),
        ("alpaca", {"modelfile": False}),
        ("alpaca", {"gguf": []}),
        ("gemma", {}),
        ("llama3", {}),
        (None, {}),  # the tiny model's SmolLM2 tokenizer: ChatML
    ],
)
def test_a_translatable_or_configured_template_goes_on_to_build(run_dir, chat_template, export):
    from domaintune.export.runner import run_export

    with pytest.raises(BuildStartedError):
        run_export(_cfg(run_dir, chat_template, **export), RunLayout(run_dir))
