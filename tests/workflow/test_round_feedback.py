"""A round's intake from the serving store: review rules, window, PII, holdout, dedup, decontamination."""

from __future__ import annotations

from datetime import datetime, timedelta

from domaintune.data.config import DataConfig
from domaintune.serve.store import Store, utcnow
from domaintune.workflow.round import parse_window
from domaintune.workflow.round_feedback import ReviewRules, in_holdout, read_feedback, redact, screen


def _messages(question: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


def _store(tmp_path) -> tuple[str, dict[str, str]]:
    url = f"sqlite:///{tmp_path / 'serve.db'}"
    store = Store(url, key_hash_iterations=1000)
    user = store.create_key("alice")[0].id
    reviewer = store.create_key("dr-lee")[0].id
    asks = {
        "corrected": ("How much water per day?", "Drink soda.", [(user, -1, "About two litres, more in heat.")]),
        "same": ("Is rest good?", "Rest helps.", [(user, -1, "rest helps")]),
        "vetoed": ("Best cure for flu?", "Antibiotics.", [(user, -1, "Garlic only."), (reviewer, -1, None)]),
        "thumb": ("Can I walk after surgery?", "Short walks help recovery.", [(user, 1, None)]),
        "approved": (
            "Should I stretch daily?",
            "Gentle stretching daily is good.",
            [(user, 1, None), (reviewer, 1, None)],
        ),
        "down": ("Why is the sky blue?", "Because.", [(user, -1, None)]),
        "pii": (
            "Call me at 13812345678 about my rash",
            "See a doctor.",
            [(user, -1, "Keep it dry; a doctor at 13812345678 can help.")],
        ),
        "dup": ("patient 1 asks about fever?", "Old answer.", [(user, -1, "Rest, fluids and a follow-up visit.")]),
        "leak": ("What is the test question?", "No.", [(user, -1, "The tested answer.")]),
    }
    for rid, (question, answer, feedback) in asks.items():
        store.log_request(
            id=rid,
            key_id=user,
            endpoint="chat",
            model="tiny",
            served="tiny",
            version="v0.0.1",
            prompt=[{"role": "user", "content": question}],
            response=answer,
            status=200,
            outcome="ok",
        )
        for key, rating, correction in feedback:
            store.add_feedback(rid, key, rating, correction, None)
    store.engine.dispose()
    return url, {"user": user, "reviewer": reviewer}


def test_review_rules_window_and_reasons(tmp_path):
    url, _keys = _store(tmp_path)
    rules = ReviewRules(thumbs="approved", reviewers=("dr-lee",), holdout=0.0)
    intake, rows = read_feedback(url, 1000, None, utcnow() + timedelta(seconds=1), rules)
    taken = {r["request_id"]: r for r in rows}
    assert set(taken) == {"corrected", "approved", "pii", "dup", "leak"}
    assert taken["corrected"]["messages"][-1]["content"] == "About two litres, more in heat."
    assert taken["approved"]["origin"] == "feedback/approved"
    reasons = {d["request_id"]: d["reason"] for d in intake.dropped}
    assert reasons == {
        "same": "correction is the same as the model's answer",
        "vetoed": "vetoed by a reviewer (thumbs-down without a correction)",
        "thumb": "thumbs-up without a reviewer's approval",
        "down": "thumbs-down without a correction (nothing to train on)",
    }
    off, _ = read_feedback(url, 1000, None, utcnow() + timedelta(seconds=1), ReviewRules())
    assert {d["reason"] for d in off.dropped if d["request_id"] == "approved"} == {"thumbs-up not taken (thumbs: off)"}
    # the window: nothing after its end, nothing before its start
    later, rows_later = read_feedback(url, 1000, utcnow() + timedelta(seconds=1), utcnow() + timedelta(hours=1), rules)
    assert later.seen == 0 and rows_later == []

    redact(rows, DataConfig(), intake)
    pii = taken["pii"]["messages"]
    assert "13812345678" not in pii[0]["content"] and "13812345678" not in pii[1]["content"]
    parent_train = [
        {"id": "p1", "messages": _messages("patient 1 asks about fever?", "Rest, fluids and a follow-up visit.")}
    ]
    tests = {"test": [{"id": "t1", "messages": _messages("What is the test question?", "x")}]}
    screen(rows, parent_train, tests, DataConfig(), rules, intake)
    assert {r["request_id"] for r in intake.train} == {"corrected", "approved", "pii"}
    why = {d["request_id"]: d["stage"] for d in intake.dropped}
    assert why["dup"] == "dedup" and why["leak"] == "decontaminate"


def test_holdout_is_stable_and_never_trained(tmp_path):
    url, _ = _store(tmp_path)
    rules = ReviewRules(holdout=0.5)
    intake, rows = read_feedback(url, 1000, None, utcnow() + timedelta(seconds=1), rules)
    screen(rows, [], {}, DataConfig(), rules, intake)
    held = {r["request_id"] for r in intake.holdout}
    assert held == {r["request_id"] for r in rows if in_holdout(r["request_id"], 0.5)}
    assert held and not held & {r["request_id"] for r in intake.train}
    assert all(in_holdout(rid, 0.5) for rid in held)  # the same request is held out in every round


def test_parse_window():
    assert parse_window("7d") == timedelta(days=7) and parse_window("12h") == timedelta(hours=12)
    assert parse_window(" 2w ") == timedelta(weeks=2)
    import pytest

    from domaintune.errors import UserError

    for bad in ("7", "0d", "d7", "7 days"):
        with pytest.raises(UserError, match="--window"):
            parse_window(bad)
    assert isinstance(utcnow(), datetime)
