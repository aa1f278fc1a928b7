"""GRPO/PPO prompt rows with tools (a data-stage messages row with OpenAI-format `tools`): the prompt GRPO
generates from is the text eval and serving render (`model.tools.render_prompt`, tools header included), a template
without tool support is refused naming the file and line, and GRPO trains two steps on such rows (tiny model,
`chatml-tools`)."""

from __future__ import annotations

import json

import pytest
from tests.train.preference.test_preference_methods import write_jsonl

from domaintune.config import config_from_dict
from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.model.tools import render_prompt, with_tools_header
from domaintune.train.runner import run_train
from tool_helpers import LOOKUP_ORDER
from train_helpers import make_run_dir


def tool_chat(i: int) -> dict:
    """A data-stage row: the user asks, the assistant calls the tool, reads its result, then answers."""
    call = {"id": f"call_{i}", "type": "function",
            "function": {"name": "lookup_order", "arguments": json.dumps({"order_id": f"A{i}"})}}  # fmt: skip
    return {
        "id": f"t{i}",
        "tools": [LOOKUP_ORDER],
        "messages": [
            {"role": "user", "content": f"Where is my order A{i}?"},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": json.dumps({"status": "shipped"})},
            {"role": "assistant", "content": f"Order A{i} has shipped."},
        ],
    }


def plain_chat(i: int) -> dict:
    return {"id": f"p{i}", "messages": [{"role": "user", "content": f"What is {i} plus {i}?"},
                                        {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]}  # fmt: skip


def prompts_file(tmp_path):
    return write_jsonl(tmp_path / "prompts.jsonl", [tool_chat(i) for i in range(4)] + [plain_chat(i) for i in range(2)])


def config(path, chat_template: str | None = "chatml-tools"):
    grpo = {"prompts_path": str(path), "num_generations": 2, "max_completion_length": 6,
            "rewards": [{"type": "length", "max_words": 8}, {"type": "no_pii"}]}  # fmt: skip
    train = {"method": "grpo", "grpo": grpo, "max_steps": 2, "eval_steps": 2, "save_steps": 2, "batch_size": 2,
             "max_length": 384, "learning_rate": 1e-3, "max_val_samples": 2, "logging_steps": 1, "tracking": "none",
             "precision": "fp32"}  # fmt: skip
    model = {"name_or_path": "tiny-random-llama", **({"chat_template": chat_template} if chat_template else {})}
    return config_from_dict({"name": "t", "model": model, "train": train})


def eval_prompt(tokenizer, row: dict) -> str:
    """What eval renders for the row (eval/items.py: the turns before the last answer, headed by the tools)."""
    return render_prompt(tokenizer, with_tools_header(row["messages"][:-1], row.get("tools")))


def test_grpo_prompts_are_rendered_with_their_tools_as_eval_renders_them(tmp_path):
    from domaintune.model.loader import load_tokenizer
    from domaintune.train.data import build_datasets

    cfg = config(prompts_file(tmp_path))
    tokenizer = load_tokenizer(cfg.model)
    data = build_datasets(cfg, RunLayout(make_run_dir(tmp_path)), tokenizer, seed=0)
    rows = list(data.train)  # (the validation rows come from the run's val file)
    assert len(rows) == 6 and data.info["train"]["tool_rows"] == 4
    by_id = {r["id"]: r for r in [tool_chat(i) for i in range(4)] + [plain_chat(i) for i in range(2)]}
    for row in rows:
        source = by_id[row["id"]]
        expected = eval_prompt(tokenizer, source)
        # GRPOTrainer tokenises text prompts with the special tokens; eval without: the same ids either way
        assert tokenizer(row["prompt"]).input_ids == tokenizer(expected, add_special_tokens=False).input_ids
        assert row["prompt"] == expected  # (this tokenizer adds no special tokens of its own)
        assert json.loads(row["prompt_messages"])[0]["content"] == source["messages"][0]["content"]
        if source.get("tools"):
            assert "<tools>" in row["prompt"] and '"name": "lookup_order"' in row["prompt"]
            assert (
                '<tool_call>\n{"name": "lookup_order"' in row["prompt"]
            )  # the earlier call, as the template writes it
            assert json.loads(row["tools"])[0]["function"]["name"] == "lookup_order"
            assert row["reference"] == source["messages"][-1]["content"]
        else:
            assert "<tools>" not in row["prompt"] and row["tools"] is None


def test_a_bos_the_tokenizer_adds_itself_is_not_doubled():
    from types import SimpleNamespace

    from domaintune.train.preference.tool_rows import _without_added_bos

    class Tok:
        def __init__(self, add: bool):
            self.bos_token, self.bos_token_id, self.add = "<s>", 1, add

        def __call__(self, text, add_special_tokens=True):
            return SimpleNamespace(input_ids=[1] if self.add and add_special_tokens else [])

    assert _without_added_bos(Tok(True), "<s>[INST] hi") == "[INST] hi"
    assert _without_added_bos(Tok(False), "<s>[INST] hi") == "<s>[INST] hi"


def test_a_template_without_tools_is_refused_naming_the_row(tmp_path):
    from domaintune.model.loader import load_tokenizer
    from domaintune.train.data import build_datasets

    path = write_jsonl(tmp_path / "prompts.jsonl", [plain_chat(1), plain_chat(2), tool_chat(1)])
    cfg = config(path, chat_template=None)
    with pytest.raises(UserError, match=r"prompts\.jsonl:3: the row has `tools`, but the chat template"):
        build_datasets(cfg, RunLayout(make_run_dir(tmp_path)), load_tokenizer(cfg.model), seed=0)


def test_grpo_trains_on_prompts_with_tools(tmp_path, monkeypatch):
    """Two GRPO steps; the trainer's prompts hold the tools and the verifiers see the turns, not the template."""
    import trl

    from domaintune.train.preference import verifiers

    trainers, seen = [], []

    class Kept(trl.GRPOTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            trainers.append(self)

    real = verifiers.prompt_text
    monkeypatch.setattr(trl, "GRPOTrainer", Kept)
    monkeypatch.setattr(verifiers, "prompt_text", lambda p: seen.append(p) or real(p))
    metrics = run_train(config(prompts_file(tmp_path)), RunLayout(make_run_dir(tmp_path)))
    assert metrics["steps"] == 2
    prompts = trainers[0].train_dataset["prompt"]
    assert all(isinstance(p, str) for p in prompts) and any("<tools>" in p for p in prompts)
    assert seen and all(isinstance(p, list) and p[0]["role"] == "user" for p in seen)


def test_the_reward_model_and_verifiers_read_the_turns_of_rendered_prompts():
    from domaintune.train.preference.tool_rows import turns_of

    turns = [{"role": "user", "content": "Where is my order A1?"}]
    rendered = ["<|im_start|>system\n# Tools ...<|im_start|>user\nWhere is my order A1?<|im_end|>\n"]
    assert turns_of(rendered, {"prompt_messages": [json.dumps(turns)]}) == [turns]
    assert turns_of(rendered, {}) == rendered  # rows without tools: the conversational prompts trl passes


def test_the_data_stages_prompt_rows_keep_their_tools():
    """data.kind prompt writes `canonical` rows; read back for grpo they give the prompt a chat row gives."""
    from domaintune.data.preference_rows import canonical, to_prompt

    written = json.loads(json.dumps(canonical(tool_chat(1), "prompt")))
    assert written["tools"] == [LOOKUP_ORDER] and written["prompt"][1]["tool_calls"][0]["id"] == "call_1"
    assert to_prompt(written)["prompt"] == to_prompt(tool_chat(1))["prompt"] == written["prompt"]
    assert "tools" not in canonical(plain_chat(1), "prompt")
