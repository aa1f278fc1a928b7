"""Tool calls through the server: the official openai client against a real server on loopback, the tiny Qwen2 model
with Qwen2.5's tool template, and its next tokens scripted (the engine's sampler is replaced for seeds the test
owns) so the model "answers" exactly what each test needs."""

from __future__ import annotations

import json
import shutil

import openai
import pytest
from openai import OpenAI

from serve_helpers import scripted_server, serve_config
from tool_helpers import QWEN25_TOOLS_TEMPLATE, TOOLS

CALL = '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A1001"}}\n</tool_call>'
TWO_CALLS = (
    '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A1"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "return_policy", "arguments": {"category": "shoes"}}\n</tool_call>'
)
SCRIPTS = {
    1: CALL,
    2: "Your order A1001 has shipped.",
    3: TWO_CALLS,
    4: '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": \n</tool_call>',  # broken JSON
}


@pytest.fixture(scope="module")
def server(tmp_path_factory, qwen2_dir):
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("serve_tools")
    model_dir = root / "qwen-tools"
    shutil.copytree(qwen2_dir, model_dir)
    tok = AutoTokenizer.from_pretrained(qwen2_dir)
    tok.chat_template = QWEN25_TOOLS_TEMPLATE
    tok.save_pretrained(model_dir)
    end = tok.convert_tokens_to_ids("<|im_end|>")
    scripts = {seed: tok(text, add_special_tokens=False)["input_ids"] + [end] for seed, text in SCRIPTS.items()}
    serve = {"max_context_tokens": 1024, "max_tokens_cap": 128, "models": [{"name": "plain", "source": str(qwen2_dir)}]}
    cfg = serve_config(root / "run", serve, model={"name_or_path": str(model_dir)})
    with scripted_server(cfg, scripts) as srv:
        srv.cfg = cfg  # the feedback export reads the same store
        yield srv


def _client(server) -> OpenAI:
    return OpenAI(base_url=server.url + "/v1", api_key=server.key, max_retries=0)


def _model(c: OpenAI) -> str:
    return next(m.id for m in c.models.list().data if m.id != "plain")


ASK = [{"role": "user", "content": "Where is my order A1001?"}]


def test_a_call_comes_back_as_tool_calls(server):
    c = _client(server)
    r = c.chat.completions.create(model=_model(c), messages=ASK, tools=TOOLS, seed=1, max_tokens=64)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.id
    assert call.function.name == "lookup_order"
    assert json.loads(call.function.arguments) == {"order_id": "A1001"}


def test_parallel_calls_and_the_conversation_that_follows(server):
    c = _client(server)
    model = _model(c)
    r = c.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="auto", seed=3, max_tokens=96)
    calls = r.choices[0].message.tool_calls
    assert [(x.function.name, json.loads(x.function.arguments)) for x in calls] == [
        ("lookup_order", {"order_id": "A1"}),
        ("return_policy", {"category": "shoes"}),
    ]
    # the client sends the calls and their results back; the answer is plain content
    messages = ASK + [
        r.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": calls[0].id, "content": '{"status": "shipped"}'},
        {"role": "tool", "tool_call_id": calls[1].id, "content": '{"days": 30}'},
    ]
    follow = c.chat.completions.create(model=model, messages=messages, tools=TOOLS, seed=2, max_tokens=64)
    assert follow.choices[0].finish_reason == "stop"
    assert follow.choices[0].message.content == "Your order A1001 has shipped."
    assert not follow.choices[0].message.tool_calls
    # the results were in the prompt: it is longer than the one without them
    assert follow.usage.prompt_tokens > r.usage.prompt_tokens + 20


def test_streaming_sends_tool_call_deltas(server):
    c = _client(server)
    chunks = list(
        c.chat.completions.create(model=_model(c), messages=ASK, tools=TOOLS, seed=3, stream=True, max_tokens=96)
    )
    deltas = [tc for ch in chunks if ch.choices for tc in ch.choices[0].delta.tool_calls or []]
    assert [(d.index, d.function.name) for d in deltas] == [(0, "lookup_order"), (1, "return_policy")]
    assert json.loads(deltas[1].function.arguments) == {"category": "shoes"}
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert not "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    # a plain answer streams as content
    chunks = list(
        c.chat.completions.create(model=_model(c), messages=ASK, tools=TOOLS, seed=2, stream=True, max_tokens=64)
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == SCRIPTS[2]


def test_tool_choice_none_broken_calls_and_unknown_names(server):
    c = _client(server)
    model = _model(c)
    r = c.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice="none", seed=1, max_tokens=64)
    assert r.choices[0].finish_reason == "stop" and r.choices[0].message.content == CALL
    assert not r.choices[0].message.tool_calls
    broken = c.chat.completions.create(model=model, messages=ASK, tools=TOOLS, seed=4, max_tokens=64)
    assert broken.choices[0].finish_reason == "stop" and broken.choices[0].message.content == SCRIPTS[4]
    # a call to a function the request did not offer is not a tool call
    only_policy = [TOOLS[1]]
    r = c.chat.completions.create(model=model, messages=ASK, tools=only_policy, seed=1, max_tokens=64)
    assert r.choices[0].message.content == CALL and not r.choices[0].message.tool_calls
    named = {"type": "function", "function": {"name": "lookup_order"}}
    r = c.chat.completions.create(model=model, messages=ASK, tools=TOOLS, tool_choice=named, seed=1, max_tokens=64)
    assert r.choices[0].message.tool_calls[0].function.name == "lookup_order"
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=model, messages=ASK, tools=only_policy, tool_choice=named, seed=1)
    assert "'lookup_order', which is not among the tools" in e.value.message and e.value.param == "tool_choice"


def test_a_template_without_tools_is_a_clear_400(server):
    c = _client(server)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model="plain", messages=ASK, tools=TOOLS, seed=1)
    assert "cannot take tools" in e.value.message and e.value.code == "tools_unsupported"
    # without tools the same model answers as before
    assert c.chat.completions.create(model="plain", messages=ASK, seed=2, max_tokens=64).choices[0].message.content


def test_feedback_export_keeps_tools_and_calls_and_the_data_stage_reads_it(server, tmp_path):
    """Requests with tools and their feedback over HTTP, then `feedback export`: the rows carry the tools, the
    conversation's calls and results, the served calls; the data stage reads the SFT file as tool-call rows."""
    import httpx

    from domaintune.config import config_from_dict
    from domaintune.data.pipeline import run_data
    from domaintune.layout import RunLayout
    from domaintune.serve.feedback import export_feedback
    from domaintune.utils.io import read_jsonl
    from tool_helpers import QWEN25_TOOLS_TEMPLATE

    c = _client(server)
    model = _model(c)
    asked = c.chat.completions.create(model=model, messages=ASK, tools=TOOLS, seed=1, max_tokens=64)
    [call] = asked.choices[0].message.tool_calls
    conversation = ASK + [
        asked.choices[0].message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"status": "shipped"}'},
    ]
    answered = c.chat.completions.create(model=model, messages=conversation, tools=TOOLS, seed=2, max_tokens=64)
    two = c.chat.completions.create(model=model, messages=ASK, tools=TOOLS, seed=3, max_tokens=96)
    phone_call = {"id": "call_9", "type": "function"}
    phone_call["function"] = {"name": "lookup_order", "arguments": '{"order_id": "A7", "phone": "13812345678"}'}
    with_phone = [
        {"role": "user", "content": "Where is A7? Call 13812345678."},
        {"role": "assistant", "content": "", "tool_calls": [phone_call]},
        {"role": "tool", "tool_call_id": "call_9", "content": '{"status": "packed"}'},
    ]
    phoned = c.chat.completions.create(model=model, messages=with_phone, tools=TOOLS, seed=2, max_tokens=64)
    auth = {"Authorization": f"Bearer {server.key}"}
    for rid, rating, correction in (
        (asked.id, 1, None),  # a good call: a desirable KTO completion
        (answered.id, -1, "Your order A1001 has shipped with DHL."),
        (two.id, -1, CALL),  # the right call is one lookup, written as the model writes calls
        (phoned.id, -1, "Packed; we will text 13812345678."),
    ):
        body = {"request_id": rid, "rating": rating, **({"correction": correction} if correction else {})}
        assert httpx.post(server.url + "/v1/feedback", headers=auth, json=body).status_code == 200

    out = tmp_path / "feedback"
    report = export_feedback(server.cfg, out_dir=out)
    assert report["sft_rows"] == 3 and report["preference_rows"] == 3
    sft = {r["request_id"]: r for r in read_jsonl(out / "sft.jsonl")}
    pref = {r["request_id"]: r for r in read_jsonl(out / "preference.jsonl")}
    kto = {(r["request_id"], r["origin"]): r for r in read_jsonl(out / "unpaired.jsonl")}
    assert all(r["tools"] == TOOLS for r in [*sft.values(), *pref.values(), *kto.values()])
    served_call = {"id": "call_0", "type": "function"}
    served_call["function"] = {"name": "lookup_order", "arguments": '{"order_id": "A1001"}'}
    good = kto[(asked.id, "served")]
    assert good["label"] is True and good["completion"] == [
        {"role": "assistant", "content": "", "tool_calls": [served_call]}
    ]
    # the conversation's call and tool result are kept; the correction is the answer after them
    assert sft[answered.id]["messages"] == [
        *ASK,
        {"role": "assistant", "content": "", "tool_calls": [{**served_call, "id": call.id}]},
        {"role": "tool", "content": '{"status": "shipped"}', "tool_call_id": call.id},
        {"role": "assistant", "content": "Your order A1001 has shipped with DHL."},
    ]
    assert pref[answered.id]["rejected"] == [{"role": "assistant", "content": SCRIPTS[2]}]
    # a correction written as a call is a call; the served answer it corrects is its two calls
    assert sft[two.id]["messages"][-1] == {"role": "assistant", "content": "", "tool_calls": [served_call]}
    rejected = pref[two.id]["rejected"][0]
    assert [(x["function"]["name"], json.loads(x["function"]["arguments"])) for x in rejected["tool_calls"]] == [
        ("lookup_order", {"order_id": "A1"}),
        ("return_policy", {"category": "shoes"}),
    ]
    # the preference and KTO readers (data stage, train stage) keep calls as calls, for the chat template to render
    from domaintune.data.preference_rows import convert

    [read] = convert(pref[two.id], "preference")
    assert read["tools"] == TOOLS and read["rejected"][0]["content"] == ""
    assert [x["function"]["name"] for x in read["rejected"][0]["tool_calls"]] == ["lookup_order", "return_policy"]
    assert read["chosen"] == [{"role": "assistant", "content": "", "tool_calls": [served_call]}]
    assert convert(good, "unpaired")[0]["completion"] == [
        {"role": "assistant", "content": "", "tool_calls": [served_call]}
    ]
    # PII is redacted in the calls' arguments as in the text
    exported = "".join(p.read_text() for p in out.glob("*.jsonl"))
    assert "13812345678" not in exported
    args = json.loads(sft[phoned.id]["messages"][1]["tool_calls"][0]["function"]["arguments"])
    assert args["order_id"] == "A7" and "[PHONE]" in args["phone"]

    data = {
        "sources": [{"path": str(out / "sft.jsonl"), "name": "feedback"}],
        "split": {"ratios": [1, 0, 0]},
        "filters": {"outlier_sigma": None},
        "dedup": {"near": False},
    }
    model_cfg = {"name_or_path": str(server.cfg.model.name_or_path), "chat_template": QWEN25_TOOLS_TEMPLATE}
    cfg = config_from_dict({"name": "t", "model": model_cfg, "data": data}, config_path=tmp_path / "p.yaml")
    result = run_data(cfg, RunLayout(tmp_path / "next"), progress=False)
    assert result["totals"]["input"] == 3 and result["totals"]["kept"] == 3, result["totals"]
    rows = list(read_jsonl(tmp_path / "next" / "data" / "train.jsonl"))  # the data stage gives its own ids

    def chats(found: list) -> list:
        return sorted(json.dumps(r["messages"], sort_keys=True) for r in found)

    assert chats(rows) == chats(list(sft.values()))
    assert all(r["tools"] == TOOLS for r in rows)
    # the preference pairs through the data stage (data.kind: preference) keep their tools and calls
    pref_data = {**data, "kind": "preference", "sources": [{"path": str(out / "preference.jsonl"), "name": "fb"}]}
    cfg = config_from_dict({"name": "t", "model": model_cfg, "data": pref_data}, config_path=tmp_path / "q.yaml")
    run_data(cfg, RunLayout(tmp_path / "pref"), progress=False)
    pairs = list(read_jsonl(tmp_path / "pref" / "data" / "train.jsonl"))
    assert len(pairs) == 3 and all(r["tools"] == TOOLS for r in pairs)
    assert any(r["chosen"] == [{"role": "assistant", "content": "", "tool_calls": [served_call]}] for r in pairs)
