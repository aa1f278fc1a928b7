"""Pairs and unpaired rows with tools (what `feedback export` writes): the prompt shows the tools as the chat
template renders them, a tool-call answer is the call as the template writes it, and dpo / kto / orpo train on
them on the tiny model (with `chatml-tools`); a template without tool support is refused naming file, line and
field."""

from __future__ import annotations

import json

import pytest
from tests.train.preference.test_preference_methods import pair_rows, write_jsonl

from domaintune.config import config_from_dict
from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.train.runner import run_train
from tool_helpers import LOOKUP_ORDER
from train_helpers import make_run_dir


def tool_pair(i: int) -> dict:
    """A feedback-export pair: the chosen answer calls a tool, the rejected one answers in prose."""
    call = {"id": f"call_{i}", "type": "function"}
    call["function"] = {"name": "lookup_order", "arguments": json.dumps({"order_id": f"A{i}"})}
    return {
        "request_id": f"r{i}",
        "tools": [LOOKUP_ORDER],
        "prompt": [{"role": "user", "content": f"Where is my order A{i}?"}],
        "chosen": [{"role": "assistant", "content": "", "tool_calls": [call]}],
        "rejected": [{"role": "assistant", "content": f"Order A{i} does not exist."}],
    }


def rows_file(tmp_path, name="pairs.jsonl"):
    return write_jsonl(tmp_path / name, [tool_pair(i) for i in range(6)] + pair_rows(2))


def config(method: str, path, chat_template: str | None = "chatml-tools"):
    train = {"method": method, method: {"path": str(path)}, "max_steps": 2, "eval_steps": 2, "save_steps": 2,
             "batch_size": 2, "max_length": 384, "learning_rate": 1e-3, "max_val_samples": 2, "logging_steps": 1,
             "tracking": "none", "precision": "fp32"}  # fmt: skip
    model = {"name_or_path": "tiny-random-llama", **({"chat_template": chat_template} if chat_template else {})}
    return config_from_dict({"name": "t", "model": model, "train": train})


def datasets(tmp_path, method: str, path):
    from domaintune.model.loader import load_tokenizer
    from domaintune.train.data import build_datasets

    cfg = config(method, path)
    tokenizer = load_tokenizer(cfg.model)
    return build_datasets(cfg, RunLayout(make_run_dir(tmp_path)), tokenizer, seed=0), tokenizer


def _tool_row(ds):
    return next(r for r in (*ds.train, *ds.val) if r.get("tools"))


def test_a_dpo_pair_with_tools_renders_them_in_the_prompt(tmp_path):
    data, tokenizer = datasets(tmp_path, "dpo", rows_file(tmp_path))
    row = _tool_row(data)
    tools = json.loads(row["tools"])
    assert [t["function"]["name"] for t in tools] == ["lookup_order"]
    # what trl's DPOTrainer renders: prompt with the tools, then the chosen call as the template writes calls
    prompt = tokenizer.apply_chat_template(row["prompt"], tools=tools, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(row["prompt"] + row["chosen"], tools=tools, tokenize=False)
    assert "<tools>" in prompt and '"description": "Look up an order\'s status by its id."' in prompt
    chosen = full[len(prompt) :]
    assert full.startswith(prompt) and chosen.startswith('<tool_call>\n{"name": "lookup_order", "arguments": {')
    assert json.loads(chosen.split("\n")[1])["arguments"]["order_id"].startswith("A")
    # the rows without tools stay as they were
    plain = next(r for r in (*data.train, *data.val) if not r.get("tools"))
    assert plain["prompt"] == [{"role": "user", "content": plain["prompt"][0]["content"]}]


def test_orpo_rows_are_rendered_with_their_tools(tmp_path):
    data, _ = datasets(tmp_path, "orpo", rows_file(tmp_path))
    rows = [*data.train, *data.val]
    assert all(isinstance(r["prompt"], str) for r in rows) and data.info["train"].get("tool_rows")
    with_tools = [r for r in rows if "<tools>" in r["prompt"]]
    assert len(with_tools) == 6 and all(r["chosen"].startswith("<tool_call>\n") for r in with_tools)
    assert all("<tool_call>" not in r["rejected"] for r in rows)


def test_dpo_trains_on_the_rendered_tools(tmp_path, monkeypatch):
    """Two DPO steps; the sequences trl's DPOTrainer tokenised hold the tools in the prompt and the call as the
    chosen answer."""
    import trl

    trainers = []

    class Kept(trl.DPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    monkeypatch.setattr(trl, "DPOTrainer", Kept)
    run = make_run_dir(tmp_path)
    metrics = run_train(config("dpo", rows_file(tmp_path)), RunLayout(run))
    assert metrics["steps"] == 2 and metrics["data"]["train"]["rows"] + metrics["data"]["val"]["rows"] == 8
    tok = trainers[0].processing_class
    seen = [(tok.decode(r["prompt_ids"]), tok.decode(r["chosen_ids"])) for r in trainers[0].train_dataset]
    calls = [(p, c) for p, c in seen if "<tools>" in p]
    assert calls and all('"name": "lookup_order"' in p and c.startswith("<tool_call>\n") for p, c in calls)
    assert all("<tool_call>" not in c for p, c in seen if "<tools>" not in p)


@pytest.mark.parametrize(
    "method", [*(pytest.param(m, marks=pytest.mark.slow) for m in ("kto", "simpo", "reward")), "orpo"]
)
def test_the_other_methods_train_on_tool_rows(tmp_path, method):
    run = make_run_dir(tmp_path)
    metrics = run_train(config(method, rows_file(tmp_path)), RunLayout(run))
    assert metrics["steps"] == 2
    assert metrics["data"]["train"]["rows"] + metrics["data"]["val"]["rows"] == (16 if method == "kto" else 8)


def test_a_template_without_tools_is_refused_naming_the_row(tmp_path):
    from domaintune.model.loader import load_tokenizer
    from domaintune.train.data import build_datasets

    path = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(2) + [tool_pair(1)])
    for method in ("dpo", "simpo"):
        cfg = config(method, path, chat_template=None)
        with pytest.raises(UserError, match=r"pairs\.jsonl:3: the row has `tools`, but the chat template"):
            build_datasets(cfg, RunLayout(make_run_dir(tmp_path / method)), load_tokenizer(cfg.model), seed=0)
