"""One chat template everywhere: what training renders, and a check that eval, export and serving render the same.

The train stage saves the tokenizer (and so the template it trained with: the model's own, or
`model.chat_template`) into `model/`. Every later consumer loads it from there; `template_check` renders the
same probe conversation with each template it can find (GGUF files through llama.cpp, with the template stored
in the file) and names every place that would differ.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from domaintune.errors import UserError

PROBE = [
    {"role": "system", "content": "You are a careful assistant."},
    {"role": "user", "content": "What helps a fever?"},
    {"role": "assistant", "content": "Rest and fluids."},
    {"role": "user", "content": "And a cough?"},
]


@dataclass
class RenderedExample:
    text: str
    pieces: list[tuple[str, bool]]  # (token text, trained on: counts in the loss)
    eot_tokens: list[str]
    trained_tokens: int
    total_tokens: int

    def marked(self) -> str:
        """The rendering with trained (loss) tokens inside [[...]]; everything else is context (masked)."""
        out, inside = [], False
        for text, trained in self.pieces:
            if trained != inside:
                out.append("[[" if trained else "]]")
                inside = trained
            out.append(text)
        if inside:
            out.append("]]")
        return "".join(out)


def render_training_example(tokenizer: Any, messages: list[dict], max_length: int = 4096) -> RenderedExample:
    """Render `messages` exactly as the train stage encodes them (same function), with the loss mask."""
    from domaintune.model.loader import end_of_turn_token_ids
    from domaintune.train.dataset import IGNORE_INDEX, encode_messages

    ids, labels, _ = encode_messages(tokenizer, messages, max_length)
    pieces = [(tokenizer.decode([i]), label != IGNORE_INDEX) for i, label in zip(ids, labels)]
    eot = tokenizer.convert_ids_to_tokens(end_of_turn_token_ids(tokenizer))
    trained = sum(1 for _, t in pieces if t)
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    if not any(tokenizer.convert_ids_to_tokens(i) in eot for i, label in zip(ids, labels) if label != IGNORE_INDEX):
        raise UserError(
            f"the end-of-turn token {eot} is never trained on with this chat template: the model would not learn "
            "to stop; fix model.chat_template"
        )
    return RenderedExample(text, pieces, list(eot), trained, len(ids))


@dataclass
class TemplateCheck:
    reference: str  # where the training template came from
    renders: dict[str, str] = field(default_factory=dict)  # place -> rendered probe prompt
    differing: list[str] = field(default_factory=list)
    problems: dict[str, list[str]] = field(default_factory=dict)  # place (a GGUF) -> what llama.cpp does differently

    @property
    def ok(self) -> bool:
        return not self.differing


def _render_probe(tokenizer: Any) -> str:
    return str(tokenizer.apply_chat_template(PROBE, tokenize=False, add_generation_prompt=True))


def _folder_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def _gguf_render(path: Path, tokenizer: Any) -> tuple[str, list[str]]:
    """The probe as llama.cpp renders it with the chat template stored in the GGUF at `path`, and what
    `domaintune.llamacpp.template.check_template` finds different from `tokenizer` (the training template): the
    rendering of several conversations, their llama.cpp token ids, the end-of-turn token."""
    from domaintune.llamacpp import unavailable_reason
    from domaintune.llamacpp.runtime import GGUFModel
    from domaintune.llamacpp.template import check_template, render_jinja

    reason = unavailable_reason()
    if reason:
        raise UserError(f"{path}: cannot read the GGUF's chat template to check it: {reason}")
    model = GGUFModel(path, vocab_only=True)
    try:
        text = render_jinja(model, PROBE, add_generation_prompt=True)
        problems = check_template(model, tokenizer, run_stop=False).problems
    finally:
        model.close()
    return ("(the GGUF holds no chat template)" if text is None else text), problems


def template_check(
    model_cfg: Any, model_dir: Path, others: dict[str, Path], ggufs: dict[str, Path] | None = None
) -> TemplateCheck:
    """Render the probe with the trained model's stored template and with every other place's; list differences.

    `model_cfg` is the `model:` section (what eval of the base and serving of the base apply); `others` maps a
    place (e.g. "export/merged") to a folder holding a tokenizer; `ggufs` maps a place to an exported GGUF file,
    rendered by llama.cpp with the template stored inside it."""
    from domaintune.model.loader import load_tokenizer

    stored = _folder_tokenizer(model_dir)
    if not stored.chat_template:
        raise UserError(f"{model_dir} holds no chat template: re-run `domaintune train`")
    check = TemplateCheck(reference=str(model_dir))
    reference = _render_probe(stored)
    check.renders["model (training)"] = reference
    check.renders["model: section (eval base, serve base)"] = _render_probe(load_tokenizer(model_cfg))
    for place, folder in others.items():
        if (folder / "tokenizer_config.json").is_file():
            check.renders[place] = _render_probe(_folder_tokenizer(folder))
    for place, path in (ggufs or {}).items():
        check.renders[place], problems = _gguf_render(path, stored)
        if problems:
            check.problems[place] = problems
    check.differing = [place for place, text in check.renders.items() if text != reference or check.problems.get(place)]
    return check
