"""Assistant-only labels, truncation counting, packing without cross-example attention, replay mixing."""

from __future__ import annotations

import pytest
import torch

from domaintune.errors import UserError
from domaintune.layout import RunLayout
from domaintune.model.config import ModelConfig
from domaintune.model.loader import load_tokenizer
from domaintune.train.dataset import (
    IGNORE_INDEX,
    ReplayMixDataset,
    encode_messages,
    encode_rows,
    load_message_rows,
    make_collator,
)
from train_helpers import CONVERSATION


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return load_tokenizer(ModelConfig(name_or_path=str(tiny_model_dir)))


def test_only_assistant_tokens_are_labelled(tokenizer):
    ids, labels, truncated = encode_messages(tokenizer, CONVERSATION, max_length=512)
    assert not truncated and len(ids) == len(labels)
    learned = [i for i, label in zip(ids, labels) if label != IGNORE_INDEX]
    assert all(label in (IGNORE_INDEX, i) for i, label in zip(ids, labels))
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    # Exactly the two replies, each followed by its end-of-turn token, and nothing else.
    expected = (
        tokenizer("多休息，多喝水。", add_special_tokens=False)["input_ids"]
        + [end]
        + tokenizer("See a doctor if it lasts.", add_special_tokens=False)["input_ids"]
        + [end]
    )
    assert learned == expected
    # Every system/user/template token is masked: decoding the masked positions gives back the prompt parts.
    masked_text = tokenizer.decode([i for i, label in zip(ids, labels) if label == IGNORE_INDEX])
    for part in (
        "You are a careful doctor.",
        "头痛怎么办？",
        "What else?",
        "<|im_start|>assistant",
        "<|im_start|>user",
    ):
        assert part in masked_text
    assert "多休息" not in masked_text and "See a doctor" not in masked_text
    # The sequence ends at the last learned token: nothing after the final end-of-turn is fed.
    assert ids[-1] == end and labels[-1] == end


def test_truncation_is_counted_and_examples_without_targets_dropped(tokenizer):
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}]
    examples, stats = encode_rows(tokenizer, rows, max_length=40)
    assert stats.rows == 2 and stats.truncated == 2
    assert all(len(e["input_ids"]) == 40 for e in examples)
    # At 20 tokens even the first reply is cut away: nothing left to learn, so the row is dropped and counted.
    examples, stats = encode_rows(tokenizer, rows, max_length=20)
    assert stats.dropped_no_target == 2 and examples == []


def test_bad_rows_name_file_line_and_field(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}\n'
        '{"messages": [{"role": "doctor", "content": "x"}]}\n'
    )
    with pytest.raises(UserError, match=r"train.jsonl:2: messages\[0\].role"):
        load_message_rows(path)
    path.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    with pytest.raises(UserError, match=r"train\.jsonl:1: no assistant message"):
        load_message_rows(path)
    with pytest.raises(UserError, match="run `domaintune data"):
        load_message_rows(tmp_path / "missing.jsonl")


def test_packing_never_attends_across_examples(tokenizer, tiny_model_dir):
    """A padding-free batch gives each example exactly the logits and loss it gets alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa")
    model.config.use_cache = False
    model.eval()
    rows = [{"messages": CONVERSATION}, {"messages": CONVERSATION[:3]}, {"messages": CONVERSATION[1:3]}]
    examples, _ = encode_rows(tokenizer, rows, max_length=512)
    packed = make_collator(tokenizer, packing=True)(examples)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    with torch.no_grad():
        packed_logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"]).logits[0]
        offset = 0
        for example in examples:
            n = len(example["input_ids"])
            alone = model(input_ids=torch.tensor([example["input_ids"]])).logits[0]
            torch.testing.assert_close(packed_logits[offset : offset + n], alone, atol=1e-4, rtol=1e-4)
            # The first label of each example is -100, so no loss crosses the boundary either.
            assert packed["labels"][0, offset].item() == IGNORE_INDEX
            offset += n
    # Padded batches mask padding out of the loss.
    padded = make_collator(tokenizer, packing=False)(examples)
    assert (padded["labels"][padded["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_replay_mixes_a_fresh_general_sample_every_epoch():
    domain = [{"input_ids": [i], "labels": [i]} for i in range(100)]
    general = [{"input_ids": [1000 + i], "labels": [1000 + i]} for i in range(50)]
    mix = ReplayMixDataset(domain, general, ratio=0.2, seed=7)
    assert len(mix) == 120 and mix.n_replay == 20
    epoch0 = [mix[i]["input_ids"][0] for i in range(len(mix))]
    assert sorted(epoch0[:100]) == list(range(100))
    assert all(x >= 1000 for x in epoch0[100:]) and len(set(epoch0[100:])) == 20
    mix.set_epoch(1)
    epoch1 = [mix[i]["input_ids"][0] for i in range(len(mix))]
    assert set(epoch1[100:]) != set(epoch0[100:])
    mix.set_epoch(0)  # deterministic per (seed, epoch): a resumed run sees the same rows
    assert [mix[i]["input_ids"][0] for i in range(len(mix))] == epoch0


def test_replay_rows_reach_training(tmp_path):
    from domaintune.train.runner import run_train
    from train_helpers import make_run_dir, tiny_config

    run = make_run_dir(tmp_path, n_train=16, n_general=12)
    metrics = run_train(tiny_config(replay={"ratio": 0.5}, max_steps=None, epochs=1), RunLayout(run))
    assert metrics["data"]["replay"]["rows_per_epoch"] == 8
    # 16 domain + 8 general rows, batch 4: one epoch is 6 steps.
    assert metrics["steps"] == 6
    assert metrics["data"]["replay"]["file"].endswith("general.jsonl")


def test_max_steps_that_end_before_one_pass_say_how_many_rows_are_never_read(tmp_path, caplog):
    import logging

    from domaintune.train.runner import run_train
    from train_helpers import make_run_dir, tiny_config

    run = make_run_dir(tmp_path / "run", n_train=20, n_val=4)
    with caplog.at_level(logging.WARNING, logger="domaintune.train.runner"):
        metrics = run_train(tiny_config(max_steps=2, batch_size=4, gradient_accumulation_steps=2), RunLayout(run))
    assert metrics["data"]["coverage"] == {"rows": 20, "rows_per_step": 8, "rows_read": 16, "epochs": 0.8}
    [message] = [r.getMessage() for r in caplog.records if "never seen" in r.getMessage()]
    assert "reads 16 of the 20 training rows (80%" in message and "the other 4 are never seen" in message
