"""Two flywheel rounds on the bundled SmolLM2-135M-Instruct and the customer-service example (minutes on a CPU).

`.venv/bin/python -m pytest -m slow tests/workflow/test_round_slow.py -s` prints each round's figures: the
rows merged, the feedback taken, base / parent / child on the test set and on the held-out feedback, the
gates and the canary's decision. Week 1: users correct answers on a live server. Round 1. Week 2: the canary
(v1 stable, v2 candidate) runs clean and promotes v2; users correct more answers. Round 2. Week 3: users
complain about v3's answers and the canary rolls it back; a restarted server still says why.
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from domaintune.config import load_config
from domaintune.registry import registry_from_config
from domaintune.workflow.pipeline import run_pipeline
from domaintune.workflow.round import RoundOptions, run_round
from domaintune.workflow.round_feedback import ReviewRules
from domaintune.workflow.round_report import summary_lines

pytestmark = pytest.mark.slow

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "customer-service.yaml"
CANARY = {
    "model": "customer-service",
    "stable": "registry://customer-service@production",
    "candidate": "registry://customer-service@candidate",
    "candidate_share": 0.5,
    "min_requests": 8,
    "window": 40,
    "promote_after": 12,
    "margin": 0.1,
}
SETTINGS = [
    "train.max_steps=16",
    "train.batch_size=8",
    "train.max_length=192",
    "train.learning_rate=2.0e-3",
    "train.eval_steps=8",
    "train.save_steps=16",
    "train.generation_eval.items=0",  # the example turns it on; evaluation here is the eval stage's
    "eval.max_items=14",
    "eval.decoding.max_new_tokens=48",
    "eval.robustness.enabled=false",
    "export.gguf=[]",
    "export.int8=false",
    "export.eval_items=0",
    "serve.engine=transformers",
    "serve.key_hash_iterations=1000",
    "serve.serve_trained=false",
    f"serve.canary={json.dumps(CANARY)}",
]
WEEK_ONE = [
    ("Is shipping free if my order is 80 dollars?", "Yes. Standard shipping is free on US orders over 75 dollars."),
    ("How many days do I have to send back a sweater?", "You can return unused items within 30 days of delivery."),
    ("I ordered an hour ago, can I still cancel?", "Yes, orders can be cancelled within 2 hours from the Orders page."),
    ("How much does express delivery cost?", "Express shipping costs 14.95 dollars and takes 1-2 business days."),
    ("Do you take PayPal?", "Yes, we accept Visa, Mastercard, American Express, PayPal and Apple Pay."),
    ("Can I split my payment into parts?", "Orders over 100 dollars can be paid in 4 interest-free instalments."),
    (
        "How long is the warranty on a leather bag?",
        "All products have a 2-year warranty against manufacturing defects.",
    ),
    (
        "What does it cost to ship to Canada?",
        "Orders to Canada cost a flat 12.95 dollars and arrive in 5-8 business days.",
    ),
    ("Can you gift wrap my order?", "Yes, gift wrapping with a handwritten card costs 4 dollars at checkout."),
    ("When will my refund show up?", "We refund within 3 business days after we receive the return."),
    ("Is shipping free everywhere?", "Yes, shipping is always free everywhere!!"),  # vetoed by the reviewer
]
WEEK_TWO = [
    ("Do you ship to Norway?", "Yes: tracked delivery in 8-12 business days for a flat 24.95 dollars."),
    ("Can I use two discount codes on one order?", "Only one code per order, and not on sale items."),
    ("Do you deliver on Sundays?", "No. Our carriers deliver Monday to Saturday, never on Sundays."),
    ("How do I close my account for good?", "Go to Account > Privacy > Delete account."),
    ("Where do I find the invoice for my order?", "Under Account > Orders, in the order details."),
    ("Does express delivery go to PO boxes?", "No. Express needs a street address; standard can go to PO boxes."),
]
TRAFFIC = ["How long does standard shipping take?", "Can I return shoes I wore once?", "How do I change my e-mail?"]


@contextmanager
def _server(config: Path, output_dir: Path, keys: dict[str, str]):
    from domaintune.serve.server import BackgroundServer
    from domaintune.serve.state import build_state

    state = build_state(load_config(config, SETTINGS, output_dir))
    if not keys:
        keys["user"] = state.store.create_key("shop-frontend")[1]
        keys["lead"] = state.store.create_key("support-lead", is_admin=True)[1]
    with BackgroundServer(state) as server:
        yield server


def _ask(server, key: str, question: str, user: str, max_tokens: int = 40) -> tuple[str, str]:
    body = {
        "model": "customer-service",
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "user": user,
    }
    r = httpx.post(
        server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=600
    )
    r.raise_for_status()
    return r.json()["id"], r.headers["x-domaintune-served"]


def _rate(server, key: str, rid: str, rating: int, correction: str | None = None) -> None:
    body = {"request_id": rid, "rating": rating, "correction": correction}
    httpx.post(
        server.url + "/v1/feedback", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60
    ).raise_for_status()


def _week(server, keys: dict[str, str], items: list[tuple[str, str]]) -> None:
    for i, (question, correction) in enumerate(items):
        rid, _ = _ask(server, keys["user"], question, f"shopper-{i}")
        _rate(server, keys["user"], rid, -1, correction)
        if correction.endswith("!!"):
            _rate(server, keys["lead"], rid, -1)


def _canary(server, keys: dict[str, str], complain: bool) -> str:
    for i in range(80):
        rid, served = _ask(server, keys["user"], TRAFFIC[i % len(TRAFFIC)], f"traffic-{i}", max_tokens=24)
        if complain:
            _rate(server, keys["user"], rid, -1 if served.endswith("@candidate") else 1)
        if server.state.canary.state != "running":
            break
    return server.state.canary.state


def test_two_rounds_on_the_bundled_model(tmp_path, monkeypatch):
    # The holdout is a stable hash of the server's random request ids: by chance all of week two's 6 rows can be
    # held out at the default 0.2 share (1 run in 15,600; week one's 8: 1 in 390,000), and the round then has
    # nothing to train on. As in test_round.py, every third new request id is held out instead, stable per id.
    from domaintune.workflow import round_feedback

    order: dict[str, int] = {}

    def every_third_held(request_id: str, share: float) -> bool:
        return order.setdefault(request_id, len(order)) % 3 == 0

    monkeypatch.setattr(round_feedback, "in_holdout", every_third_held)
    started = time.perf_counter()
    out = tmp_path / "runs" / "customer-service"
    config_with = lambda: load_config(EXAMPLE, SETTINGS, out)  # noqa: E731
    first = run_pipeline(config_with())
    registry = registry_from_config(config_with())
    v1 = first.version
    registry.promote("customer-service", v1, alias="production", force=True)
    registry.promote("customer-service", v1, alias="candidate", force=True)  # a canary-configured server can start
    keys: dict[str, str] = {}
    options = RoundOptions(rules=ReviewRules(reviewers=("support-lead",)))
    with _server(EXAMPLE, out, keys) as server:
        _week(server, keys, WEEK_ONE)
    round1 = run_round(config_with(), "registry://customer-service@production", options)
    print("\n".join(["", *summary_lines(round1.summary)]))
    assert round1.status in ("candidate", "rejected"), round1.message
    assert registry.show("customer-service", round1.version)["parent"] == v1
    with _server(EXAMPLE, out, keys) as server:
        if round1.status == "candidate":
            print("canary v1 vs v2:", _canary(server, keys, complain=False))
        _week(server, keys, WEEK_TWO)
    round2 = run_round(config_with(), "registry://customer-service@production", options)
    print("\n".join(["", *summary_lines(round2.summary)]))
    assert round2.status in ("candidate", "rejected"), round2.message
    if round2.status == "candidate":
        with _server(EXAMPLE, out, keys) as server:
            assert _canary(server, keys, complain=True) == "rolled_back"
        with _server(EXAMPLE, out, keys) as server:
            status = httpx.get(server.url + "/admin/canary", headers={"Authorization": f"Bearer {keys['lead']}"}).json()
            print("after a restart:", status["state"], status["decision"])
            assert status["decision"]["kind"] == "rolled_back"
    print(f"wall time {time.perf_counter() - started:.0f} s")
