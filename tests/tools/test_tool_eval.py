"""Eval on rows that expect tool calls: base vs tuned on the tool metrics, with paired bootstrap intervals.

The tiny models answer at random, so the answers are scripted after real generation ran (the prompts went through
the model's template with the rows' tools): the base answers in prose, the tuned model calls the expected tool
with the right arguments on all but one item."""

from __future__ import annotations

import json
import shutil

import pytest

from domaintune.config import config_from_dict
from domaintune.data.formats import row_tools, to_messages
from domaintune.eval import models as eval_models
from domaintune.eval.runner import run_eval
from domaintune.layout import RunLayout
from domaintune.model.tools import TOOLS_ROLE, calls_text
from tool_helpers import QWEN25_TOOLS_TEMPLATE, openai_row

N = 8


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, qwen2_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tool_eval")
    base_dir = root / "qwen-tools"
    shutil.copytree(qwen2_dir, base_dir)
    tok = AutoTokenizer.from_pretrained(qwen2_dir)
    tok.chat_template = QWEN25_TOOLS_TEMPLATE
    tok.save_pretrained(base_dir)
    run = root / "run"
    (run / "data").mkdir(parents=True)
    rows = []
    for i in range(N):
        row = openai_row(i, f"A{1000 + i}")
        messages = to_messages(row)[:2]  # ask, then the expected call: the reference answer is a call
        rows.append({"id": f"t{i}", "messages": messages, "tools": row_tools(row)})
    (run / "data" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    peft_model.save_pretrained(run / "model")
    tok.save_pretrained(run / "model")
    return run, base_dir


def test_tool_metrics_base_vs_tuned_with_intervals(run_dir, monkeypatch):
    run, base_dir = run_dir
    real = eval_models.EvalModel._generate_local
    seen_prompts = []

    def scripted(self, prompts, decoding, seed, desc, on_batch=None):
        answers = real(self, prompts, decoding, seed, desc)  # real generation, tools rendered by the template
        seen_prompts.extend(prompts)
        for i, (prompt, answer) in enumerate(zip(prompts, answers)):
            order = prompt[1]["content"].split()[4].rstrip("?")
            if self.name == "base" or i == 0:
                answer.text = f"Order {order} is on its way."
            else:
                call = {"function": {"name": "lookup_order", "arguments": {"order_id": order}}}
                answer.text = calls_text([call])
        if on_batch:
            on_batch(list(range(len(prompts))), answers)
        return answers

    monkeypatch.setattr(eval_models.EvalModel, "_generate_local", scripted)
    cfg = config_from_dict(
        {
            "name": "t",
            "output_dir": str(run),
            "model": {"name_or_path": str(base_dir)},
            "eval": {
                "decoding": {"max_new_tokens": 4, "batch_size": 8},
                "bootstrap_samples": 200,
                "engine": "transformers",
                "metrics": ["exact_match"],
                "robustness": {"enabled": False},
                "primary_metric": "exact_match",
                "gates": ["tool_args_exact_delta_ci_low > 0", "tuned.tool_json_valid >= 80"],
            },
        }
    )
    report = run_eval(cfg, RunLayout(run))
    assert seen_prompts and all(p[0]["role"] == TOOLS_ROLE for p in seen_prompts)
    metrics = report["metrics"]["test"]
    assert metrics["base"]["tool_args_exact"] == 0.0 and metrics["base"]["tool_json_valid"] == 0.0
    assert metrics["tuned"]["tool_name_acc"] == 100.0 * (N - 1) / N
    assert metrics["tuned"]["tool_args_exact"] == 100.0 * (N - 1) / N
    delta = report["deltas"]["test"]["tuned"]["tool_args_exact"]
    assert delta["delta"] == pytest.approx(100.0 * (N - 1) / N)
    assert delta["ci_low"] > 0 and delta["ci_high"] <= 100.0 and delta["n"] == N
    assert report["gates"]["passed"], report["gates"]
