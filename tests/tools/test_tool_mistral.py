"""Mistral's tool format end to end on the tiny Mistral model of the family matrix (its real SentencePiece
tokenizer kind), given Mistral's v3 tool template and tool tokens: the template check, SFT labels, and the real
server with the official openai client, its next tokens scripted as in test_tool_serve.py."""

from __future__ import annotations

import json
import shutil

import pytest
from openai import OpenAI

from serve_helpers import scripted_server, serve_config
from tool_helpers import TOOLS, openai_row

CALL = '[TOOL_CALLS] [{"name": "lookup_order", "arguments": {"order_id": "A1001"}}]'
SCRIPTS = {
    1: CALL,
    2: "Your order A1001 has shipped.",
    3: 'One moment.[TOOL_CALLS] [{"name": "lookup_order", "arguments": {"order_id": ]',  # broken JSON
}
ASK = [{"role": "user", "content": "Where is my order A1001?"}]


def test_the_template_check_and_sft_labels(mistral_tools_dir):
    from tests.families.conftest import family_cache
    from transformers import AutoTokenizer

    from domaintune.model.tools import template_tool_problem
    from domaintune.train.dataset import IGNORE_INDEX, encode_rows

    tok = AutoTokenizer.from_pretrained(mistral_tools_dir)
    assert template_tool_problem(tok) is None
    # the family's own template (Mistral-7B-Instruct-v0.2's) has no tool branches: refused, not silently dropped
    assert "fails on a conversation with tool calls" in template_tool_problem(
        AutoTokenizer.from_pretrained(family_cache() / "mistral")
    )
    [example], _stats = encode_rows(tok, [openai_row(1)], 1024)
    ids, labels = example["input_ids"], example["labels"]
    text = tok.decode(ids)
    assert "[AVAILABLE_TOOLS]" in text and '"name": "lookup_order"' in text and "[TOOL_RESULTS]" in text
    learned = tok.decode([i for i, lab in zip(ids, labels, strict=True) if lab != IGNORE_INDEX])
    assert learned.startswith("[TOOL_CALLS]") and '"arguments": {"order_id": "A1001"}' in learned
    assert "has shipped (answer 1)." in learned and "[AVAILABLE_TOOLS]" not in learned
    assert "[TOOL_RESULTS]" not in learned  # the tool's result is context, not a target


@pytest.fixture(scope="module")
def server(tmp_path_factory, mistral_tools_dir):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serve_mistral_tools")
    model_dir = root / "mistral-tools"
    shutil.copytree(mistral_tools_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(model_dir)
    scripts = {s: tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for s, text in SCRIPTS.items()}
    assert tok.convert_tokens_to_ids("[TOOL_CALLS]") in scripts[1]  # the model "writes" the special token
    serve = {"max_context_tokens": 2048, "max_tokens_cap": 128}
    with scripted_server(serve_config(root / "run", serve, model={"name_or_path": str(model_dir)}), scripts) as srv:
        yield srv


def test_mistral_calls_through_the_server(server):
    c = OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)
    model = c.models.list().data[0].id
    r = c.chat.completions.create(model=model, messages=ASK, tools=TOOLS, seed=1, max_tokens=96)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.function.name == "lookup_order" and json.loads(call.function.arguments) == {"order_id": "A1001"}
    # the client sends the call (its id is not Mistral's 9 letters/digits) and its result back: plain answer
    follow_up = ASK + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'},
    ]
    follow = c.chat.completions.create(model=model, messages=follow_up, tools=TOOLS, seed=2, max_tokens=64)
    assert follow.choices[0].finish_reason == "stop"
    assert follow.choices[0].message.content == SCRIPTS[2] and not follow.choices[0].message.tool_calls
    assert follow.usage.prompt_tokens > r.usage.prompt_tokens + 10  # the call and its result were in the prompt
    # streamed, the call arrives as a tool_calls delta
    chunks = list(c.chat.completions.create(model=model, messages=ASK, tools=TOOLS, seed=1, stream=True, max_tokens=96))
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "lookup_order")]
    # a call whose JSON is broken comes back as the text the model wrote, marker included
    broken = c.chat.completions.create(model=model, messages=ASK, tools=TOOLS, seed=3, max_tokens=96)
    assert broken.choices[0].finish_reason == "stop" and not broken.choices[0].message.tool_calls
    assert broken.choices[0].message.content == SCRIPTS[3]


def test_a_preference_pair_with_a_call_renders_in_mistrals_format(mistral_tools_dir):
    """What dpo/kto/reward hand trl (train/preference/tool_rows.py): Mistral's template renders the tools before
    the user turn and the chosen call as `[TOOL_CALLS] [...]`, its OpenAI-style id mapped to 9 letters/digits."""
    from transformers import AutoTokenizer

    from domaintune.model.tools import parse_tool_calls
    from domaintune.train.preference.tool_rows import ToolRows

    tok = AutoTokenizer.from_pretrained(mistral_tools_dir)
    call = {"id": "call_1", "type": "function", "function": {"name": "lookup_order", "arguments": '{"order_id": "A1"}'}}
    pair = {
        "prompt": ASK,
        "chosen": [{"role": "assistant", "content": None, "tool_calls": [call]}],
        "rejected": [{"role": "assistant", "content": "No idea."}],
        "tools": TOOLS,
    }
    row = ToolRows(tok)(pair, "pairs.jsonl:1")
    tools = json.loads(row["tools"])
    prompt = tok.apply_chat_template(row["prompt"], tools=tools, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(row["prompt"] + row["chosen"], tools=tools, tokenize=False)
    assert prompt.startswith("<s>[AVAILABLE_TOOLS] [") and prompt.endswith("[INST] Where is my order A1001?[/INST]")
    chosen = full[len(prompt) :]
    assert chosen.startswith('[TOOL_CALLS] [{"name": "lookup_order", "arguments": {"order_id": "A1"}, "id": "')
    _, calls = parse_tool_calls(chosen.removesuffix("</s>"))  # and the parser reads it back
    assert [c["function"]["name"] for c in calls] == ["lookup_order"] and len(calls[0]["id"]) == 9
