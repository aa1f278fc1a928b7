"""Reading tool calls back out of generated text, and scoring them against the expected calls."""

from __future__ import annotations

import json

from domaintune.eval.metrics import tool_call_scores
from domaintune.model.tools import calls_text, parse_tool_calls, render_prompt, with_tools_header
from tool_helpers import TOOLS

EXPECTED = [{"id": "c", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "A7"}'}}]


def test_qwen_hermes_tags_with_text_around_and_several_calls():
    text = 'Let me check.\n<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A7"}}\n</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("lookup_order", {"order_id": "A7"})
    ]
    two = calls_text(EXPECTED + [{"function": {"name": "return_policy", "arguments": {"category": "shoes"}}}])
    assert [c["function"]["name"] for c in parse_tool_calls(two)[1]] == ["lookup_order", "return_policy"]
    assert parse_tool_calls(two)[0] is None
    # an unclosed last tag (generation stopped at the end-of-turn token before </tool_call>) still parses
    assert parse_tool_calls('<tool_call>\n{"name": "lookup_order", "arguments": {}}')[1]


def test_llama31_json_and_what_is_not_a_call():
    content, calls = parse_tool_calls('<|python_tag|>{"name": "lookup_order", "parameters": {"order_id": "A7"}}')
    assert content is None and json.loads(calls[0]["function"]["arguments"]) == {"order_id": "A7"}
    for text in (
        "Your order has shipped.",
        '{"status": "shipped"}',  # JSON, but no function name
        '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": </tool_call>',  # broken JSON
        '<tool_call>\n{"name": "lookup_order", "arguments": "not an object"}\n</tool_call>',
    ):
        assert parse_tool_calls(text) == (text, []), text
    # a call to a function the request did not offer stays text
    call = calls_text(EXPECTED)
    assert parse_tool_calls(call, {"return_policy"}) == (call, [])


def test_tool_call_scores():
    exact = calls_text(EXPECTED)
    assert tool_call_scores(exact, EXPECTED) == {
        "tool_json_valid": 100.0,
        "tool_name_acc": 100.0,
        "tool_args_exact": 100.0,
    }
    wrong_args = exact.replace("A7", "A8")
    assert tool_call_scores(wrong_args, EXPECTED) == {
        "tool_json_valid": 100.0,
        "tool_name_acc": 100.0,
        "tool_args_exact": 0.0,
    }
    # argument order and spacing do not matter, JSON equality does
    spaced = '<tool_call>{"arguments":{"order_id":"A7"},"name":"lookup_order"}</tool_call>'
    assert tool_call_scores(spaced, EXPECTED)["tool_args_exact"] == 100.0
    assert tool_call_scores("I cannot look that up.", EXPECTED) == {
        "tool_json_valid": 0.0,
        "tool_name_acc": 0.0,
        "tool_args_exact": 0.0,
    }
    broken = '<tool_call>{"name": "lookup_order", "arguments": {"order_id": "A7"</tool_call>'
    assert tool_call_scores(broken, EXPECTED)["tool_json_valid"] == 0.0


def test_a_prompt_with_a_tools_header_renders_the_tools(qwen_tools_tokenizer):
    prompt = with_tools_header([{"role": "user", "content": "Where is A7?"}], TOOLS)
    text = render_prompt(qwen_tools_tokenizer, prompt)
    assert "<tools>" in text and '"name": "return_policy"' in text and text.endswith("<|im_start|>assistant\n")
    plain = render_prompt(qwen_tools_tokenizer, [{"role": "user", "content": "Where is A7?"}])
    assert "<tools>" not in plain


def _named(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_mistral_v3_tool_calls_list():
    """Mistral's v3 templates (Mistral-7B-Instruct-v0.3): `[TOOL_CALLS]` then one JSON list of calls."""
    text = (
        'Let me check.[TOOL_CALLS] [{"name": "lookup_order", "arguments": {"order_id": "A7"}, "id": "a1b2c3d4e"}, '
        '{"name": "return_policy", "arguments": {"category": "shoes"}}]'
    )
    content, calls = parse_tool_calls(text, {"lookup_order", "return_policy"})
    assert content == "Let me check."
    assert _named(calls) == [("lookup_order", {"order_id": "A7"}), ("return_policy", {"category": "shoes"})]
    assert [c["id"] for c in calls] == ["a1b2c3d4e", "call_1"]  # the model's id is kept when it wrote one
    content, calls = parse_tool_calls('[TOOL_CALLS] [{"name": "lookup_order", "arguments": {"order_id": "A7"}}]')
    assert content is None and _named(calls) == [("lookup_order", {"order_id": "A7"})]


def test_mistral_v11_tool_calls_each_after_its_marker():
    """Mistral's v11+ templates (Mistral Small 3.1+, Magistral): `[TOOL_CALLS]name[ARGS]{...}` per call."""
    text = (
        'Checking both.[TOOL_CALLS]lookup_order[ARGS]{"order_id": "A7"}'
        '[TOOL_CALLS]return_policy[ARGS]{"category": "shoes"}'
    )
    content, calls = parse_tool_calls(text, {"lookup_order", "return_policy"})
    assert content == "Checking both."
    assert _named(calls) == [("lookup_order", {"order_id": "A7"}), ("return_policy", {"category": "shoes"})]
    assert [c["id"] for c in calls] == ["call_0", "call_1"]
    # with a call id, and with `[ARGS]` dropped (a decoder that skips it as a special token)
    _, calls = parse_tool_calls('[TOOL_CALLS]lookup_order[CALL_ID]x9Y8z7W6v[ARGS]{"order_id": "A7"}')
    assert calls[0]["id"] == "x9Y8z7W6v" and _named(calls) == [("lookup_order", {"order_id": "A7"})]
    assert _named(parse_tool_calls('[TOOL_CALLS]lookup_order{"order_id": "A7"}')[1]) == [
        ("lookup_order", {"order_id": "A7"})
    ]


def test_mistral_calls_that_do_not_parse_stay_text():
    for text in (
        '[TOOL_CALLS] [{"name": "lookup_order", "arguments": {"order_id": ]',  # v3, broken JSON
        'Sure.[TOOL_CALLS]lookup_order[ARGS]{"order_id": ',  # v11, cut off
        '[TOOL_CALLS]lookup_order[ARGS]{"order_id": "A7"}[TOOL_CALLS]return_policy[ARGS]["shoes"]',  # not an object
        '[TOOL_CALLS] [{"arguments": {"order_id": "A7"}}]',  # no name
        "[TOOL_CALLS]",
    ):
        assert parse_tool_calls(text) == (text, []), text
    # a call to a function the request did not offer stays text, as for the other formats
    text = '[TOOL_CALLS]lookup_order[ARGS]{"order_id": "A7"}'
    assert parse_tool_calls(text, {"return_policy"}) == (text, [])


def test_for_template_gives_mistral_call_ids():
    """Mistral's templates raise on call ids that are not 9 letters/digits: ids are mapped (a call and its result
    alike), ids that already fit are kept."""
    from domaintune.model.tools import for_template

    call = {"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "A7"}'}}
    kept = {**call, "id": "a1b2c3d4e"}
    messages = [
        {"role": "user", "content": "Where is A7?"},
        {"role": "assistant", "content": None, "tool_calls": [call, kept]},
        {"role": "tool", "tool_call_id": "call_1", "content": "shipped"},
        {"role": "tool", "tool_call_id": "a1b2c3d4e", "content": "packed"},
    ]
    out = for_template(messages)
    new_id = out[1]["tool_calls"][0]["id"]
    assert len(new_id) == 9 and new_id.isalnum() and new_id != "call_1"
    assert out[2]["tool_call_id"] == new_id and out[3]["tool_call_id"] == "a1b2c3d4e"
    assert out[1]["tool_calls"][1]["id"] == "a1b2c3d4e" and out[1]["tool_calls"][0]["function"]["arguments"] == {
        "order_id": "A7"
    }
    assert messages[2]["tool_call_id"] == "call_1"  # the input is left as it was
