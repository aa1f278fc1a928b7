"""Tool-call rows through the data stage: three layouts in, OpenAI messages with `tools` out, bad rows quarantined
with a reason, and the accounting balanced."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from domaintune.config import config_from_dict
from domaintune.data.pipeline import run_data
from domaintune.errors import UserError
from domaintune.layout import RunLayout
from tool_helpers import QWEN25_TOOLS_TEMPLATE, TOOLS, openai_row, sharegpt_row


def _jsonl(path: Path, rows: list) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _bad_rows() -> list[dict]:
    bad_args = openai_row(90, "B90")
    bad_args["messages"][1]["tool_calls"][0]["function"]["arguments"] = '{"order_id": "B90"'  # cut JSON
    orphan = openai_row(91, "B91")
    del orphan["messages"][1]  # the tool result has no call before it
    unknown_fn = openai_row(92, "B92")
    unknown_fn["messages"][1]["tool_calls"][0]["function"]["name"] = "cancel_everything"
    unknown_layout = {"id": "tool-93", "tool_calls": [{"name": "lookup_order"}], "question": "?"}
    return [bad_args, orphan, unknown_fn, unknown_layout]


def _inputs(tmp: Path) -> None:
    good = [openai_row(i, f"A{1000 + 37 * i}") for i in range(12)]
    _jsonl(tmp / "openai.jsonl", good + _bad_rows())
    _jsonl(tmp / "sharegpt.jsonl", [sharegpt_row(i) for i in range(6)])
    lf = [sharegpt_row(100 + i) for i in range(4)]
    for row in lf:  # LLaMA-Factory's own column/tag names, declared in dataset_info.json
        row["turns"] = [{"role": t["from"], "text": t["value"]} for t in row.pop("conversations")]
        for t in row["turns"]:
            t["role"] = {"human": "user", "gpt": "assistant", "function_call": "fn", "observation": "obs"}[t["role"]]
        row["functions"] = row.pop("tools")
    _jsonl(tmp / "lf.jsonl", lf)
    info = {
        "shop_tools": {
            "file_name": "lf.jsonl",
            "formatting": "sharegpt",
            "columns": {"messages": "turns", "tools": "functions"},
            "tags": {
                "role_tag": "role",
                "content_tag": "text",
                "user_tag": "user",
                "assistant_tag": "assistant",
                "function_tag": "fn",
                "observation_tag": "obs",
            },
        }
    }
    (tmp / "dataset_info.json").write_text(json.dumps(info), encoding="utf-8")


def _cfg(tmp: Path, model: dict, fmt: str = "messages"):
    data = {
        "sources": [
            {"path": "openai.jsonl", "name": "openai"},
            {"path": "sharegpt.jsonl", "name": "sharegpt", "reader": "sharegpt"},
            {"path": "dataset_info.json", "name": "lf", "reader": "dataset_info"},
        ],
        "split": {"ratios": [1, 0, 0]},
        "filters": {"outlier_sigma": None},
        "dedup": {"near": False},
        "format": fmt,
    }
    return config_from_dict({"name": "t", "model": model, "data": data}, config_path=tmp / "p.yaml")


def test_three_layouts_normalised_bad_rows_quarantined_and_balanced(tmp_path, qwen2_dir):
    _inputs(tmp_path)
    model = {"name_or_path": str(qwen2_dir), "chat_template": QWEN25_TOOLS_TEMPLATE}
    report = run_data(_cfg(tmp_path, model), RunLayout(tmp_path / "run"), progress=False)
    assert report["totals"] == {"input": 26, "kept": 22, "dropped": 4, "quarantined": 4}
    assert all(s["balanced"] for s in report["sources"].values())
    rows = [json.loads(x) for x in (tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()]
    assert len(rows) == 22
    for row in rows:  # every layout comes out as OpenAI messages with the tools
        assert [t["function"]["name"] for t in row["tools"]] == ["lookup_order", "return_policy"]
        call_msg, result = row["messages"][1], row["messages"][2]
        assert call_msg["role"] == "assistant" and call_msg["content"] == ""
        call = call_msg["tool_calls"][0]
        assert call["type"] == "function" and isinstance(json.loads(call["function"]["arguments"]), dict)
        assert result["role"] == "tool" and result["tool_call_id"] == call["id"]
    by_source = {r["source"]: r for r in rows}
    assert by_source["openai"]["tools"] == TOOLS
    lf_call = by_source["lf"]["messages"][1]["tool_calls"][0]["function"]
    assert lf_call == {"name": "return_policy", "arguments": '{"category": "shoes"}'}
    quarantine = [json.loads(x) for x in (tmp_path / "run" / "data" / "quarantine.jsonl").read_text().splitlines()]
    reasons = {(Path(q["file"]).name, q["loc"]): q["reason"] for q in quarantine}
    assert "messages[1].tool_calls[0].arguments is not valid JSON" in reasons[("openai.jsonl", "line 13")]
    assert "messages[1] is a tool result without a preceding tool call" in reasons[("openai.jsonl", "line 14")]
    assert "'cancel_everything', which is not among the row's tools" in reasons[("openai.jsonl", "line 15")]
    assert reasons[("openai.jsonl", "line 16")].startswith("no mapped fields")


def test_sharegpt_output_is_llamafactory_layout(tmp_path, qwen2_dir):
    _inputs(tmp_path)
    model = {"name_or_path": str(qwen2_dir), "chat_template": QWEN25_TOOLS_TEMPLATE}
    run_data(_cfg(tmp_path, model, "sharegpt"), RunLayout(tmp_path / "run"), progress=False)
    row = json.loads((tmp_path / "run" / "data" / "train.jsonl").read_text().splitlines()[0])
    assert [t["from"] for t in row["conversations"]] == ["human", "function_call", "observation", "gpt"]
    assert json.loads(row["conversations"][1]["value"])["name"] in ("lookup_order", "return_policy")
    assert [t["name"] for t in json.loads(row["tools"])] == ["lookup_order", "return_policy"]


def test_template_without_tools_and_alpaca_output_are_config_errors(tmp_path, qwen2_dir):
    _inputs(tmp_path)
    with pytest.raises(UserError, match=r"does not render the tool definitions.*chatml-tools"):
        run_data(_cfg(tmp_path, {"name_or_path": str(qwen2_dir)}), RunLayout(tmp_path / "a"), progress=False)
    model = {"name_or_path": str(qwen2_dir), "chat_template": "chatml-tools"}
    with pytest.raises(UserError, match=r"data\.format: alpaca cannot hold tool calls"):
        run_data(_cfg(tmp_path, model, "alpaca"), RunLayout(tmp_path / "b"), progress=False)
    run_data(_cfg(tmp_path, model), RunLayout(tmp_path / "c"), progress=False)  # the named template renders tools
