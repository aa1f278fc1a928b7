"""The Modelfile's Go templates render, through Go's own text/template with Ollama's semantics
(tests/export/ollama_render/main.go), exactly what transformers renders with the chat template (minus BOS)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from domaintune.errors import UserError
from domaintune.export.modelfile import OLLAMA_FAMILIES, ollama_family, ollama_modelfile
from domaintune.model.loader import NAMED_CHAT_TEMPLATES

RENDERER = Path(__file__).parent / "ollama_render" / "main.go"
SYSTEM = "You are a physician. Answer briefly."
CONVERSATIONS = {
    "user": [{"role": "user", "content": "头痛发热两天，怎么办？"}],
    "system-user": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is a fever?"}],
    "system-user-assistant-user": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is a fever?"},
        {"role": "assistant", "content": "A body temperature above 38 °C."},
        {"role": "user", "content": "And a high one?"},
    ],
    "user-assistant-user": [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Line one\nline two"},
    ],
}
# family -> the chat template transformers renders (None: the SmolLM2 tokenizer's own, ChatML with a default system)
TEMPLATES = {"chatml": None, "llama3": NAMED_CHAT_TEMPLATES["llama3"], "gemma": NAMED_CHAT_TEMPLATES["gemma"]}


@pytest.fixture(scope="session")
def ollama_render(tmp_path_factory) -> Path:
    """The Go renderer, built once per session."""
    go = shutil.which("go")
    if go is None:
        pytest.skip(
            "Go is not installed (apt-get install golang-go): the Ollama templates are checked by Go's text/template"
        )
    tmp = tmp_path_factory.mktemp("ollama-render")
    env = {**os.environ, "GOCACHE": str(tmp / "cache"), "HOME": str(tmp), "GOFLAGS": "", "GO111MODULE": "off"}
    subprocess.run([go, "build", "-o", str(tmp / "ollama_render"), str(RENDERER)], check=True, env=env, timeout=300)
    return tmp / "ollama_render"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def go_render(binary: Path, template: str, system: str | None, messages: list[dict]) -> str:
    template_file = binary.parent / "template.gotmpl"
    template_file.write_text(template, encoding="utf-8")
    request = json.dumps({"system": system or "", "messages": messages})
    done = subprocess.run([str(binary), str(template_file)], input=request, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def hf_render(tokenizer, chat_template: str | None, messages: list[dict], **kwargs) -> str:
    template = chat_template or tokenizer.chat_template
    kwargs = kwargs or {"add_generation_prompt": True}
    text = tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)
    if "bos_token" in template:  # Ollama adds BOS itself (the GGUF's add_bos_token)
        assert text.startswith(tokenizer.bos_token)
        text = text.removeprefix(tokenizer.bos_token)
    return text


def modelfile_parts(tokenizer, chat_template: str | None, system: str | None = None) -> tuple[str, str | None]:
    """TEMPLATE and SYSTEM of the Modelfile export writes for this chat template."""
    template = chat_template or tokenizer.chat_template
    text = ollama_modelfile(
        "m.gguf",
        template,
        [],
        system=system,
        render=lambda messages: hf_render(tokenizer, template, messages, add_generation_prompt=False),
    )
    found = re.search(r'^TEMPLATE """(.*?)"""$', text, re.S | re.M)
    assert found, text
    sys_found = re.search(r'^SYSTEM """(.*?)"""$', text, re.S | re.M)
    return found.group(1), sys_found.group(1) if sys_found else None


@pytest.mark.parametrize("family", sorted(TEMPLATES))
@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_go_template_renders_what_transformers_renders(ollama_render, tokenizer, family, name):
    chat_template = TEMPLATES[family]
    assert ollama_family(chat_template or tokenizer.chat_template) == family
    template, default_system = modelfile_parts(tokenizer, chat_template)
    messages = CONVERSATIONS[name]
    expected = hf_render(tokenizer, chat_template, messages)
    assert go_render(ollama_render, template, default_system, messages) == expected


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_modelfile_system_prompt_renders_as_a_system_message(ollama_render, tokenizer, family):
    """Ollama prepends the Modelfile's SYSTEM as a system message; Gemma merges it into the first user turn."""
    chat_template = TEMPLATES[family]
    template, system = modelfile_parts(tokenizer, chat_template, system=SYSTEM)
    assert system == SYSTEM
    messages = CONVERSATIONS["user-assistant-user"]
    expected = hf_render(tokenizer, chat_template, [{"role": "system", "content": SYSTEM}, *messages])
    rendered = go_render(ollama_render, template, system, messages)
    assert rendered == expected
    assert rendered.count(SYSTEM) == 1


@pytest.mark.parametrize("family", sorted(TEMPLATES))
def test_a_last_assistant_message_is_continued_not_closed(ollama_render, tokenizer, family):
    """Ollama's prefill: the last assistant message stays open, as transformers' continue_final_message."""
    chat_template = TEMPLATES[family]
    template, default_system = modelfile_parts(tokenizer, chat_template)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello, I"}]
    expected = hf_render(tokenizer, chat_template, messages, continue_final_message=True)
    assert go_render(ollama_render, template, default_system, messages) == expected


def test_default_system_prompt_is_smollm2s_own(tokenizer):
    _, system = modelfile_parts(tokenizer, None)
    assert system and "SmolLM" in system
    assert modelfile_parts(tokenizer, NAMED_CHAT_TEMPLATES["gemma"])[1] is None


def test_stop_tokens_include_each_familys_end_of_turn():
    for family, (_marker, _template, _start, end, _stops) in OLLAMA_FAMILIES.items():
        text = ollama_modelfile("m.gguf", NAMED_CHAT_TEMPLATES.get(family, "<|im_start|>"), ["</s>"])
        assert f'PARAMETER stop "{end}"' in text.splitlines(), family
        assert 'PARAMETER stop "</s>"' in text.splitlines()


def test_an_unknown_chat_template_names_both_keys():
    with pytest.raises(UserError, match=r"export\.ollama_template.*export\.modelfile: false"):
        ollama_modelfile("m.gguf", NAMED_CHAT_TEMPLATES["alpaca"], ["</s>"])


def test_gemma3s_own_tokenizer_renders_the_same(ollama_render):
    """The real Gemma 3 tokenizer (BOS `<bos>`), where the optional gemma3-270m model has been prepared."""
    from transformers import AutoTokenizer

    folder = Path.home() / ".cache" / "domaintune" / "models" / "gemma3-270m"
    if not (folder / "chat_template.jinja").is_file():
        pytest.skip(f"{folder} not prepared (model.name_or_path: gemma3-270m, optional package)")
    gemma = AutoTokenizer.from_pretrained(folder)
    template, system = modelfile_parts(gemma, None, system=SYSTEM)
    for messages in CONVERSATIONS.values():
        with_system = (
            messages if messages[0]["role"] == "system" else [{"role": "system", "content": SYSTEM}, *messages]
        )
        assert go_render(ollama_render, template, system, messages) == hf_render(gemma, None, with_system)
