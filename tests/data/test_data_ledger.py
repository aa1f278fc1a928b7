"""The Ledger: one drop is counted in the source's account, the funnel and the quarantine file at once."""

from __future__ import annotations

import json

import pytest

from domaintune.data.ledger import Ledger, Where


def read_quarantine(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_a_drop_is_counted_in_the_account_the_funnel_and_the_quarantine(tmp_path):
    path = tmp_path / "quarantine.jsonl"
    with Ledger(path) as ledger:
        for _ in range(3):
            ledger.read("faq")
        ledger.keep("faq", "train")
        ledger.keep("faq", "test")
        where = Where("faq", "faq.csv", "line 3")
        ledger.drop(
            where, "dedup_near", "near duplicate (Jaccard≈0.91 ≥ 0.8)", counted_as="near duplicate", row={"id": 1}
        )
        assert ledger.summary()["faq"] == {
            "input": 3,
            "kept": {"train": 1, "val": 0, "test": 1},
            "kept_total": 2,
            "dropped": {"dedup_near: near duplicate": 1},
            "dropped_total": 1,
            "balanced": True,
        }
        assert ledger.dropped_at("dedup_near") == 1 and ledger.dropped_at("filter") == 0
        assert ledger.drop_reasons() == {"dedup_near: near duplicate": 1}
        assert ledger.rows_in == 3 and ledger.quarantined == 1
        assert ledger.balanced
        ledger.check()
        assert not path.exists()  # published only when the ledger closes
    assert read_quarantine(path) == [
        {
            "source": "faq",
            "file": "faq.csv",
            "loc": "line 3",
            "stage": "dedup_near",
            "reason": "near duplicate (Jaccard≈0.91 ≥ 0.8)",
            "row": {"id": 1},
        }
    ]


def test_rows_outside_the_input_go_to_their_own_book(tmp_path):
    path = tmp_path / "quarantine.jsonl"
    with Ledger(path) as ledger:
        ledger.read("faq")
        ledger.keep("faq", "val")
        ledger.set_aside(Where("general", "seed.jsonl", "line 2"), "general", "no instances", book="general")
        assert ledger.balanced and ledger.quarantined == 1 and ledger.summary()["faq"]["dropped_total"] == 0
        ledger.check(general=1)
        with pytest.raises(RuntimeError, match="general: 2 rows reported dropped, 1 quarantined"):
            ledger.check(general=2)
    assert [e["stage"] for e in read_quarantine(path)] == ["general"]


def test_unbalanced_accounting_raises_and_the_quarantine_is_not_published(tmp_path):
    path = tmp_path / "quarantine.jsonl"
    with pytest.raises(RuntimeError, match="data accounting does not balance"), Ledger(path) as ledger:
        ledger.read("faq")
        ledger.read("faq")
        ledger.keep("faq", "train")  # the second row was neither kept nor dropped
        assert not ledger.balanced and not ledger.summary()["faq"]["balanced"]
        ledger.check()
    assert not path.exists() and list(tmp_path.iterdir()) == []
