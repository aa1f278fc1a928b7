"""Each preference / reinforcement method trains two steps on the tiny model, saves model/, reloads and generates."""

from __future__ import annotations

import json
import random

import pytest
import torch

from domaintune.layout import RunLayout
from domaintune.model.loader import end_of_turn_token_ids, load_trained
from domaintune.train.runner import run_train
from train_helpers import make_run_dir, tiny_config


def write_jsonl(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def pair_rows(n: int = 12, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        rows.append(
            {
                "id": f"p{i}",
                "prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                "chosen": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
                "rejected": [{"role": "assistant", "content": f"{a} plus {b} is {a + b + 7}."}],
            }
        )
    return rows


def unpaired_rows(n: int = 12) -> list[dict]:
    rows = []
    for pair in pair_rows(n):
        good = rows.__len__() % 2 == 0
        answer = pair["chosen"] if good else pair["rejected"]
        rows.append({"prompt": pair["prompt"], "completion": answer, "label": good})
    return rows


def reload_and_generate(model_dir):
    model, tokenizer = load_trained(model_dir)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}], tokenize=False, add_generation_prompt=True
    )
    inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        out = model.generate(
            **inputs,
            max_new_tokens=4,
            do_sample=False,
            eos_token_id=end_of_turn_token_ids(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
        )
    assert out.shape[1] > inputs["input_ids"].shape[1]


@pytest.mark.parametrize(
    ("method", "section"),
    [
        ("orpo", {"beta": 0.2}),
        ("simpo", {"loss_type": "simpo", "gamma": 0.4}),
        ("dpo", {"loss_type": "ipo"}),
    ],
)
def test_pair_methods_train_save_reload_generate(tmp_path, method, section):
    run = make_run_dir(tmp_path)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    metrics = run_train(tiny_config(method=method, **{method: {"path": str(pairs), **section}}), RunLayout(run))
    assert metrics["steps"] == 2 and metrics["model_kind"] == "adapter"
    assert metrics["data"]["train"]["rows"] + metrics["data"]["val"]["rows"] == 12
    assert json.loads((run / "model" / "domaintune.json").read_text())["method"] == method
    reload_and_generate(run / "model")


def test_kto_trains_on_unpaired_rows(tmp_path):
    run = make_run_dir(tmp_path)
    rows = write_jsonl(tmp_path / "unpaired.jsonl", unpaired_rows())
    metrics = run_train(tiny_config(method="kto", kto={"path": str(rows), "desirable_weight": 1.5}), RunLayout(run))
    assert metrics["steps"] == 2
    assert metrics["data"]["kind"] == "unpaired" and metrics["data"]["train"]["desirable"] > 0
    assert metrics["params"]["preference"]["reference_model"] is not None
    reload_and_generate(run / "model")


def test_reward_model_trains_and_scores_pairs(tmp_path):
    from domaintune.train.preference.reward import RewardModelScorer, pairwise_accuracy

    run = make_run_dir(tmp_path)
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    metrics = run_train(tiny_config(method="reward", reward={"path": str(pairs)}), RunLayout(run))
    assert metrics["steps"] == 2 and metrics["model_kind"] == "adapter"
    assert json.loads((run / "model" / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    scorer = RewardModelScorer(run / "model")
    result = pairwise_accuracy(scorer, pair_rows(4, seed=9))
    assert result["pairs"] == 4 and 0.0 <= result["accuracy"] <= 1.0 and len(result["ci95"]) == 2


def test_grpo_with_verifiers_and_ppo_with_the_reward_model(tmp_path):
    """GRPO on the data stage's rows with two verifiers; then PPO-style RLHF against a reward model trained here."""
    run = make_run_dir(tmp_path / "grpo")
    grpo = {
        "num_generations": 2,
        "max_completion_length": 6,
        "rewards": [
            {"type": "answer_match", "mode": "numeric", "weight": 2.0},
            {"type": "length", "max_words": 8},
        ],
    }
    metrics = run_train(tiny_config(method="grpo", grpo=grpo), RunLayout(run))
    assert metrics["steps"] == 2 and metrics["model_kind"] == "adapter"
    assert metrics["params"]["preference"]["reward"][0]["type"] == "answer_match"
    curves = json.loads((run / "train" / "rewards.json").read_text())
    assert {"reward", "answer_match", "length"} <= set(curves)
    for (step, total), (_, match), (_, length) in zip(curves["reward"], curves["answer_match"], curves["length"]):
        assert total == pytest.approx(2.0 * match + length, abs=1e-4), step  # the configured weights
    assert (run / "train" / "rewards.png").is_file()
    assert not (run / "model" / "ref").exists()  # trl's frozen reference copy is not part of the model
    reload_and_generate(run / "model")

    rm_run = make_run_dir(tmp_path / "rm")
    pairs = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    run_train(tiny_config(method="reward", max_steps=1, reward={"path": str(pairs)}), RunLayout(rm_run))
    ppo_run = make_run_dir(tmp_path / "ppo")
    ppo = {"reward_model": str(rm_run / "model"), "max_completion_length": 6, "num_iterations": 2}
    metrics = run_train(tiny_config(method="ppo", ppo=ppo), RunLayout(ppo_run))
    assert metrics["steps"] == 2
    assert "reward_model" in json.loads((ppo_run / "train" / "rewards.json").read_text())
    reload_and_generate(ppo_run / "model")


def test_grpo_batch_must_hold_whole_groups(tmp_path):
    from domaintune.errors import UserError

    run = make_run_dir(tmp_path)
    grpo = {"num_generations": 3, "rewards": [{"type": "no_pii"}]}
    with pytest.raises(UserError, match=r"multiple of train\.grpo\.num_generations"):
        run_train(tiny_config(method="grpo", grpo=grpo), RunLayout(run))
