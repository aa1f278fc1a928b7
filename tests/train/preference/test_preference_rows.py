"""Preference / unpaired / prompt rows: every layout read into one canonical form; dedup and split accounting."""

from __future__ import annotations

import json

import pytest

from domaintune.data.preference_rows import RowError, convert, text_key
from domaintune.errors import UserError
from domaintune.train.preference.rows import read_rows, split_rows

USER = [{"role": "user", "content": "Can I return shoes?"}]
GOOD = [{"role": "assistant", "content": "Yes, within 30 days."}]
BAD = [{"role": "assistant", "content": "No."}]
CANONICAL = {"prompt": USER, "chosen": GOOD, "rejected": BAD}


@pytest.mark.parametrize(
    "row",
    [
        {"prompt": "Can I return shoes?", "chosen": "Yes, within 30 days.", "rejected": "No."},  # text
        {"prompt": USER, "chosen": GOOD, "rejected": BAD},  # TRL explicit prompt, conversational
        {"chosen": USER + GOOD, "rejected": USER + BAD},  # TRL implicit prompt
        {"instruction": "Can I return shoes?", "input": "", "chosen": "Yes, within 30 days.", "rejected": "No."},
        {  # LLaMA-Factory sharegpt ranking
            "conversations": [{"from": "human", "value": "Can I return shoes?"}],
            "chosen": {"from": "gpt", "value": "Yes, within 30 days."},
            "rejected": {"from": "gpt", "value": "No."},
        },
    ],
)
def test_every_pair_layout_gives_the_same_canonical_pair(row):
    (pair,) = convert(row, "preference")
    assert {k: pair[k] for k in CANONICAL} == CANONICAL


def test_unpaired_rows_from_labels_ratings_and_pairs():
    assert convert({"prompt": "q", "completion": "a", "label": True}, "unpaired")[0]["label"] is True
    assert convert({"prompt": "q", "completion": "a", "rating": -1}, "unpaired")[0]["label"] is False
    assert convert({"prompt": "q", "completion": "a", "desirable": "false"}, "unpaired")[0]["label"] is False
    both = convert(CANONICAL, "unpaired")
    assert [(r["completion"], r["label"]) for r in both] == [(GOOD, True), (BAD, False)]
    with pytest.raises(RowError, match="label"):
        convert({"prompt": "q", "completion": "a"}, "unpaired")


def test_prompt_rows_from_data_stage_chats_keep_the_answer_as_reference():
    chat = {"id": "t1", "category": "returns", "messages": [{"role": "system", "content": "Be brief."}, *USER, *GOOD]}
    (row,) = convert(chat, "prompt")
    assert row["prompt"] == [{"role": "system", "content": "Be brief."}, *USER]
    assert row["reference"] == "Yes, within 30 days." and row["category"] == "returns"
    (alpaca,) = convert({"instruction": "Can I return shoes?", "output": "Yes."}, "prompt")
    assert alpaca["prompt"] == USER and alpaca["reference"] == "Yes."
    assert "Yes, within 30 days." in text_key(row)


def test_read_rows_dedups_names_bad_lines_and_splits(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [CANONICAL, {**CANONICAL, "prompt": "  can i RETURN shoes? "}, {**CANONICAL, "prompt": "Other?"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    got, counts = read_rows(path, "preference")
    assert counts == {"read": 3, "duplicates": 1, "rows": 2} and set(got[0]) == {"prompt", "chosen", "rejected"}
    train, val = split_rows(got, seed=0, path=path)
    assert len(train) == 1 and len(val) == 1
    path.write_text(json.dumps({"prompt": "q"}) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"pairs\.jsonl:1: preference rows need"):
        read_rows(path, "preference")
