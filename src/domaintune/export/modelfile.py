"""The Ollama `Modelfile` beside the GGUF files: TEMPLATE and stop tokens taken from the GGUF itself.

The Go template is the GGUF's chat template translated (ChatML and Llama-3 are recognised; anything
else needs `export.ollama_template`). SYSTEM is the training data's system prompt, else the default
system prompt the chat template inserts by itself (SmolLM2 does), rendered by llama.cpp's formatter.
"""

from __future__ import annotations

from collections.abc import Callable

from domaintune.errors import UserError

_OLLAMA_CHATML = (
    "{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
    "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
    "<|im_start|>assistant\n"
)
_OLLAMA_LLAMA3 = (
    "{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
    "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
    "<|start_header_id|>assistant<|end_header_id|>\n\n"
)

Render = Callable[[list[dict[str, str]]], str | None]


def default_system_prompt(render: Render | None, start: str, end: str) -> str | None:
    """The system prompt a chat template inserts when the conversation has none."""
    if render is None:
        return None
    rendered = render([{"role": "user", "content": "XyZzY"}]) or ""
    head = rendered.split("XyZzY", 1)[0]
    marker = f"{start}system"
    if marker not in head:
        return None
    body = head.split(marker, 1)[1].split(end, 1)[0]
    return body.strip("\n") or None


def ollama_modelfile(
    gguf_name: str,
    chat_template: str,
    stop_tokens: list[str],
    template: str | None = None,
    parameters: dict | None = None,
    system: str | None = None,
    render: Render | None = None,
) -> str:
    """A Modelfile whose TEMPLATE is `chat_template` (the GGUF's) in Ollama's Go-template form."""
    default_system = None
    stops = list(dict.fromkeys(stop_tokens))
    if template is None:
        if "<|im_start|>" in chat_template:
            template = _OLLAMA_CHATML
            default_system = default_system_prompt(render, "<|im_start|>", "<|im_end|>")
            stops += [] if "<|im_start|>" in stops else ["<|im_start|>"]  # a model that starts a new turn
        elif "<|start_header_id|>" in chat_template:
            template = _OLLAMA_LLAMA3
            default_system = default_system_prompt(render, "<|start_header_id|>", "<|eot_id|>")
        else:
            raise UserError(
                "export.ollama_template: the GGUF's chat template is neither ChatML nor Llama-3; "
                "give the Go template for the Modelfile in export.ollama_template"
            )
    system = system or default_system
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{template}"""', ""]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for token in stops:
        lines.append(f'PARAMETER stop "{token}"')
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"
