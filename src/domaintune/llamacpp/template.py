"""Does a GGUF chat the way the model was trained? Template, tokens and stop token, checked through llama.cpp.

For a set of conversations (system + user, user alone, multi-turn, a finished exchange without the
generation prompt) the prompt transformers renders is compared with:

- `jinja`: the chat template stored in the GGUF, rendered with the GGUF's own bos/eos tokens by
  llama-cpp-python's Jinja2 chat formatter (what `Llama.create_chat_completion` and its server use);
- `tokens`: that prompt tokenized by llama.cpp's tokenizer against transformers' token ids;
- `builtin`: llama.cpp's C renderer (`llama_chat_apply_template`, used by llama.cpp's tools when Jinja
  is off), reported but not required: it knows a fixed list of template families and ignores extras
  such as a default system prompt.

The end-of-turn token (the special token that follows an assistant message under the template) must be
in llama.cpp's end-of-generation set, and llama.cpp's own completion loop must stop on it.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass, field
from typing import Any

from domaintune.llamacpp.runtime import GGUFModel

CONVERSATIONS: dict[str, tuple[list[dict[str, str]], bool]] = {
    "system+user": (
        [{"role": "system", "content": "You are a careful doctor."}, {"role": "user", "content": "头痛怎么办？"}],
        True,
    ),
    "user": ([{"role": "user", "content": "What helps against a fever?"}], True),
    "multi-turn": (
        [
            {"role": "system", "content": "Answer briefly."},
            {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello. How can I help?"},
            {"role": "user", "content": "Is 37.8 °C a fever?"},
        ],
        True,
    ),
    "exchange": (
        [{"role": "user", "content": "Name a vitamin."}, {"role": "assistant", "content": "Vitamin C."}],
        False,
    ),
}


@dataclass
class TemplateCheck:
    ok: bool = True
    cases: dict[str, dict[str, Any]] = field(default_factory=dict)
    eot_tokens: list[str] = field(default_factory=list)
    eot_is_eog: bool = False
    stops_in_llamacpp: bool | None = None
    problems: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "cases": self.cases,
            "eot_tokens": self.eot_tokens,
            "eot_is_eog": self.eot_is_eog,
            "stops_in_llamacpp": self.stops_in_llamacpp,
            "problems": self.problems,
        }


def hf_render(tokenizer, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def render_jinja(model: GGUFModel, messages: list[dict[str, str]], add_generation_prompt: bool) -> str | None:
    """The GGUF's own template rendered exactly as llama-cpp-python renders it for chat completions
    (its Jinja2ChatFormatter, with the bos/eos token texts of the GGUF's vocabulary)."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    template = model.chat_template()
    if template is None:
        return None
    bos, eos = model.bos_id(), model.eos_id()
    formatter = Jinja2ChatFormatter(
        template=template,
        eos_token=model.token_text(eos) if eos is not None else "",
        bos_token=model.token_text(bos) if bos is not None else "",
        add_generation_prompt=add_generation_prompt,
    )
    return formatter(messages=messages).prompt  # type: ignore[arg-type]


def render_builtin(model: GGUFModel, messages: list[dict[str, str]], add_generation_prompt: bool) -> str | None:
    """llama.cpp's C renderer (`llama_chat_apply_template`); None when it does not know the template."""
    import llama_cpp as L

    template = model.chat_template()
    if template is None:
        return None
    keep = [(m["role"].encode(), m["content"].encode()) for m in messages]
    chat = (L.llama_chat_message * len(keep))(*[L.llama_chat_message(role=r, content=c) for r, c in keep])
    size = 4096 + sum(len(c) for _, c in keep) * 2
    buf = ctypes.create_string_buffer(size)
    n = L.llama_chat_apply_template(template.encode(), chat, len(keep), add_generation_prompt, buf, size)
    if n < 0:
        return None
    if n > size:
        buf = ctypes.create_string_buffer(n + 1)
        n = L.llama_chat_apply_template(template.encode(), chat, len(keep), add_generation_prompt, buf, n + 1)
    return buf.raw[:n].decode("utf-8", "replace")


def _check_case(model: GGUFModel, tokenizer, messages, gen: bool) -> dict[str, Any]:
    try:
        expected = hf_render(tokenizer, messages, gen)
    except Exception as exc:  # a template may refuse a role layout (e.g. no system role): skip that case
        return {"skipped": f"transformers refuses this conversation: {exc}"}
    got = render_jinja(model, messages, gen)
    builtin = render_builtin(model, messages, gen)
    hf_ids = tokenizer(expected, add_special_tokens=False).input_ids
    cpp_ids = model.tokenize(expected, add_special=False, parse_special=True)
    first_diff = next((i for i, (a, b) in enumerate(zip(hf_ids, cpp_ids)) if a != b), None)
    if first_diff is None and len(hf_ids) != len(cpp_ids):
        first_diff = min(len(hf_ids), len(cpp_ids))
    return {
        "jinja_equal": got == expected,
        "tokens_equal": first_diff is None,
        "first_token_difference": first_diff,
        "builtin": "unknown template" if builtin is None else ("equal" if builtin == expected else "differs"),
        **({} if got == expected else {"expected": expected, "jinja": got}),
    }


def stops_on(model: GGUFModel, prompt: str, token: int) -> bool:
    """Whether generation ends, with nothing emitted, when `token` comes: the token is forced by a logit
    bias and the stop set is llama.cpp's own end-of-generation set (`llama_vocab_is_eog`, the test
    llama.cpp's and llama-cpp-python's generation loops apply)."""
    from domaintune.llamacpp.generate import Decoder, Sampling, generate

    decoder = Decoder(model, stop_ids=model.eog_ids(), n_seq=1, seq_ctx=1024, n_batch=1024, threads=1)
    try:
        ids = model.tokenize(prompt, add_special=False, parse_special=True)
        (seq,) = generate(decoder, [ids], Sampling(max_tokens=4, logit_bias={token: 1e4}))
    finally:
        decoder.close()
    return seq.finish_reason == "stop" and not seq.tokens


def check_template(model: GGUFModel, tokenizer, run_stop: bool = True) -> TemplateCheck:
    """Compare the GGUF's template, tokens and end-of-turn handling with the transformers tokenizer's."""
    from domaintune.model.loader import end_of_turn_token_ids

    check = TemplateCheck()
    if model.chat_template() is None:
        check.ok = False
        check.problems.append("the GGUF has no chat template (tokenizer.chat_template)")
        return check
    if model.chat_template() != tokenizer.chat_template:
        check.problems.append("the GGUF's chat template text differs from the tokenizer's")
    for name, (messages, gen) in CONVERSATIONS.items():
        case = _check_case(model, tokenizer, messages, gen)
        check.cases[name] = case
        if "skipped" in case:
            continue
        if not case["jinja_equal"]:
            check.problems.append(f"{name}: the GGUF template renders a different prompt than transformers")
        if not case["tokens_equal"]:
            check.problems.append(
                f"{name}: llama.cpp tokenizes the prompt differently (token {case['first_token_difference']})"
            )
    eot = end_of_turn_token_ids(tokenizer)[0]
    check.eot_tokens = [tokenizer.convert_ids_to_tokens(eot)]
    check.eot_is_eog = model.is_eog(eot) and model.token_text(eot) == check.eot_tokens[0]
    if not check.eot_is_eog:
        check.problems.append(f"llama.cpp does not end generation at the end-of-turn token {check.eot_tokens[0]!r}")
    if run_stop:
        prompt = hf_render(tokenizer, CONVERSATIONS["user"][0], True)
        check.stops_in_llamacpp = stops_on(model, prompt, eot)
        if not check.stops_in_llamacpp:
            check.problems.append("llama.cpp's completion loop did not stop at the end-of-turn token")
    check.ok = not check.problems
    return check
