"""The Ollama `Modelfile` beside the GGUF files: TEMPLATE and stop tokens taken from the GGUF itself.

The Go template is the GGUF's chat template translated: ChatML, Llama-3 and Gemma are recognised
(`ollama_family`); anything else needs `export.ollama_template` (or `export.modelfile: false`), and
export checks that before building anything. SYSTEM is the training data's system prompt, else the
default system prompt the chat template inserts by itself (SmolLM2 does), rendered by llama.cpp's formatter.

The templates follow Ollama's semantics (ollama/template/template.go, `collate` and `Execute`): system
messages stay in `.Messages` and are also joined into `.System`, so a template renders either the system
messages of `.Messages` (ChatML, Llama-3) or `.System` (Gemma, which merges it into the first user turn),
never both. Ollama prepends the Modelfile's SYSTEM as a system message when a conversation has none. The
generation prompt follows the last message unless that is the assistant's, which is then left open for
the model to continue (Ollama's prefill). tests/export/ollama_render renders them with Go's text/template.
"""

from __future__ import annotations

from collections.abc import Callable

from domaintune.errors import UserError

_LAST = "{{- $last := eq (len (slice $.Messages $i)) 1 }}"


def _turns(head: str, end: str, generation: str, role: str = "{{ .Role }}") -> str:
    """Every message as `head(role) content end`; the last assistant turn open; else the generation prompt."""
    return (
        "{{- range $i, $_ := .Messages }}" + _LAST + head.replace("ROLE", role) + "{{ .Content }}"
        '{{ if or (not $last) (ne .Role "assistant") }}' + end + "{{ end }}"
        '{{ if and $last (ne .Role "assistant") }}' + generation + "{{ end }}"
        "{{- end }}"
    )


_OLLAMA_CHATML = _turns("<|im_start|>ROLE\n", "<|im_end|>\n", "<|im_start|>assistant\n")
_OLLAMA_LLAMA3 = _turns(
    "<|start_header_id|>ROLE<|end_header_id|>\n\n", "<|eot_id|>", "<|start_header_id|>assistant<|end_header_id|>\n\n"
)
# Gemma: no system turn; `.System` (every system message, joined) opens the first user turn.
_OLLAMA_GEMMA = (
    "{{- $first := true }}{{- range $i, $_ := .Messages }}" + _LAST + '{{- if eq .Role "user" }}<start_of_turn>user\n'
    "{{ if and $first $.System }}{{ $.System }}\n\n{{ end }}{{ $first = false }}{{ .Content }}<end_of_turn>\n"
    '{{ else if eq .Role "assistant" }}<start_of_turn>model\n{{ .Content }}{{ if not $last }}<end_of_turn>\n{{ end }}'
    "{{ end }}"
    '{{ if and $last (ne .Role "assistant") }}<start_of_turn>model\n{{ end }}'
    "{{- end }}"
)

# family -> (marker in the chat template, Go template, turn start, turn end, stop tokens always added)
OLLAMA_FAMILIES: dict[str, tuple[str, str, str, str, list[str]]] = {
    "chatml": ("<|im_start|>", _OLLAMA_CHATML, "<|im_start|>", "<|im_end|>", ["<|im_end|>", "<|im_start|>"]),
    "llama3": ("<|start_header_id|>", _OLLAMA_LLAMA3, "<|start_header_id|>", "<|eot_id|>", ["<|eot_id|>"]),
    "gemma": ("<start_of_turn>", _OLLAMA_GEMMA, "<start_of_turn>", "<end_of_turn>", ["<end_of_turn>"]),
}
TEMPLATE_KEYS = (
    "set export.ollama_template to the Go template for the Modelfile, or export.modelfile: false to export without one"
)


def ollama_family(chat_template: str) -> str | None:
    """The family (`OLLAMA_FAMILIES`) whose Go template renders `chat_template`, or None."""
    for family, (marker, *_rest) in OLLAMA_FAMILIES.items():
        if marker in chat_template:
            return family
    return None


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
        family = ollama_family(chat_template)
        if family is None:
            raise UserError(
                "export.ollama_template: the GGUF's chat template is not ChatML, Llama-3 or Gemma; " + TEMPLATE_KEYS
            )
        _marker, template, start, end, family_stops = OLLAMA_FAMILIES[family]
        if family != "gemma":  # Gemma's template has no system turn of its own
            default_system = default_system_prompt(render, start, end)
        stops += [token for token in family_stops if token not in stops]
    system = system or default_system
    lines = [f"FROM ./{gguf_name}", "", f'TEMPLATE """{template}"""', ""]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    for token in stops:
        lines.append(f'PARAMETER stop "{token}"')
    for key, value in (parameters or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"
