"""The flywheel end to end on the tiny model: a live server collects feedback, two unattended rounds train on it,
the canary promotes the first child and rolls the second back, and every step is on record in the registry."""

from __future__ import annotations

import json
import random
from contextlib import contextmanager
from pathlib import Path

import httpx
import yaml
from openai import OpenAI
from typer.testing import CliRunner

from domaintune.cli import app
from domaintune.config import load_config
from domaintune.registry import registry_from_config
from domaintune.utils.io import read_jsonl, sha256_file
from domaintune.workflow.pipeline import run_pipeline
from domaintune.workflow.round import RoundOptions, run_round
from domaintune.workflow.round_feedback import ReviewRules
from domaintune.workflow.round_report import parent_gate_failures

WORDS = [
    "fever",
    "cough",
    "insulin",
    "dosage",
    "kidney",
    "liver",
    "asthma",
    "allergy",
    "migraine",
    "vitamin",
    "sleep",
    "anxiety",
    "tablet",
    "syrup",
]
WEEK_ONE = [
    "Can I take ibuprofen with an empty stomach?",
    "How long does a sprained ankle take to heal?",
    "What helps a toddler with a blocked nose at night?",
    "Is it safe to fly three weeks after knee surgery?",
    "Which vitamins matter most during pregnancy?",
    "When should a nosebleed worry me?",
]
WEEK_TWO = [
    "Does cold weather make arthritis worse?",
    "How often should adults check their blood pressure?",
    "What should I pack in a first aid kit for hiking?",
]
CANARY = {
    "model": "tiny",
    "stable": "registry://tiny@production",
    "candidate": "registry://tiny@candidate",
    "candidate_share": 0.5,
    "min_requests": 3,
    "window": 20,
    "promote_after": 4,
    "margin": 0.5,
}


def _project(tmp_path: Path) -> Path:
    rng = random.Random(0)
    rows = []
    for i in range(40):
        a, b, c = rng.sample(WORDS, 3)
        rows.append(
            {"instruction": f"Patient {i} asks about {a} and {b}: what about {c}?", "output": f"For {a}, rest {i}."}
        )
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    project = {
        "name": "tiny",
        "output_dir": "run",
        "model": {"name_or_path": "tiny-random-llama"},
        "data": {
            "sources": [{"path": "qa.jsonl", "reader": "alpaca"}],
            "dedup": {"near": False},
            "filters": {"outlier_sigma": None},
        },
        "train": {"method": "lora", "max_steps": 2, "batch_size": 2, "max_length": 64, "precision": "fp32"},
        "eval": {
            "max_items": 4,
            "decoding": {"max_new_tokens": 4, "batch_size": 4},
            "robustness": {"enabled": False},
            "bootstrap_samples": 100,
            "gates": [],
        },
        "export": {
            "gguf": [],
            "int8": False,
            "eval_rows": 1,
            "eval_items": 0,
            "speed_prompts": 1,
            "speed_new_tokens": 2,
        },
        "registry": {"url": "sqlite:///registry.db", "store": "artifacts"},
        "serve": {
            "engine": "transformers",
            "key_hash_iterations": 1000,
            "default_max_tokens": 8,
            "max_context_tokens": 256,
            "batch_wait_ms": 5,
            "serve_trained": False,
        },
    }
    path = tmp_path / "project.yaml"
    path.write_text(yaml.safe_dump(project), encoding="utf-8")
    return path


@contextmanager
def _server(config: Path, keys: dict[str, str], **serve):
    """A live server on the project's store; keys are made on the first start and kept."""
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    overrides = [f"serve.{k}={json.dumps(v)}" for k, v in serve.items()]
    state = build_state(load_config(config, overrides))
    if not keys:
        keys["user"] = state.store.create_key("alice")[1]
        keys["reviewer"] = state.store.create_key("dr-lee", is_admin=True)[1]  # rates others' requests
        keys["admin"] = state.store.create_key("ops", is_admin=True)[1]
    with BackgroundServer(state) as server:
        yield server, OpenAI(base_url=server.url + "/v1", api_key=keys["user"], max_retries=0)


def _ask(client: OpenAI, question: str, user: str = "alice") -> tuple[str, str]:
    raw = client.chat.completions.with_raw_response.create(
        model="tiny", messages=[{"role": "user", "content": question}], max_tokens=6, temperature=0, user=user
    )
    return raw.parse().id, raw.headers["x-domaintune-served"]


def _feedback(server, key: str, request_id: str, rating: int, correction: str | None = None) -> None:
    body = {"request_id": request_id, "rating": rating, "correction": correction}
    r = httpx.post(server.url + "/v1/feedback", headers={"Authorization": f"Bearer {key}"}, json=body)
    assert r.status_code == 200, r.text


def _correct(server, client, keys, questions: list[str]) -> None:
    for q in questions:
        rid, _ = _ask(client, q)
        _feedback(server, keys["user"], rid, -1, f"A careful answer to: {q.lower()}")


def _canary_traffic(server, client, keys, *, rate_candidate: int, until: str) -> None:
    """Users ask until the canary decides; feedback rates each arm's answers."""
    for i in range(80):
        rid, served = _ask(client, "How do I treat a cold?", user=f"user-{i}")
        if rate_candidate:
            _feedback(server, keys["user"], rid, rate_candidate if served == "tiny@candidate" else 1)
        if server.state.canary.state != "running":
            break
    assert server.state.canary.state == until


def test_two_unattended_rounds_with_a_live_server_and_the_canary(tmp_path, monkeypatch):
    # The holdout is a stable hash of the server's random request ids: by chance a round can hold out none of its
    # rows (6 rows at a 0.3 share: 12% of runs) or all of them (3 rows: 2.7%). Here every third new request id is
    # held out instead, still stable per id: any 3 consecutive new ids give one holdout row and two training rows.
    from domaintune.workflow import round_feedback

    order: dict[str, int] = {}

    def every_third_held(request_id: str, share: float) -> bool:
        index = order.setdefault(request_id, len(order))
        return index % 3 == 0

    monkeypatch.setattr(round_feedback, "in_holdout", every_third_held)
    config = _project(tmp_path)
    first = run_pipeline(load_config(config))
    registry = registry_from_config(load_config(config))
    v1 = first.version
    registry.promote("tiny", v1, alias="production")
    keys: dict[str, str] = {}
    rules = ReviewRules(thumbs="approved", reviewers=("dr-lee",), holdout=0.3)
    options = RoundOptions(rules=rules, parent_gate=False)  # the gate itself: test_parent_gate below
    with_canary = [f"serve.canary={json.dumps(CANARY)}"]  # what the operator's project file says

    # Week 1: production serves; users correct six answers; a reviewer vetoes one request.
    with _server(config, keys, models=[{"name": "tiny", "source": "registry://tiny@production"}]) as (server, client):
        _correct(server, client, keys, WEEK_ONE)
        rid, _ = _ask(client, "Is a short walk good after a cold?")
        _feedback(server, keys["reviewer"], rid, -1)  # a reviewer's veto: no row
    round1 = run_round(load_config(config, with_canary), "registry://tiny@production", options)
    assert round1.status == "candidate", round1.message
    v2 = round1.version
    info = registry.show("tiny", v2)
    meta = info["metadata"]
    # lineage and checksums: the child of v1, trained on exactly v1's registered rows plus the new ones
    assert info["parent"] == v1
    parent_train = registry.show("tiny", v1)["metadata"]["data"]["files"]["train.jsonl"]
    merged = {m["role"]: m for m in meta["lineage"]["merged"]}
    assert merged["parent training rows"]["sha256"] == parent_train
    assert meta["data"]["files"]["test.jsonl"] == registry.show("tiny", v1)["metadata"]["data"]["files"]["test.jsonl"]
    stored = {a["path"]: a["sha256"] for a in info["artifacts"]}
    child_train = Path(meta["run_dir"]) / "data" / "train.jsonl"
    assert stored["data/train.jsonl"] == sha256_file(child_train) == meta["data"]["files"]["train.jsonl"]
    feedback = meta["round"]["feedback"]
    taken = feedback["train_rows"] + feedback["holdout_rows"]
    assert taken == 6 and feedback["holdout_rows"] >= 1, feedback["dropped"]
    assert feedback["dropped"] == {"vetoed by a reviewer": 1}
    assert meta["round"]["rows"]["train"] == meta["round"]["rows"]["parent_train"] + feedback["train_rows"]
    assert sum(1 for _ in read_jsonl(child_train)) == meta["round"]["rows"]["train"]
    # the comparison: base, parent and child on the parent's test set and on the held-out feedback
    for set_name in ("test", "feedback holdout"):
        primary = meta["round"]["comparison"][set_name]["primary"]
        assert {"base", "parent", "child", "delta", "ci_low", "ci_high"} <= set(primary)
    assert registry.aliases("tiny")["candidate"] == v2
    assert [e["kind"] for e in registry.events("tiny", v2)][-3:] == ["round", "promoted", "canary_candidate"]
    summary = json.loads((tmp_path / "run" / "rounds" / "latest.json").read_text())
    assert summary["status"] == "candidate" and summary["child"] == v2
    assert summary["canary"]["started"] and summary["canary"]["stable_version"] == v1

    again = run_round(load_config(config, with_canary), "registry://tiny@production", options)
    assert again.status == "already_done" and v2 in again.message

    # Week 2: the canary (v1 stable, v2 candidate) runs clean and promotes v2; users correct three more answers.
    with _server(config, keys, canary=CANARY) as (server, client):
        _canary_traffic(server, client, keys, rate_candidate=0, until="promoted")
        _correct(server, client, keys, WEEK_TWO)
    assert registry.aliases("tiny")["production"] == v2
    round2 = run_round(load_config(config, with_canary), "registry://tiny@production", options)
    assert round2.status == "candidate", round2.message
    v3 = round2.version
    meta3 = registry.show("tiny", v3)["metadata"]["round"]
    assert registry.show("tiny", v3)["parent"] == v2
    assert meta3["window"]["start"] == meta["round"]["window"]["end"]  # only feedback since the parent's round
    assert meta3["feedback"]["train_rows"] + meta3["feedback"]["holdout_rows"] == 3
    assert meta3["rows"]["parent_train"] == meta["round"]["rows"]["train"]

    # Week 3: the canary (v2 stable, v3 candidate) starts afresh; users dislike v3, which is rolled back.
    with _server(config, keys, canary=CANARY) as (server, client):
        assert server.state.canary.state == "running"
        _canary_traffic(server, client, keys, rate_candidate=-1, until="rolled_back")
    assert registry.aliases("tiny")["production"] == v2
    # after a restart the decision and its reason are still visible
    with _server(config, keys, canary=CANARY) as (server, _client):
        status = httpx.get(server.url + "/admin/canary", headers={"Authorization": f"Bearer {keys['admin']}"}).json()
        assert status["state"] == "rolled_back" and "negative feedback" in status["decision"]["reason"]
        metrics = httpx.get(server.url + "/metrics").text
        assert 'domaintune_canary_decision{candidate_version="' + v3 in metrics and "negative feedback" in metrics
    listed = CliRunner().invoke(app, ["registry", "list", "-c", str(config)])
    lines = [" ".join(line.split()) for line in listed.output.splitlines()]
    assert any(f"tiny@{v3.split('_')[0]} canary rolled back: candidate negative feedback" in line for line in lines)
    assert any(f"tiny@{v2.split('_')[0]} canary promoted" in line for line in lines)
    assert any(f"tiny@{v3.split('_')[0]} round from {v2.split('_')[0]}" in line for line in lines)

    # Nothing new since: the round says so and registers nothing.
    third = CliRunner().invoke(
        app,
        [
            "round",
            str(config),
            "--from",
            "registry://tiny@production",
            "--thumbs",
            "approved",
            "--reviewer",
            "dr-lee",
            "--holdout",
            "0.3",
            "--no-parent-gate",
        ],
    )
    assert third.exit_code == 0, third.output
    said = "".join(third.output.split())  # any terminal width
    assert "already_done" in said and v3 in said and "canaryrolledback:candidatenegativefeedback" in said
    assert len(registry.list("tiny")) == 3


def test_parent_gate():
    worse = {
        "test": {
            "primary": {
                "metric": "rougeL_char",
                "parent": 30.0,
                "child": 20.0,
                "delta": -10.0,
                "ci_low": -14.0,
                "ci_high": -6.0,
            }
        }
    }
    (failure,) = parent_gate_failures(worse)
    assert "child worse than its parent" in failure and "30.00 -> 20.00" in failure
    unclear = {"test": {"primary": {**worse["test"]["primary"], "ci_high": 1.0}}}
    assert parent_gate_failures(unclear) == []
