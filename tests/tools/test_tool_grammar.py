"""The pieces of constrained tool calls without a server: the call format read off a template, and the llguidance
grammar token by token over Qwen's real tokenizer (where `<tool_call>` is one special token)."""

from __future__ import annotations

import pytest

from tool_helpers import TOOLS

# Llama 3.1's way of writing a call (bare JSON under `parameters`), cut down to what `call_format` renders.
LLAMA31_LIKE = (
    "{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\n{{ tools | tojson }}<|eot_id|>{%- endif %}"
    "{%- for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
    "{%- if m.tool_calls %}{%- for tc in m.tool_calls %}"
    '{"name": "{{ tc.function.name }}", "parameters": {{ tc.function.arguments | tojson }}}'
    "{%- endfor %}{%- else %}{{ m.content }}{%- endif %}<|eot_id|>{%- endfor %}"
    "{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{%- endif %}"
)


def test_call_format_is_read_off_the_template(qwen_tools_tokenizer, tiny_model_dir):
    from transformers import AutoTokenizer

    from domaintune.model.tools import call_format

    assert call_format(qwen_tools_tokenizer, ["<|im_end|>"]) == ("<tool_call>\n", "\n</tool_call>", "arguments")
    llama = AutoTokenizer.from_pretrained(tiny_model_dir)
    llama.chat_template = LLAMA31_LIKE
    assert call_format(llama, ["<|eot_id|>"]) == ("", "", "parameters")
    llama.chat_template = LLAMA31_LIKE.replace('"parameters"', '"params"')
    with pytest.raises(ValueError, match="none of `arguments`, `parameters`"):
        call_format(llama, ["<|eot_id|>"])


def _body(tool_choice):
    from domaintune.serve.protocol import ChatBody

    return ChatBody(model="m", messages=[{"role": "user", "content": "hi"}], tools=TOOLS, tool_choice=tool_choice)


def _fed(guide, tokenizer, text: str) -> int:
    """How many of the text's tokens the guide takes, each checked against its mask first."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    for n, token in enumerate(ids):
        if not guide.allowed(len(tokenizer))[token]:
            return n
        guide.advance(token)
    return len(ids)


def test_the_grammar_takes_a_valid_call_and_nothing_else(qwen_tools_tokenizer):
    from domaintune.serve.engines.guided import Guide
    from domaintune.serve.tools import forced_call_grammar

    tok = qwen_tools_tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    assert forced_call_grammar(tok, [end], _body("auto")) is None
    assert forced_call_grammar(tok, [end], _body(None)) is None
    required = forced_call_grammar(tok, [end], _body("required"))
    assert required is not None and "<[151657]>" in required.lark  # `<tool_call>`: the special token itself

    call = '<tool_call>\n{"name": "return_policy", "arguments": {"category": "shoes"}}\n</tool_call>'
    guide = Guide(required, tok, [end])
    assert guide.allowed(len(tok)).sum() == 1  # the call opens with `<tool_call>`: one token allowed
    assert _fed(guide, tok, call) == len(tok(call, add_special_tokens=False)["input_ids"])
    after = guide.allowed(len(tok) + 100)  # a model's padded vocabulary: the extra rows are never allowed
    assert after.nonzero()[0].tolist() == [end]  # the call is complete: only the end of the turn
    guide.advance(end)

    # an enum value outside the schema, a key it does not name, prose: refused where they start
    for bad in (
        '<tool_call>\n{"name": "return_policy", "arguments": {"category": "toys"}}',
        '<tool_call>\n{"name": "return_policy", "arguments": {"category": "shoes", "x": 1}}',
        "Sure, I can help with that.",
    ):
        guide = Guide(required, tok, [end])
        taken = _fed(guide, tok, bad)
        assert taken < len(tok(bad, add_special_tokens=False)["input_ids"]), bad
    with pytest.raises(ValueError, match="breaks the tool-call grammar"):
        Guide(required, tok, [end]).advance(tok("Sure", add_special_tokens=False)["input_ids"][0])

    named = forced_call_grammar(tok, [end], _body({"type": "function", "function": {"name": "lookup_order"}}))
    guide = Guide(named, tok, [end])
    assert _fed(guide, tok, call) < len(tok(call, add_special_tokens=False)["input_ids"])  # another function
    ok = '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A1"}}\n</tool_call>'
    assert _fed(Guide(named, tok, [end]), tok, ok) == len(tok(ok, add_special_tokens=False)["input_ids"])

    thinking = forced_call_grammar(tok, [end], _body("required"), thinking=True)
    assert _fed(Guide(thinking, tok, [end]), tok, "</think>\n\n" + call) == len(
        tok("</think>\n\n" + call, add_special_tokens=False)["input_ids"]
    )


def test_mistral_v3_calls_are_constrained_in_their_own_format(mistral_tools_dir):
    """Mistral's v3 template writes calls as `[TOOL_CALLS] [{...}]`; the grammar writes one call that way, with
    `[TOOL_CALLS]` as its special token, and the parser reads it back."""
    from transformers import AutoTokenizer

    from domaintune.model.loader import end_of_turn_token_ids
    from domaintune.model.tools import call_format, parse_tool_calls
    from domaintune.serve.engines.guided import Guide, ll_tokenizer
    from domaintune.serve.engines.transformers import IncrementalText
    from domaintune.serve.tools import forced_call_grammar

    tok = AutoTokenizer.from_pretrained(mistral_tools_dir)
    eot = end_of_turn_token_ids(tok)
    prefix, suffix, key = call_format(tok, [tok.convert_ids_to_tokens(i) for i in eot])
    assert (prefix.strip(), suffix, key) == ("[TOOL_CALLS] [", "]", "arguments")
    grammar = forced_call_grammar(tok, eot, _body({"type": "function", "function": {"name": "lookup_order"}}))
    assert f"<[{tok.convert_tokens_to_ids('[TOOL_CALLS]')}]>" in grammar.lark
    call = prefix + '{"name": "lookup_order", "arguments": {"order_id": "A1"}}' + suffix
    # the tokens a model would write (SentencePiece's HF encoding doubles the space after a special token)
    ids = ll_tokenizer(tok, eot).tokenize_str(call)
    guide = Guide(grammar, tok, eot)
    for token in ids:
        assert guide.allowed(len(tok))[token]
        guide.advance(token)
    assert set(guide.allowed(len(tok)).nonzero()[0].tolist()) <= set(eot)
    text = IncrementalText(tok, [])  # the answer text the engines build from them
    for token in ids:
        text.add(token)
    _, calls = parse_tool_calls(text.text, {"lookup_order"})
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("lookup_order", '{"order_id": "A1"}')
    ]
